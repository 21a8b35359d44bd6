"""The tuning layer: search space, M buckets, keys, the on-disk cache (round trip, corrupt and
stale files, two processes writing at once), lookups in ``fc2``, pinning, the heuristic, and the
tuner end to end (CPU: Triton's interpreter with an injected timer; GPU: the real timer); the
routed path's space and tuning, the strategy crossovers and their CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path
import warnings

import pytest
import torch

import densemoe
from densemoe import Fc2CuteConfig, Fc2Problem, Fc2TritonConfig
from densemoe.kernels.cute.fc2_sm90 import can_implement as cute_can_implement
from densemoe.kernels.triton.fc2 import can_implement as triton_can_implement
from densemoe.kernels.cute import fc2_sm90 as cute_fc2
from densemoe.ops import fc2 as fc2_ops
from densemoe.ops import fc2_configs
from densemoe.ops.fc2 import which_backend
from densemoe.reference import fc2_ref
from densemoe.shapes import M_SWEEP, SHAPES
from densemoe.tuning import cache
from densemoe.tuning.buckets import bucket_range, m_bucket, neighbours
from densemoe.tuning.space import fc2_space
from densemoe.tuning.ops import make_inputs
from densemoe.tuning.tuner import TOL, summary, tune, tune_problem
from _helpers import FP8, fake_timer

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

BF16 = torch.bfloat16


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(cache.ENV_TUNED, raising=False)
    monkeypatch.delenv(cache.ENV_AUTOTUNE, raising=False)
    cache.reload()
    cache._warned.clear()
    yield tmp_path
    cache.reload()
    cache._warned.clear()


# ---------------------------------------------------------------------------------- buckets

def test_buckets():
    assert [m_bucket(m) for m in (0, 1, 2, 3, 5, 33, 64, 65, 97, 129, 200, 257, 385, 513, 700, 1000)] == \
        [1, 1, 2, 4, 8, 64, 64, 96, 128, 192, 256, 384, 512, 768, 768, 1024]
    for m in M_SWEEP:
        assert m_bucket(m) == m  # every sweep point tops its own bucket
    prev = 0
    for m in range(1, 3000):
        b = m_bucket(m)
        assert b >= m and b >= prev and m_bucket(b) == b
        lo, hi = bucket_range(b)
        assert lo < m <= hi == b
        prev = b
    with pytest.raises(ValueError, match="not a bucket"):
        bucket_range(100)
    assert neighbours(1) == (2,) and neighbours(2) == (1, 4) and neighbours(1024) == (768, 1536)
    for b in sorted({m_bucket(m) for m in range(1, 5000)})[1:]:
        lo, hi = neighbours(b)
        assert bucket_range(b)[0] == lo and bucket_range(hi)[0] == b


# ---------------------------------------------------------------------------------- space

@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", (FP8, BF16), ids=("fp8", "bf16"))
def test_space_is_valid_deterministic_and_bounded(shape, dtype):
    s = SHAPES[shape]
    for m in M_SWEEP + (1000,):
        p = Fc2Problem(m, s.hidden, s.experts, s.inter, dtype, BF16)
        space = fc2_space(p)
        assert space == fc2_space(p)  # same order every time: no timing, no device queries
        assert len(space) == len(set(space)) and 10 <= len(space) <= 200, (m, len(space))
        for cfg in space:
            check = cute_can_implement if cfg.backend == "cute" else triton_can_implement
            assert check(p, cfg)[0], cfg
        assert {c.backend for c in space} == {"triton", "cute"}
        assert fc2_configs.default_config(p) in space and fc2_configs.default_cute_config(p) in space
        assert all(c.backend == "triton" for c in fc2_space(p, backends=("triton",)))


def test_space_covers_the_variants_the_kernels_have():
    p = Fc2Problem(96, 7168, 256, 256, FP8, BF16)
    space = fc2_space(p)
    tri = [c for c in space if c.backend == "triton"]
    cute = [c for c in space if c.backend == "cute"]
    assert {c.swap_ab for c in tri} == {True, False} and {c.split for c in tri} >= {0, 1}
    assert {c.ctas_per_sm for c in tri} == {1, 2}
    assert {c.swap_ab for c in cute} == {0, 1} and {c.lockstep for c in cute} == {0, 1}
    assert {(c.cluster_n, c.cluster_m) for c in cute} == {(1, 1), (2, 1)}  # one token tile: no (1, 2)
    big = [c for c in fc2_space(Fc2Problem(256, 7168, 256, 256, FP8, BF16)) if c.backend == "cute"]
    assert {(c.cluster_n, c.cluster_m) for c in big} >= {(1, 1), (2, 1), (1, 2)}
    # fp8 promotes each k-tile (one temporary); bf16 keeps the two-temporary variant
    assert {(c.acc_buffers, c.promote) for c in cute} == {(1, 1)}
    bf16 = [c for c in fc2_space(Fc2Problem(96, 7168, 256, 256, BF16, BF16)) if c.backend == "cute"]
    assert {(c.acc_buffers, c.promote) for c in bf16} == {(1, 0), (2, 0)}
    with pytest.raises(ValueError, match="unknown backends"):
        fc2_space(p, backends=("cublas",))


# ---------------------------------------------------------------------------------- keys

def test_key_holds_what_makes_an_entry_valid():
    p = Fc2Problem(100, 7168, 256, 256, FP8, BF16)
    key = cache.make_key("fc2", "NVIDIA H100 80GB HBM3", p)
    v = cache.versions()
    for part in ("fc2|", "NVIDIA H100 80GB HBM3", "fp8->bf16", "N=7168", "K=65536", "E=256", "M<=128",
                 f"densemoe={v['densemoe']}", f"triton={v['triton']}", f"cutedsl={v['cutedsl']}"):
        assert part in key
    assert cache.make_key("fc2", "x", Fc2Problem(97, 7168, 256, 256, FP8, BF16)) == \
        cache.make_key("fc2", "x", Fc2Problem(128, 7168, 256, 256, FP8, BF16))
    assert cache.make_key("fc2", "x", p) != cache.make_key("fc2", "x", Fc2Problem(129, 7168, 256, 256, FP8, BF16))
    assert cache.make_key("fc2", "x", p) != cache.make_key("fc2", "x", Fc2Problem(100, 7168, 256, 256, BF16, BF16))


# ---------------------------------------------------------------------------------- the file

def _entry(cfg, us=10.0):
    slot = {"backend": cfg.backend, "config": cfg.to_str(), "us": us}
    return {"best": slot, cfg.backend: slot, "heuristic": slot, "m": 1}


def test_cache_round_trip_is_atomic_json(cache_dir):
    cfg = Fc2TritonConfig(16, 64, 64, 4, 3, True, True, 1, 1)
    cache.record("k1", _entry(cfg))
    cache.record("k2", _entry(cfg, 5.0))
    assert cache.cache_path() == cache_dir / "tuned.json"
    data = json.loads((cache_dir / "tuned.json").read_text())
    assert data["format"] == cache.FORMAT and set(data["entries"]) == {"k1", "k2"}
    assert cache.lookup("k2") == (_entry(cfg, 5.0), "cache")
    assert cache.lookup("nope") == (None, "")
    assert not list(cache_dir.glob("*.tmp"))  # the temporary file was renamed into place


def test_shipped_tables_are_used_after_the_users_cache(cache_dir, tmp_path, monkeypatch):
    shipped_dir = tmp_path / "tables"
    shipped_dir.mkdir()
    a_cfg = Fc2TritonConfig(16, 32, 32, 4, 2, True, True, 1, 1)
    b_cfg = Fc2TritonConfig(16, 64, 32, 4, 2, True, True, 1, 1)
    (shipped_dir / "h100.json").write_text(json.dumps({"format": cache.FORMAT, "entries": {
        "k": _entry(a_cfg), "only-shipped": _entry(b_cfg)}}))
    monkeypatch.setattr(cache, "TABLES_DIR", shipped_dir)
    cache.reload()
    assert cache.lookup("only-shipped") == (_entry(b_cfg), "shipped")
    assert cache.lookup("k")[1] == "shipped"
    cache.record("k", _entry(b_cfg))
    assert cache.lookup("k") == (_entry(b_cfg), "cache")  # the user's own tuning wins


def test_entries_from_other_versions_warn_once_and_use_the_heuristic(cache_dir):
    p, a, w, alpha, out = _cpu_call()
    heuristic = _heuristic(p, a, w, alpha, out, "auto")
    key = cache.make_key("fc2", "cpu", p)
    old = key.replace(f"triton={cache.versions()['triton']}", "triton=0.0.1")
    assert old != key
    cache.record(old, _entry(Fc2TritonConfig(16, 32, 32, 4, 2, True, True, 2, 1)))
    with pytest.warns(RuntimeWarning, match="made with .*triton=0.0.1") as rec:
        for _ in range(3):
            assert which_backend(a, w, alpha, out) == heuristic
    assert len(rec) == 1


def _cpu_call(M=5, N=64, E=4, I=32, dtype=FP8, seed=0):
    p = Fc2Problem(M, N, E, I, dtype, BF16)
    a, w, alpha = make_inputs(p, "cpu", seed=seed)
    out = torch.empty(M, N, dtype=BF16)
    return p, a, w, alpha, out


def _heuristic(p, a, w, alpha, out, backend="auto"):
    """(backend, config) of the deterministic rules for these tensors (no tuned table)."""
    return tuple(fc2_configs.choose(p, a.device, backend=backend, tuned=False,
                                    cute_check=lambda: cute_fc2.runtime_ok(a, w, alpha, out))[:2])


def test_tuned_entry_is_used_pinning_wins_and_env_turns_it_off(cache_dir, monkeypatch):
    p, a, w, alpha, out = _cpu_call()
    heuristic = which_backend(a, w, alpha, out)
    tuned = Fc2TritonConfig(16, 32, 32, 4, 2, True, True, 2, 1)
    assert tuned != heuristic[1]
    cache.record(cache.make_key("fc2", "cpu", p), _entry(tuned))
    assert which_backend(a, w, alpha, out) == ("triton", tuned)
    assert which_backend(a, w, alpha, out, with_source=True) == ("triton", tuned, "cache")
    assert which_backend(a, w, alpha, out, backend="triton") == ("triton", tuned)
    pinned = Fc2TritonConfig(16, 64, 32, 4, 2, True, True, 1, 1)
    assert which_backend(a, w, alpha, out, config=pinned) == ("triton", pinned)
    monkeypatch.setenv(cache.ENV_TUNED, "0")
    assert which_backend(a, w, alpha, out) == heuristic
    assert which_backend(a, w, alpha, out, with_source=True)[2] == "heuristic"
    monkeypatch.delenv(cache.ENV_TUNED)
    # the tuned config really runs: same result as the reference
    got = densemoe.fc2(a, w, alpha)
    ref = fc2_ref(a, w, alpha, torch.float64)
    assert ((got.double() - ref).norm() / ref.norm()).item() < TOL


def test_tuned_cute_entry_falls_back_where_cute_cannot_run(cache_dir):
    p, a, w, alpha, out = _cpu_call()
    tri = Fc2TritonConfig(16, 32, 32, 4, 2, True, True, 2, 1)
    cute = Fc2CuteConfig(tile_n=64, tile_m=16, tile_k=32 * 4)
    entry = _entry(tri)
    entry["best"] = entry["cute"] = {"backend": "cute", "config": cute.to_str(), "us": 1.0}
    cache.record(cache.make_key("fc2", "cpu", p), entry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not stale: just not runnable on a CPU
        assert which_backend(a, w, alpha, out) == ("triton", tri)


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "entries": {}}', "[1, 2]", ""])
def test_corrupt_file_warns_once_and_uses_the_heuristic(cache_dir, content):
    p, a, w, alpha, out = _cpu_call()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        heuristic = _heuristic(p, a, w, alpha, out, "auto")
    (cache_dir / "tuned.json").write_text(content)
    cache.reload()
    with pytest.warns(RuntimeWarning, match="ignoring tuning file") as rec:
        for _ in range(3):
            assert which_backend(a, w, alpha, out) == heuristic
            cache.reload()
    assert len([r for r in rec if "ignoring tuning file" in str(r.message)]) == 1
    cfg = Fc2TritonConfig(16, 32, 32, 4, 2, True, True, 2, 1)
    cache.record(cache.make_key("fc2", "cpu", p), _entry(cfg))  # rewrites a valid file
    assert json.loads((cache_dir / "tuned.json").read_text())["format"] == cache.FORMAT
    assert which_backend(a, w, alpha, out) == ("triton", cfg)


@pytest.mark.parametrize("config", ["bogus", "block_m=7,block_n=64,block_k=32,num_warps=4,num_stages=2,"
                                    "swap_ab=True,use_tma=True,split=1,ctas_per_sm=1", "block_m=16,zzz=1"])
def test_stale_entry_warns_and_uses_the_heuristic(cache_dir, config):
    p, a, w, alpha, out = _cpu_call()
    heuristic = _heuristic(p, a, w, alpha, out, "auto")
    slot = {"backend": "triton", "config": config, "us": 1.0}
    cache.record(cache.make_key("fc2", "cpu", p), {"best": slot, "triton": slot})
    with pytest.warns(RuntimeWarning, match="ignoring tuned entry"):
        assert which_backend(a, w, alpha, out) == heuristic


def _writer(path: str, tag: int, n: int, start) -> None:
    from pathlib import Path

    from densemoe.tuning import cache as c

    start.wait()
    for i in range(n):
        c.write_entries(Path(path), {f"{tag}-{i}": {"i": i}})


def test_two_processes_tuning_at_once_keep_all_entries(tmp_path):
    path = tmp_path / "tuned.json"
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(path), t, 25, start)) for t in range(2)]
    for pr in procs:
        pr.start()
    start.set()
    for pr in procs:
        pr.join(120)
        assert pr.exitcode == 0
    entries = json.loads(path.read_text())["entries"]
    assert set(entries) == {f"{t}-{i}" for t in range(2) for i in range(25)}


# ---------------------------------------------------------------------------------- heuristic

def test_heuristic_is_deterministic_and_ignores_the_cache(cache_dir):
    p, a, w, alpha, out = _cpu_call(M=7)
    first = _heuristic(p, a, w, alpha, out, "auto")
    cache.record(cache.make_key("fc2", "cpu", p), _entry(Fc2TritonConfig(16, 32, 32, 4, 2, True, True, 2, 1)))
    for _ in range(3):
        assert _heuristic(p, a, w, alpha, out, "auto") == first


def test_heuristic_without_a_cute_config_takes_triton(monkeypatch):
    # I = 32 fp8: an expert's k-slice (32 B) is below the CuTe kernel's 128-byte k-tile. Where
    # the CuTe runtime is available, "auto" must fall back to Triton, and "cute" must say why.
    p, a, w, alpha, out = _cpu_call(I=32)
    monkeypatch.setattr(cute_fc2, "runtime_ok", lambda *args: (True, ""))
    with pytest.raises(ValueError, match="multiple of 128 bytes"):
        fc2_configs.default_cute_config(p)
    assert _heuristic(p, a, w, alpha, out, "auto")[0] == "triton"
    with pytest.raises(ValueError, match="backend='cute' cannot run this call: .*128 bytes"):
        _heuristic(p, a, w, alpha, out, "cute")
    assert all(c.backend == "triton" for c in fc2_space(p))


def test_autotune_env_never_tunes_off_gpu(cache_dir, monkeypatch):
    p, a, w, alpha, out = _cpu_call()
    monkeypatch.setenv(cache.ENV_AUTOTUNE, "1")
    assert which_backend(a, w, alpha, out) == _heuristic(p, a, w, alpha, out, "auto")
    assert not (cache_dir / "tuned.json").exists()


# ---------------------------------------------------------------------------------- the tuner

@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_tuner_end_to_end_on_the_interpreter(cache_dir, monkeypatch):
    p = Fc2Problem(5, 64, 4, 32, FP8, BF16)  # tuned at its bucket's top, M = 8
    space = [Fc2TritonConfig(16, 32, 32, 4, 2, True, True, 1, 1),
             Fc2TritonConfig(16, 64, 32, 4, 2, True, True, 2, 1),   # fastest: returns garbage
             Fc2TritonConfig(16, 32, 32, 4, 2, True, True, 2, 1),   # next: fails to run
             Fc2TritonConfig(16, 64, 32, 4, 2, True, True, 1, 1)]   # the verified winner
    times = {space[0]: 30.0, space[1]: 5.0, space[2]: 1.0, space[3]: 10.0}
    real = fc2_ops.fc2_triton

    def launcher(a, w, alpha, out, config, **kw):
        if config == space[2]:
            raise RuntimeError("compile failed (injected)")
        real(a, w, alpha, out, config, **kw)
        if config == space[1]:
            out.mul_(-1)  # a wrong kernel: the verification must catch it
    monkeypatch.setattr(fc2_ops, "fc2_triton", launcher)
    last = {}
    monkeypatch.setattr(fc2_ops, "_choose", _recording(fc2_ops._choose, last))

    def timer(fn):
        fn()
        return {"us": times.get(last["cfg"], 20.0)}

    seen = []
    r = tune_problem(p, "cpu", timer=timer, space=space, progress=lambda i, n, c: seen.append((i, n)))
    assert r.problem.m == 8 and seen[-1] == (len(r.timings), len(r.timings))
    assert r.best.config == space[3] and r.best.us == 10.0
    errors = {t.config: t.error for t in r.failures}
    assert "injected" in errors[space[2]] and "wrong result" in errors[space[1]]
    assert r.heuristic.us == 20.0 and r.speedup == pytest.approx(2.0)
    assert r.per_backend["triton"].config == space[3]
    # recorded and then used by fc2 for any M of the bucket
    entry, where = cache.lookup(r.key)
    assert where == "cache" and entry["best"]["config"] == space[3].to_str() and entry["failures"] == 2
    p2, a, w, alpha, out = _cpu_call(M=7)
    assert which_backend(a, w, alpha, out) == ("triton", space[3])
    assert "| fp8 | 8 |" in summary([r])


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
@pytest.mark.parametrize("heuristic_us, keeps_heuristic", [(10.1, True), (10.25, False)])
def test_tuner_keeps_the_heuristic_unless_beaten_by_the_margin(cache_dir, monkeypatch, heuristic_us, keeps_heuristic):
    p = Fc2Problem(5, 64, 4, 32, FP8, BF16)
    faster = Fc2TritonConfig(16, 64, 32, 4, 2, True, True, 1, 1)
    last = {}
    monkeypatch.setattr(fc2_ops, "_choose", _recording(fc2_ops._choose, last))

    def timer(fn):
        fn()
        return 10.0 if last["cfg"] == faster else heuristic_us
    r = tune_problem(p, "cpu", timer=timer, space=[faster], save=False)
    assert r.heuristic.config != faster and r.heuristic.us == heuristic_us
    assert (r.best.config == r.heuristic.config) == keeps_heuristic


def test_merge_applies_the_margin_to_old_entries():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("merge_tuned", Path(__file__).resolve().parents[1] / "bench" / "merge_tuned.py")
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    e = {"best": {"config": "a", "us": 10.0}, "heuristic": {"config": "h", "us": 10.1}}
    assert merge.apply_margin(e, 0.02) and e["best"]["config"] == "h"
    e = {"best": {"config": "a", "us": 10.0}, "heuristic": {"config": "h", "us": 10.3}}
    assert not merge.apply_margin(e, 0.02) and e["best"]["config"] == "a"
    # a table named after a card takes that card's keys only
    key = "routed|NVIDIA H100 80GB HBM3|fp8->bf16|N=2048|K=98304|E=128|topk=8|M<=1024|densemoe=0.1.0"
    assert merge.card_mismatch(key, Path("tables/h100.json")) == ""
    assert "not an H200" in merge.card_mismatch(key, Path("tables/h200.json"))
    assert merge.card_mismatch(key, Path("/tmp/merged.json")) == ""
    # and the shipped tables hold none of another card's
    for table in sorted(cache.TABLES_DIR.glob("h[0-9]*.json")):
        keys = json.loads(table.read_text())["entries"]
        assert keys and not [k for k in keys if merge.card_mismatch(k, table)], table.name


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_tuner_keeps_its_result_when_the_cache_cannot_be_written(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(blocker / "sub"))
    cache.reload()
    p = Fc2Problem(5, 64, 4, 32, FP8, BF16)
    space = [Fc2TritonConfig(16, 32, 32, 4, 2, True, True, 1, 1)]
    with pytest.warns(RuntimeWarning, match="could not save"):
        r = tune_problem(p, "cpu", timer=lambda fn: 1.0, space=space)
    assert r.best is not None and r.best.us == 1.0 and len(r.timings) == 2  # the heuristic joined the space
    cache.reload()


def test_finals_retime_the_fastest_and_the_heuristic_and_rank_by_the_retimed_median():
    from densemoe.tuning.tuner import Timing, _finals

    cfgs = [Fc2TritonConfig(16, 32, 32, 4, 2, True, True, s, 1) for s in range(1, 7)]
    cute_cfg = Fc2CuteConfig(tile_n=128, tile_m=16, tile_k=128)
    screen = {cfgs[0]: 5.0, cfgs[1]: 8.0, cfgs[2]: 9.0, cfgs[3]: 30.0, cfgs[4]: 40.0, cfgs[5]: 50.0, cute_cfg: 60.0}
    again = {cfgs[0]: [15.0, 14.0, 16.0], cfgs[1]: [8.0, 8.5, 7.5], cfgs[2]: [9.0, 9.0, 9.0],
             cfgs[4]: [41.0, 39.0, 40.0], cute_cfg: [61.0, 59.0, 60.0]}
    timings = [Timing(c, screen[c], screen_us=screen[c]) for c in screen]
    timings.append(Timing(Fc2TritonConfig(16, 64, 32, 4, 2, True, True, 1, 1), None, "failed"))
    calls = []
    state = {}

    def run(c):
        state["cfg"] = c

    def timer(fn):
        fn()
        c = state["cfg"]
        calls.append(c)
        return again[c][sum(x == c for x in calls) - 1]

    _finals(timings, cfgs[4], timer, 20, 3, 3, run)  # the heuristic is cfgs[4], slow
    by = {t.config: t for t in timings}
    # finalists: the three fastest, the other backend's fastest, the heuristic; interleaved rounds
    assert calls == [cfgs[0], cfgs[1], cfgs[2], cfgs[4], cute_cfg] * 3
    assert by[cfgs[0]].us == 15.0 and by[cfgs[0]].screen_us == 5.0  # the lucky screening loses
    assert by[cfgs[1]].us == 8.0 and by[cfgs[4]].us == 40.0 and by[cute_cfg].us == 60.0
    assert by[cfgs[3]].us == 30.0 and by[cfgs[5]].us == 50.0  # not finalists: screening time
    assert min((t for t in timings if t.us), key=lambda t: t.us).config == cfgs[1]
    _finals(timings, cfgs[4], timer, 20, 0, 3, run)  # finalists=0: nothing re-timed
    assert len(calls) == 15


def test_precompile_does_nothing_off_the_gpu():
    from densemoe.tuning.precompile import default_workers, precompile

    p = Fc2Problem(8, 64, 4, 32, FP8, BF16)
    stats = precompile([(p, fc2_space(p))], "cpu", workers=2)
    assert stats.triton_jobs == 0 and stats.workers == 0 and "0/0" in stats.line()
    assert 0 <= default_workers() <= 8


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_precompile_worker_runs_each_candidate_and_counts_failures():
    from densemoe.tuning.precompile import _worker

    p8, p16 = Fc2Problem(8, 64, 4, 32, FP8, BF16), Fc2Problem(16, 64, 4, 32, FP8, BF16)
    good = Fc2TritonConfig(16, 32, 32, 4, 2, True, True, 1, 1)
    bad = Fc2TritonConfig(16, 32, 64, 4, 2, True, True, 1, 1)  # k-tile 64 > I = 32: refused
    assert not triton_can_implement(p8, bad)[0]
    assert _worker([(p8, good), (p8, bad), (p16, good)], "cpu") == 2
    from densemoe.kernels.common import Fc1Problem
    from densemoe.kernels.triton.fc1 import Fc1TritonConfig

    q = Fc1Problem(8, 64, 2, 64, FP8, BF16)  # FC1 candidates go through the same workers
    assert _worker([(q, Fc1TritonConfig(16, 64, 64, 4, 2, 1, 0)), (p8, good)], "cpu") == 2
    from densemoe.tuning.space import routed_space

    r = _routed_problem(8)  # and the routed ones
    assert _worker([(r, c) for c in routed_space(r)[:2]], "cpu") == 2


def _recording(choose, last):
    def wrapped(*args):
        which = choose(*args)
        last["cfg"] = which[1]
        return which
    return wrapped


def test_tune_needs_a_gpu_or_a_timer():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ValueError, match="CUDA GPU"):
        tune_problem(Fc2Problem(5, 64, 4, 32, FP8, BF16), "cpu")
    with pytest.raises(ValueError, match="CUDA GPU"):
        tune("fc2", "deepseek-v3-tp8", [1])
    with pytest.raises(ValueError, match="tunable ops are"):
        tune("fc3")
    with pytest.raises(ValueError, match="unknown shape"):
        tune("fc2", "llama")
    with pytest.raises(ValueError, match="dtypes: 'fp4'"):
        tune("fc2", "deepseek-v3-tp8", [1], dtypes=("fp4",), device="cpu", timer=lambda fn: 1.0)
    with pytest.raises(ValueError, match="dtypes: torch.float16"):
        tune("fc2", "deepseek-v3-tp8", [1], dtypes=(torch.float16,), device="cpu", timer=lambda fn: 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and TRITON_INTERPRET unset")
def test_tuner_on_the_gpu_small_shape(cache_dir):
    p = Fc2Problem(100, 1024, 16, 256, FP8, BF16)
    space = fc2_space(p)[:4] + [c for c in fc2_space(p) if c.backend == "cute"][:2]
    from densemoe.tuning.precompile import precompile

    stats = precompile([(dataclasses_replace(p, m=128), space)], "cuda", workers=2)  # M=100 is tuned at 128
    assert stats.workers == 2 and stats.triton_ok == stats.triton_jobs == 4, stats.line()
    assert stats.cute_ok == stats.cute_configs == 2, stats.line()
    r = tune_problem(p, "cuda", space=space, reps=5)
    assert r.best is not None and r.best.us > 0 and r.key.startswith("fc2|")
    assert not r.failures, [(t.config, t.error) for t in r.failures]
    assert r.best.us <= min(t.us for t in r.timings if t.us and not t.error) + 1e-9
    # the recorded winner is what fc2 now runs, and it is right
    a, w, alpha = make_inputs(dataclasses_replace(p, m=97), "cuda", seed=3)
    out = torch.full((97, p.n), float("nan"), dtype=BF16, device="cuda")
    assert which_backend(a, w, alpha, out)[1] == r.best.config
    densemoe.fc2(a, w, alpha, out=out)
    ref = fc2_ref(a, w, alpha, torch.float64)
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL


def dataclasses_replace(p, **kw):
    import dataclasses

    return dataclasses.replace(p, **kw)


def test_cli_tune_passes_its_arguments_and_prints_the_summary(monkeypatch, tmp_path, capsys):
    from densemoe import __main__ as cli
    from densemoe.tuning import tuner

    seen = {}

    def fake_tune(op, shape, ms, dtypes, backends, reps, save, compile_workers, missing_only):
        seen.update(op=op, shape=shape, ms=ms, dtypes=dtypes, backends=backends, reps=reps, save=save,
                    compile_workers=compile_workers, missing_only=missing_only)
        p = Fc2Problem(8, 64, 4, 32, FP8, BF16)
        best = tuner.Timing(Fc2TritonConfig(16, 64, 32, 4, 2, True, True, 1, 1), 10.0)
        heur = tuner.Timing(Fc2TritonConfig(16, 32, 32, 4, 2, True, True, 1, 1), 12.5)
        return [tuner.TuneResult("k", p, best, {"triton": best}, heur, [], [best, heur])]
    monkeypatch.setattr(tuner, "tune", fake_tune)
    out = tmp_path / "t.md"
    assert cli.main(["tune", "--shape", "64,4,32", "--m", "1-8,100", "--dtypes", "fp8,bf16",
                     "--backends", "triton", "--reps", "7", "--no-save", "--out", str(out), "--compile-workers", "3"]) == 0
    assert seen == dict(op="fc2", shape=(64, 4, 32), ms=[1, 2, 4, 8, 100], dtypes=["fp8", "bf16"],
                        backends=("triton",), reps=7, save=False, compile_workers=3, missing_only=False)
    table = capsys.readouterr().out
    assert "| fp8 | 8 | triton:block_m=16,block_n=64" in table and "| 1.250 |" in table
    assert out.read_text().strip() == table.strip()


# ---------------------------------------------------------------------------------- every tactic runs

@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
@pytest.mark.parametrize("M,dtype", [(5, FP8), (70, BF16)], ids=("M5-fp8", "M70-bf16"))
def test_every_triton_tactic_in_the_space_is_right(M, dtype):
    """Each Triton config the tuner may pick runs through the interpreter and matches the fp64
    reference within PyTorch's own error at this precision."""
    from densemoe.tuning.space import triton_space
    from _helpers import assert_close_to_torch, torch_loop

    p = Fc2Problem(M, 64, 4, 64, dtype, BF16)
    a, w, alpha = make_inputs(p, "cpu", seed=M)
    ref = fc2_ref(a, w, alpha, torch.float64)
    base = torch_loop(a, w, alpha, BF16)
    space = triton_space(p, num_sms=4)
    assert len(space) >= 15
    for cfg in space:
        out = torch.full((M, 64), float("nan"), dtype=BF16)
        densemoe.fc2(a, w, alpha, out=out, config=cfg)
        assert_close_to_torch(out, ref, base)


def _cute_variants(problem):
    from densemoe.tuning.space import cute_space

    seen, out = set(), []
    for c in cute_space(problem):
        cls = (c.swap_ab, c.consumers, c.acc_buffers, c.cluster_n, c.cluster_m, c.lockstep)
        if cls not in seen:
            seen.add(cls)
            out.append(c)
    return out


CUTE_SPACE_VARIANTS = (_cute_variants(Fc2Problem(100, 7168, 256, 256, FP8, BF16))
                       + _cute_variants(Fc2Problem(300, 7168, 256, 256, FP8, BF16)))


@pytest.mark.cute_compile
@pytest.mark.parametrize("cfg", CUTE_SPACE_VARIANTS, ids=lambda c: c.to_str()[5:])
def test_every_cute_variant_in_the_space_compiles(cfg):
    """One config per structural variant of the CuTe space (orientation, consumers,
    temporaries, cluster shape, lockstep) compiles for sm_90a without a GPU."""
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed")
    from densemoe.kernels.cute import fc2_sm90

    assert callable(fc2_sm90.compile_fc2(cfg, FP8, BF16, 7168, 256, 256))


def test_cli_dry_run_lists_the_space_without_a_gpu(capsys):
    from densemoe import __main__ as cli

    assert cli.main(["tune", "--shape", "deepseek-v3-tp8", "--m", "1,96,100,512", "--dtypes", "fp8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| fp8 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["1", "96", "128", "512", "distinct (compiles)"]
    assert all(int(r.split("|")[3]) > 0 and int(r.split("|")[4]) > 0 for r in rows)


def test_report_marks_tuned_configs_and_shows_the_heuristic_beside_them():
    from pathlib import Path

    from densemoe.bench.report import markdown

    import gzip

    path = Path(__file__).resolve().parents[1] / "bench/results/fc2_h100_2026-11-26_large_m.json.gz"
    data = json.loads(gzip.decompress(path.read_bytes()))
    plain = markdown(data["meta"], data["records"])
    assert "*" not in plain.split("| shape |")[1] and "heuristic" not in plain
    recs = [dict(r) for r in data["records"]]
    for r in recs:
        if r["shape"] == "deepseek-v3-tp8" and r["dtype"] == "fp8" and r["M"] == 64 and r["backend"] == "cute":
            r.update(tuned=True, config_source="cache", heuristic_us=r["us"] * 1.25)
    md = markdown(data["meta"], recs)
    row = next(line for line in md.splitlines() if line.startswith("| deepseek-v3-tp8 | fp8 | 64 |"))
    assert row.split("|")[5].strip().endswith("*") and not row.split("|")[4].strip().endswith("*")
    assert "| deepseek-v3-tp8 | fp8 | 64 | cute |" in md and "| 1.250 |" in md


def test_timer_compare_interleaves_rounds_and_takes_the_median_round():
    from densemoe.timing import Timer

    calls = []
    slow = {("b", 1)}  # a slow spell of the GPU during B's second round

    class Fake(Timer):
        def __init__(self):  # no CUDA buffers
            pass

        def __call__(self, fn, graph=True, reps=None):
            name = fn()
            calls.append(name)
            rnd = sum(c == name for c in calls) - 1
            us = {"a": 10.0, "b": 12.0}[name] * (3 if (name, rnd) in slow else 1)
            return {"us": us + rnd * 0.1, "us_min": us - 1, "us_p90": us + 1}

    a, b = Fake().compare([lambda: "a", lambda: "b"], rounds=3)
    assert calls == ["a", "b"] * 3
    assert a["us"] == pytest.approx(10.1) and b["us"] == pytest.approx(12.2)  # the slow round is not the median
    assert b["us_rounds"] == pytest.approx([12.0, 36.1, 12.2]) and a["us_min"] == 9.0


# ---------------------------------------------------------------------------------- FC1 through the same tuner

def test_fc1_space_is_valid_deterministic_and_holds_the_heuristic():
    from densemoe.kernels.common import Fc1Problem
    from densemoe.kernels.triton.fc1 import can_implement as fc1_ok
    from densemoe.ops.fc1_configs import default_config
    from densemoe.tuning.space import fc1_space

    for name in ("deepseek-v3-tp8", "qwen3-30b-a3b", "mixtral-8x7b-tp2"):
        s = SHAPES[name]
        for dt in (FP8, BF16):
            for m in M_SWEEP + (1000,):
                p = Fc1Problem(m, s.hidden, s.experts, s.inter, dt, BF16)
                space = fc1_space(p)
                assert space == fc1_space(p) and len(space) == len(set(space)) and default_config(p) in space
                assert all(fc1_ok(p, c)[0] for c in space)
    assert fc1_space(Fc1Problem(8, 64, 2, 64, FP8, BF16), backends=("cute",)) == []


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_fc1_tuned_end_to_end_on_the_interpreter(cache_dir, monkeypatch):
    from densemoe.kernels.common import Fc1Problem
    from densemoe.kernels.triton.fc1 import Fc1TritonConfig
    from densemoe.ops import fc1 as fc1_ops
    from densemoe.ops.fc1 import which_backend as fc1_which

    p = Fc1Problem(5, 64, 2, 64, FP8, BF16)  # tuned at M = 8
    space = [Fc1TritonConfig(16, 64, 64, 4, 2, 1, 0), Fc1TritonConfig(16, 64, 128, 4, 2, 1, 0)]
    last = {}
    real = fc1_ops.fc1_triton

    def launcher(x, w1, alpha1, y, cfg, **kw):
        last["cfg"] = cfg
        real(x, w1, alpha1, y, cfg, **kw)
    monkeypatch.setattr(fc1_ops, "fc1_triton", launcher)

    def timer(fn):
        fn()
        return 10.0 if last["cfg"] == space[1] else 30.0
    r = tune_problem(p, "cpu", timer=timer, space=space)
    assert len(r.timings) == 3 and not r.failures  # the heuristic joined the two
    assert r.key.startswith("fc1|cpu|fp8->bf16|N=256|K=64|E=2|M<=8") and r.best.config == space[1]
    x = torch.randn(7, 64).to(FP8)
    w1 = torch.randn(256, 64).to(FP8)
    out = torch.empty(7, 128, dtype=BF16)
    assert fc1_which(x, w1, torch.ones(2), out, with_source=True)[1:] == (space[1], "cache")
    y = densemoe.fc1(x, w1, torch.ones(2), out=out)
    ref = densemoe.reference.fc1_ref(x, w1, torch.ones(2), out_dtype=torch.float64)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    os.environ["DENSEMOE_TUNED"] = "0"
    try:
        assert fc1_which(x, w1, torch.ones(2), out, with_source=True)[2] == "heuristic"
    finally:
        del os.environ["DENSEMOE_TUNED"]


def test_every_shipped_entry_fits_its_problem():
    """The shipped tables hold only entries whose configs parse and pass their backend's
    can_implement for the key's problem (bench/merge_tuned.py's check, FC1 and FC2 keys)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge_tuned", Path(__file__).parents[1] / "bench" / "merge_tuned.py")
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    tables = sorted(cache.TABLES_DIR.glob("*.json"))
    assert tables
    ops = set()
    for table in tables:
        for key, entry in json.loads(table.read_text())["entries"].items():
            assert merge.check(key, entry) == "", key
            ops.add(key.split("|")[0])
            if key.split("|")[0] in cache.CUTE_INDEPENDENT_OPS:  # found with CuTe DSL installed or not
                assert key.endswith("|cutedsl=unused"), key
    assert ops == {"fc1", "fc2", "routed", "strategy"}


def test_routed_and_strategy_keys_do_not_depend_on_cute_dsl(monkeypatch):
    p = _routed_problem(100)
    for cute in ("none", "4.8.1"):
        monkeypatch.setattr(cache, "versions", lambda cute=cute: {"densemoe": "0", "triton": "3", "cutedsl": cute})
        cache.make_key.cache_clear()
        assert cache.make_key("routed", "NVIDIA H200", p).endswith("|cutedsl=unused")
        assert cache.make_key("strategy", "NVIDIA H200", p).endswith("|cutedsl=unused")
        assert cache.make_key("fc2", "NVIDIA H200", Fc2Problem(100, 7168, 256, 256, FP8, BF16)).endswith(f"|cutedsl={cute}")
    cache.make_key.cache_clear()


def test_the_h200_table_reaches_the_routed_path(monkeypatch):
    """On a device named NVIDIA H200 with this Triton, routed_configs.choose takes the shipped
    entry for DeepSeek-V3 TP8 fp8 at M = 512 (the one `tables/h200.json` holds under that key,
    read here from the file), not the first-guess rule."""
    import triton

    from densemoe.kernels.common import RoutedProblem
    from densemoe.ops import routed_configs

    if triton.__version__ != "3.6.0":  # the table is keyed to the device's Triton
        real = {**cache.versions(), "triton": "3.6.0"}
        monkeypatch.setattr(cache, "versions", lambda: real)
    cache.make_key.cache_clear()
    monkeypatch.setattr(cache, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(cache, "cache_dir", lambda: Path("/nonexistent-densemoe-cache"))
    cache._tables.cache_clear()
    s = SHAPES["deepseek-v3-tp8"]
    p = RoutedProblem(512, s.hidden, s.experts, s.inter, s.topk, FP8, BF16)
    choice = routed_configs.choose(p, "cuda")
    assert choice.source == "shipped", choice
    table = cache.read_file(cache.TABLES_DIR / "h200.json")
    assert choice.config == routed_configs.parse_config(table[cache.make_key("routed", "NVIDIA H200", p)]["best"]["config"])
    assert choice.config != routed_configs.default_config(RoutedProblem(512, s.hidden, s.experts, s.inter, s.topk,
                                                                        FP8, BF16))
    cache.make_key.cache_clear()
    cache._tables.cache_clear()


@pytest.mark.parametrize("cute", ["none", "4.8.1"])
def test_the_h200_table_reaches_the_strategy_rule(monkeypatch, cute):
    """On a device named NVIDIA H200, with CuTe DSL installed or not, strategy.pick takes the shipped
    crossovers: Qwen3-30B-A3B fp8 M = 4 runs routed (the rule alone: skip), and block-scaled
    DeepSeek-V3 TP8 at M = 16 runs routed where per-expert fp8 runs skip (both recorded)."""
    from densemoe.kernels.common import RoutedProblem
    from densemoe.ops import strategy

    real = {**cache.versions(), "triton": "3.6.0", "cutedsl": cute}
    monkeypatch.setattr(cache, "versions", lambda: real)
    cache.make_key.cache_clear()
    monkeypatch.setattr(cache, "device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(cache, "cache_dir", lambda: Path("/nonexistent-densemoe-cache"))
    cache._tables.cache_clear()
    cache.lookup.cache_clear()
    try:
        q, d = SHAPES["qwen3-30b-a3b"], SHAPES["deepseek-v3-tp8"]
        qp = RoutedProblem(4, q.hidden, q.experts, q.inter, q.topk, FP8, BF16)
        assert strategy.pick(4, q.experts, q.topk) == "skip"
        assert strategy.pick(4, q.experts, q.topk, problem=qp, device="cuda") == "routed"
        for block, want in ((0, "skip"), (128, "routed")):
            dp = RoutedProblem(16, d.hidden, d.experts, d.inter, d.topk, FP8, BF16, block)
            assert strategy.pick(16, d.experts, d.topk, problem=dp, device="cuda") == want, block
    finally:
        cache.make_key.cache_clear()
        cache._tables.cache_clear()
        cache.lookup.cache_clear()


# ---------------------------------------------------------------------------------- the routed path

TINY_ROUTED = (64, 8, 64, 2)  # H, E, I, top_k: the interpreter's routed shape


def _routed_problem(M=5, dtype=FP8, H=64, E=8, I=64, k=2):
    from densemoe.kernels.common import RoutedProblem

    return RoutedProblem(M, H, E, I, k, dtype, BF16)


ROUTED_MS = tuple(sorted(set(M_SWEEP) | {768, 1024, 1536, 2048, 3072, 4096}))


@pytest.mark.parametrize("shape", [*SHAPES, "tiny"])
@pytest.mark.parametrize("dtype", (FP8, BF16), ids=("fp8", "bf16"))
def test_routed_space_is_valid_bounded_and_holds_the_default(shape, dtype):
    from densemoe.kernels.triton.routed import can_implement
    from densemoe.ops.routed_configs import default_config
    from densemoe.tuning.space import routed_space

    for m in ROUTED_MS:
        if shape == "tiny":
            p = _routed_problem(m, dtype)
        else:
            s = SHAPES[shape]
            p = _routed_problem(m, dtype, s.hidden, s.experts, s.inter, s.topk)
        space = routed_space(p)
        assert space and space == routed_space(p) and len(space) == len(set(space)) <= 153, (m, len(space))  # routed_space: at most 153
        assert space[0] == default_config(p)
        for cfg in space:
            ok, why = can_implement(p, cfg)
            assert ok, (cfg, why)
        assert routed_space(p, backends=("cute",)) == []


def test_the_fastest_right_config_without_cute_is_recorded_beside_a_cute_best():
    """``tuner.fastest_without_cute``: the routed entry's ``no_cute`` slot skips configs with a
    CuTe GEMM, those already failed, and a wrong one (marked so); None when none is left."""
    from densemoe.kernels.triton.routed import RoutedConfig
    from densemoe.tuning.tuner import Timing, fastest_without_cute

    cute = RoutedConfig(fc1_cute=True, fc1_block_k=256)
    failed, wrong, right, slower = (RoutedConfig(block_m=b) for b in (16, 32, 64, 128))
    ok = [Timing(cute, us=1.0), Timing(failed, us=2.0, error="boom"), Timing(wrong, us=3.0),
          Timing(right, us=4.0), Timing(slower, us=5.0)]
    checked = []

    def error_of(c):
        checked.append(c)
        return 1.0 if c == wrong else 0.0
    assert cute.uses_cute and not right.uses_cute and RoutedConfig(fc2_cute=True).uses_cute
    assert fastest_without_cute(ok, error_of).config == right and checked == [wrong, right]
    assert "wrong result" in ok[2].error
    assert fastest_without_cute(ok[:3], lambda c: 0.0) is None


def test_routed_space_splits_fc1_and_fc2_tiles_from_32_rows_an_expert():
    """From 32 rows an expert: 128-row FC1s (Triton; CuTe on the sorted copy and gathering x by
    TMA) before 64-row FC2s the space has on their own, each the FC2 of such a config field for
    field (``with_fc1_of``)."""
    import dataclasses

    from densemoe.kernels.triton.routed import RoutedConfig
    from densemoe.tuning.space import FC1_FIELDS, MAX_FC2_PARTS, _fc2_key, routed_space, with_fc1_of

    # DeepSeek-V3 TP8: 8, 32 (16- and 32-row tiles only), 64 and 128 rows an expert
    for m, want in ((256, False), (1024, False), (2048, True), (4096, True)):
        p = _routed_problem(m, FP8, 7168, 256, 256, 8)
        space = routed_space(p)
        # (the CuTe FC2's pairs: test_routed_fc2_cute)
        split = [c for c in space if (c.fc2_block_m or c.fc2_programs_per_sm) and not c.fc2_cute]
        assert bool(split) == want, m
        if not split:
            continue
        assert {c.block_m for c in split} == {128} and {c.fc2_part().block_m for c in split} == {64}
        assert {(c.fc1_cute, c.fc1_cute_gather) for c in split} == {(False, False), (True, False), (True, True)}
        assert len(split) == 3 * MAX_FC2_PARTS
        fc2s = {_fc2_key(c) for c in space if c.block_m == 64 and not c.fc2_block_m}
        assert all(_fc2_key(c) in fc2s for c in split)
        assert any(c.fc2_col_groups for c in split)  # the H200 tables' FC2 at these M
    a = RoutedConfig(block_m=128, fc1_warps=8, fc1_stages=2, programs_per_sm=1, fc1_sorted_x=True)
    b = RoutedConfig(block_m=64, fc2_block_n=256, fc2_stages=2, programs_per_sm=2, fc2_col_groups=5, fc1_warps=4)
    c = with_fc1_of(b, a)
    assert all(getattr(c, n) == getattr(a, n) for n in FC1_FIELDS)
    assert _fc2_key(c) == _fc2_key(b) and (c.fc2_block_m, c.fc2_programs_per_sm) == (64, 2)
    assert with_fc1_of(b, dataclasses.replace(a, block_m=64, programs_per_sm=2)).fc2_block_m == 0


def test_routed_space_follows_the_rows_per_expert():
    from densemoe.tuning.space import routed_rows, routed_space

    s = SHAPES["deepseek-v3-tp8"]

    def space(m, dtype=FP8):
        return routed_space(_routed_problem(m, dtype, s.hidden, s.experts, s.inter, s.topk))
    decode = space(1)  # 8 rows over 256 experts: 16-row swapped tiles only, the default's aside
    assert routed_rows(_routed_problem(1, FP8, s.hidden, s.experts, s.inter, s.topk)) == 8 / 256
    assert {c.block_m for c in decode} == {16} and all(c.fc1_swap_ab and c.fc2_swap_ab for c in decode)
    assert {c.fc1_block_i for c in decode} == {64, 128, 256} and {c.fc2_block_n for c in decode} == {64, 128, 256}
    assert {c.programs_per_sm for c in decode} == {1, 2, 3} and {c.fc1_warps for c in decode} == {4, 8}
    assert {c.fc1_block_k for c in decode} == {128, 256} and len({c.fc1_stages for c in decode}) >= 2
    assert {c.flatten for c in decode} == {False, True} and {c.atomic_combine for c in decode} == {False, True}
    assert {c.tma for c in decode} == {False, True}
    assert all(c.fc1_block_i % c.fc2_block_k == 0 for c in decode)  # fp8: one y scale per fc2 k-step
    mid = space(1536)  # 48 rows an expert: 32- and 64-row tiles, 64 both ways
    assert {(c.block_m, c.fc1_swap_ab) for c in mid if not c.fc2_block_m} == {(32, True), (64, True), (64, False)}
    # FC1's 128-row tiles, FC2's 64 (the CuTe FC2's pairs: test_routed_fc2_cute)
    assert {(c.block_m, c.fc2_block_m) for c in mid if c.fc2_block_m and not c.fc2_cute} == {(128, 64)}
    prefill = space(4096, BF16)  # 128 rows: 64- and 128-row tiles, tokens as the MMA's M
    assert {c.block_m for c in prefill} == {64, 128}
    # but three: 128 tokens as the MMA's N (the dense FC1's form at 128+ tokens a weight tile)
    swapped = [c for c in prefill if c.fc1_swap_ab]
    assert len(swapped) == 5 and {(c.block_m, c.fc1_block_i, c.programs_per_sm, c.fc1_sorted_x)
                                  for c in swapped} == {(128, 64, 1, False), (128, 64, 2, False), (128, 128, 1, False),
                                                        (128, 64, 1, True), (128, 64, 2, True)}
    # FC1 on the sorted copy of x at the 64- and 128-row tiles (one and two programs an SM)
    assert {(c.block_m, c.programs_per_sm) for c in prefill if c.fc1_sorted_x and not c.fc1_swap_ab} == \
        {(64, 1), (64, 2), (128, 1), (128, 2)}
    assert {c.fc1_block_k for c in prefill} == {64, 128}
    assert not [c for c in prefill if c.block_m * c.fc1_block_i > 16384]  # accumulators that would spill
    # FC1's tails at the 64- and 128-row tiles, at 8 warps (4 spill with them)
    tails = [c for c in prefill if c.fc1_tail_m]
    assert {(c.block_m, c.fc1_tail_m) for c in tails} == {(64, 16), (64, 32), (128, 16), (128, 32)}
    assert all(c.fc1_warps == 8 and not c.flatten for c in tails)
    assert not any(c.fc1_tail_m for c in mid if c.block_m < 64)


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_routed_reference_rounds_like_the_candidate():
    """The fp8 routed output quantises y in groups of fc1_block_i columns: each config is
    checked against a reference with its own groups (``TunedOp.ref_key``), which it meets
    tightly, while the exact math is a few percent away."""
    from densemoe.kernels.triton.routed import RoutedConfig
    from densemoe.tuning.ops import ROUTED, make_routed_inputs, routed_reference

    p = _routed_problem(6, FP8, I=128)
    inputs = make_routed_inputs(p, "cpu", seed=1)
    errs = {}
    for bi in (64, 128):
        cfg = RoutedConfig(block_m=16, fc1_block_i=bi, fc1_block_k=64, fc1_swap_ab=True, fc2_block_n=64,
                           fc2_block_k=64, fc2_swap_ab=True)
        out = ROUTED.run(inputs, None, cfg)
        for ref_bi in (64, 128):
            ref = routed_reference(inputs, RoutedConfig(fc1_block_i=ref_bi))
            errs[bi, ref_bi] = ((out.float() - ref).norm() / ref.norm()).item()
        exact = routed_reference(inputs)
        errs[bi, None] = ((out.float() - exact).norm() / exact.norm()).item()
        assert ROUTED.ref_key(cfg) == (bi, False)
    assert errs[64, 64] < 4e-3 and errs[128, 128] < 4e-3
    assert errs[64, 128] > 3 * errs[64, 64] and errs[128, 64] > 3 * errs[128, 128]
    assert 4e-3 < errs[64, None] < 0.1 and 4e-3 < errs[128, None] < 0.1


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_routed_tuned_end_to_end_on_the_interpreter(cache_dir, monkeypatch):
    from densemoe.kernels.triton import routed as kern
    from densemoe.kernels.triton.routed import RoutedConfig
    from densemoe.ops import routed_configs
    from densemoe.ops.routed import routed_experts, which_config
    from densemoe.tuning.ops import make_routed_inputs, routed_reference

    p = _routed_problem(5)  # tuned at M = 8
    base = dict(block_m=16, fc1_swap_ab=True, fc2_swap_ab=True, fc1_block_k=64, fc2_block_k=64)
    space = [RoutedConfig(fc1_block_i=64, fc2_block_n=64, **base),
             RoutedConfig(fc1_block_i=64, fc2_block_n=64, programs_per_sm=2, **base),  # fastest: wrong
             RoutedConfig(fc1_block_i=64, fc2_block_n=64, fc1_warps=8, **base),        # next: fails
             RoutedConfig(fc1_block_i=64, fc2_block_n=64, fc2_stages=2, **base)]       # the winner
    times = {space[0]: 30.0, space[1]: 5.0, space[2]: 1.0, space[3]: 10.0}
    last = {}
    real1, real2 = kern.fc1_launch, kern.fc2_launch

    def fc1_launch(*args, **kw):
        cfg = args[-1]
        last["cfg"] = cfg
        if cfg == space[2]:
            raise RuntimeError("compile failed (injected)")
        real1(*args, **kw)

    def fc2_launch(*args, **kw):
        real2(*args, **kw)
        if space[1] in args:
            args[7].mul_(-1)  # rows: a wrong kernel, the verification must catch it
    monkeypatch.setattr(kern, "fc1_launch", fc1_launch)
    monkeypatch.setattr(kern, "fc2_launch", fc2_launch)

    def timer(fn):
        fn()
        return {"us": times.get(last["cfg"], 20.0)}
    r = tune_problem(p, "cpu", timer=timer, space=space)
    assert r.problem.m == 8 and len(r.timings) == 5  # the default rule's config joined the four
    assert r.best.config == space[3] and r.best.us == 10.0 and r.heuristic.us == 20.0
    errors = {t.config: t.error for t in r.failures}
    assert "injected" in errors[space[2]] and "wrong result" in errors[space[1]]
    assert r.key.startswith("routed|cpu|fp8->bf16|N=64|K=512|E=8|topk=2|M<=8|")
    entry, where = cache.lookup(r.key)
    assert where == "cache" and entry["best"]["config"] == space[3].to_str() and entry["triton"]["us"] == 10.0
    assert any(line.startswith("dropped M<=8 routed:") for line in r.dropped())
    # every M of the bucket now takes it, and it runs right
    monkeypatch.setattr(kern, "fc1_launch", real1)
    monkeypatch.setattr(kern, "fc2_launch", real2)
    ch = routed_configs.choose(_routed_problem(7), "cpu")
    assert (ch.config, ch.source) == (space[3], "cache")
    q = _routed_problem(7)
    inputs = make_routed_inputs(q, "cpu", seed=2)
    x, pw, ids, tw, _ = inputs
    assert which_config(x, pw, 2, with_source=True) == (space[3], "cache")
    out = routed_experts(x, pw, ids, tw)
    ref = routed_reference(inputs, space[3])
    assert ((out.float() - ref).norm() / ref.norm()).item() < TOL
    assert routed_configs.choose(_routed_problem(9), "cpu").source == "heuristic"  # another bucket
    assert "| fp8 | 8 | triton:block_m=16,fc1_block_i=64" in summary([r])


def _record_routed(problem, slots: dict) -> str:
    """A tuned entry for ``problem`` on the CPU in the user's cache, its slots' configs as given."""
    key = cache.make_key("routed", cache.device_name(torch.device("cpu")), problem)
    cache.record(key, {slot: {"backend": "triton", "config": c if isinstance(c, str) else c.to_str(), "us": 1.0}
                       for slot, c in slots.items()} | {"m": problem.m, "device": "cpu"})
    return key


def test_the_neighbouring_buckets_winners_join_the_space(cache_dir):
    """``with_neighbours``: the configs tuned for the buckets just below and above (every slot
    but the heuristic's) follow the space, once each, where they fit the problem; a config
    that does not fit it or does not parse, and the buckets further away, are left out."""
    import dataclasses

    from densemoe.ops import routed_configs
    from densemoe.tuning.ops import ROUTED
    from densemoe.tuning.space import routed_space
    from densemoe.tuning.tuner import with_neighbours

    def at(b, spec=None):
        return _routed_problem(b, dtype=BF16)
    p = at(8)
    space = routed_space(p, num_sms=132)
    base = space[0]
    below = dataclasses.replace(base, fc1_stages=2, fc2_stages=2, fc2_warps=8)  # in no space: 2 stages
    above = dataclasses.replace(base, fc1_stages=3, fc2_stages=2, fc2_warps=8)
    unfit = dataclasses.replace(base, fc2_block_k=96)  # does not divide fc1_block_i
    far = dataclasses.replace(base, fc1_stages=2, fc2_stages=3, fc2_warps=8)
    for c in (below, above, far):
        assert c not in space and routed_configs.can_implement(p, c)[0]
    assert not routed_configs.can_implement(p, unfit)[0]
    _record_routed(at(4), {"best": below, "triton": below, "heuristic": far})
    _record_routed(at(16), {"best": above, "no_cute": space[1], "triton": "routed:not,a,config"})
    _record_routed(at(32), {"best": far})
    _record_routed(at(2), {"best": far})
    got = with_neighbours(ROUTED, at, 8, "cpu", ("triton",))
    assert got == space + [below, above]
    _record_routed(at(16), {"best": unfit})
    assert with_neighbours(ROUTED, at, 8, "cpu", ("triton",)) == space + [below]


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_routed_tuning_through_tune_and_the_default_space(cache_dir):
    """``tune(op="routed")`` over the whole default space of a tiny shape, one bucket, fake
    timer: every candidate runs and is right (none dropped), the entry is recorded; the
    winner tuned for the next bucket up is among the candidates."""
    import dataclasses

    from densemoe.tuning.space import routed_space

    p8 = _routed_problem(8, dtype=BF16)
    first = routed_space(_routed_problem(4, dtype=BF16), num_sms=132)[0]
    above = dataclasses.replace(first, fc1_stages=2, fc2_stages=2, fc2_warps=8)
    _record_routed(p8, {"best": above})
    results = tune("routed", TINY_ROUTED, [3], dtypes=("bf16",), device="cpu", timer=fake_timer, progress=False)
    (r,) = results
    assert r.problem.m == 4 and r.problem.top_k == 2 and not r.failures and len(r.timings) >= 4
    assert cache.lookup(r.key)[1] == "cache"
    assert [t.config for t in r.timings].count(above) == 1


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_a_bucket_just_tuned_offers_its_winner_to_the_next(cache_dir, monkeypatch):
    """``tune`` over two buckets: the winner recorded for the first (from a space the second's
    leaves out) is among the second's candidates in the same sweep."""
    import dataclasses

    from densemoe.kernels.triton import routed as kern
    from densemoe.tuning import ops as tuned_ops
    from densemoe.tuning import tuner
    from densemoe.tuning.space import routed_space

    first = routed_space(_routed_problem(4, dtype=BF16), num_sms=132)[0]
    a = dataclasses.replace(first, fc1_stages=2, fc2_stages=2, fc2_warps=8)
    b = dataclasses.replace(first, fc1_stages=3, fc2_stages=2, fc2_warps=8)
    monkeypatch.setitem(tuner.OPS, "routed", dataclasses.replace(
        tuned_ops.ROUTED, space=lambda p, backends, sms: [a] if p.m <= 4 else [b]))
    last = {}
    real = kern.fc1_launch

    def fc1_launch(*args, **kw):
        last["cfg"] = args[-1]
        real(*args, **kw)
    monkeypatch.setattr(kern, "fc1_launch", fc1_launch)

    def timer(fn):
        fn()
        return {"us": 1.0 if last["cfg"] == a else 10.0}
    r4, r8 = tune("routed", TINY_ROUTED, [3, 8], dtypes=("bf16",), device="cpu", timer=timer, progress=False)
    assert r4.best.config == a and b not in [t.config for t in r4.timings]
    assert [t.config for t in r8.timings].count(a) == 1 and r8.best.config == a


def _strategy_timer(monkeypatch, times):
    """A timer that gives each strategy its time from ``times`` (the tuner runs them through
    ``tuner.run_strategy``, wrapped here to see which one runs)."""
    from densemoe.tuning import tuner

    last, calls = {}, []
    real = tuner.run_strategy

    def run(inputs, name):
        last["name"] = name
        return real(inputs, name)
    monkeypatch.setattr(tuner, "run_strategy", run)

    def timer(fn):
        fn()
        calls.append(last["name"])
        return {"us": times[last["name"]]}
    return timer, calls


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_recorded_crossover_is_what_the_rule_picks(cache_dir, monkeypatch):
    from densemoe.ops import strategy
    from densemoe.tuning.tuner import tune_strategy

    p = _routed_problem(8)  # M = 8 of 8 experts at top-2: the rule says routed
    assert strategy.pick(8, 8, 2) == "routed"
    timer, calls = _strategy_timer(monkeypatch, {"skip": 30.0, "dense": 10.0, "routed": 20.0})
    r = tune_strategy(p, "cpu", timer=timer, rounds=3)
    assert calls == ["skip", "dense", "routed"] * 3  # interleaved rounds
    assert r.best == "dense" and r.us == {"skip": 30.0, "dense": 10.0, "routed": 20.0} and r.rule == "routed"
    assert r.key.startswith("strategy|cpu|fp8->bf16|N=64|K=512|E=8|topk=2|M<=8|") and not r.errors
    entry, where = cache.lookup(r.key)
    assert where == "cache" and entry["best"] == {"config": "dense", "us": 10.0}
    assert entry["us"]["routed"] == 20.0 and entry["heuristic"] == {"config": "routed", "us": 20.0}
    assert entry["routed"]["source"] == "heuristic"  # no routed entry was tuned here
    # what strategy.pick answers for any M of the bucket on this device, and what a call runs
    for m in (5, 7, 8):
        q = _routed_problem(m)
        assert strategy.pick(m, 8, 2, problem=q, device="cpu") == "dense"
        assert strategy.resolve("t", None, None, m, 8, top_k=2, problem=q, device="cpu") == "dense"
    assert strategy.pick(9, 8, 2, problem=_routed_problem(9), device="cpu") == "routed"  # another bucket
    assert strategy.pick(8, 8, 2, problem=p, device="meta") == "routed"  # another device (key)
    # a recorded "routed" is not taken by a caller that cannot run it (no top-k ids)
    cache.record(r.key, {**entry, "best": {"config": "routed", "us": 20.0}})
    assert strategy.pick(8, 8, 2, problem=p, device="cpu") == "routed"
    assert strategy.pick(8, 8, 2, problem=p, device="cpu", routed_ok=False) == "dense"
    cache.record(r.key, entry)
    monkeypatch.setenv(cache.ENV_TUNED, "0")  # tuned lookups off: the rule
    assert strategy.pick(8, 8, 2, problem=p, device="cpu") == "routed"


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
@pytest.mark.parametrize("dense_us, recorded", [(19.8, "routed"), (19.0, "dense")])
def test_crossover_keeps_the_rule_within_the_margin_and_leaves_out_a_wrong_strategy(cache_dir, monkeypatch,
                                                                                   dense_us, recorded):
    from densemoe.tuning import tuner
    from densemoe.tuning.tuner import tune_strategy

    timer, _ = _strategy_timer(monkeypatch, {"skip": 1.0, "dense": dense_us, "routed": 20.0})
    wrapped = tuner.run_strategy

    def broken_skip(inputs, name):
        out = wrapped(inputs, name)
        return -out if name == "skip" else out  # the fastest, and wrong
    monkeypatch.setattr(tuner, "run_strategy", broken_skip)
    r = tune_strategy(_routed_problem(7, BF16), "cpu", timer=timer)  # the rule at M = 8: routed
    assert "wrong result" in r.errors["skip"] and "skip" not in r.us
    assert r.best == recorded and cache.lookup(r.key)[0]["best"]["config"] == recorded
    assert r.dropped() == [f"left out M<=8 strategy skip: {r.errors['skip']}"]


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_tune_strategy_sweeps_buckets_and_resumes(cache_dir, monkeypatch):
    timer, calls = _strategy_timer(monkeypatch, {"skip": 5.0, "dense": 10.0, "routed": 20.0})
    res = tune("strategy", TINY_ROUTED, [1, 3, 4], dtypes=("fp8",), device="cpu", timer=timer, progress=False)
    assert [r.problem.m for r in res] == [1, 4] and all(r.best == "skip" for r in res)
    assert len(calls) == 2 * 3 * 3
    table = summary(res)
    assert "| fp8 | 1 | skip | 5.0 | 10.0 | 20.0 | skip | 1.000 | heuristic |" in table
    res = tune("strategy", TINY_ROUTED, [1, 3, 8], dtypes=("fp8",), device="cpu", timer=timer, progress=False,
               missing_only=True)
    assert [r.problem.m for r in res] == [8] and len(calls) == 3 * 3 * 3  # M <= 1 and 4 were recorded


def test_autotune_hook_tunes_routed_problems_and_nothing_else(monkeypatch):
    from densemoe.tuning import tuner

    seen = []
    monkeypatch.setattr(tuner, "tune_problem", lambda problem, device, save: seen.append(problem))
    p = _routed_problem(5)
    tuner._autotune_missing(p, torch.device("cuda"))
    tuner._autotune_missing(Fc2Problem(5, 64, 4, 32, FP8, BF16), torch.device("cuda"))
    tuner._autotune_missing(object(), torch.device("cuda"))
    assert seen == [p, Fc2Problem(5, 64, 4, 32, FP8, BF16)]
    assert cache._autotuner is tuner._autotune_missing


def test_autotune_env_never_tunes_routed_off_gpu(cache_dir, monkeypatch):
    from densemoe.ops import routed_configs

    monkeypatch.setenv(cache.ENV_AUTOTUNE, "1")
    assert routed_configs.choose(_routed_problem(5), "cpu").source == "heuristic"
    assert not (cache_dir / "tuned.json").exists()


def test_cli_routed_and_strategy(monkeypatch, capsys):
    from densemoe import __main__ as cli
    from densemoe.kernels.triton.routed import RoutedConfig
    from densemoe.tuning import tuner

    seen = {}
    p = _routed_problem(8)

    def fake_tune(op, shape, ms, dtypes, backends, reps, save, compile_workers, missing_only):
        seen.update(op=op, shape=shape, ms=ms, missing_only=missing_only)
        if op == "routed":
            best = tuner.Timing(RoutedConfig(block_m=16, fc1_block_i=64), 10.0)
            heur = tuner.Timing(RoutedConfig(block_m=16), 12.0)
            return [tuner.TuneResult("k", p, best, {"triton": best}, heur, [], [best, heur])]
        return [tuner.StrategyResult("k", p, "dense", {"skip": 15.0, "dense": 9.0, "routed": 12.0}, "routed",
                                     {}, {"config": "routed:...", "source": "cache"})]
    monkeypatch.setattr(tuner, "tune", fake_tune)
    assert cli.main(["tune", "--op", "routed", "--shape", "64,8,64,2", "--m", "1-8,4096", "--no-save"]) == 0
    assert seen == dict(op="routed", shape=(64, 8, 64, 2), ms=[1, 2, 4, 8, 4096], missing_only=False)
    assert "| fp8 | 8 | triton:block_m=16,fc1_block_i=64 | 10.0 |" in capsys.readouterr().out
    assert cli.main(["tune", "--op", "strategy", "--shape", "qwen3-30b-a3b", "--missing-only", "--no-save"]) == 0
    assert seen["op"] == "strategy" and seen["shape"] == "qwen3-30b-a3b" and seen["missing_only"]
    out = capsys.readouterr().out
    assert "| fp8 | 8 | dense | 15.0 | 9.0 | 12.0 | routed | 1.333 | cache |" in out


@pytest.mark.parametrize("argv, message", [
    (["--op", "routd"], "--op 'routd': tunable ops are fc2, fc1, routed, strategy"),
    (["--op", "routed", "--shape", "64,8,64,9"], "top-k 9 is more than the 8 experts"),
    (["--op", "routed", "--shape", "64,8"], "N,E,I or N,E,I,K"),
])
def test_cli_bad_routed_arguments_are_one_line(argv, message, capsys):
    from densemoe import __main__ as cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["tune", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_dry_run_routed_and_strategy(capsys):
    from densemoe import __main__ as cli

    assert cli.main(["tune", "--op", "routed", "--m", "1,512,4096", "--dtypes", "fp8", "--dry-run"]) == 0
    rows = [r.split("|") for r in capsys.readouterr().out.splitlines() if r.startswith("| fp8 |")]
    assert [r[2].strip() for r in rows] == ["1", "512", "4096", "distinct (compiles)"]
    # routed_space: at most 153 a bucket (142 at most since the thirteenth session: TP8 fp8 M = 2048 has 100 Triton,
    # 12 with FC1 on CuTe, 30 split); the distinct row sums buckets
    assert all(0 < int(r[3]) <= 153 and int(r[4]) == 0 for r in rows[:3]) and int(rows[3][3]) > 0
    assert cli.main(["tune", "--op", "strategy", "--shape", "qwen3-30b-a3b", "--m", "1,64", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "| fp8 | 1 | skip, dense, routed | skip |" in out and "| fp8 | 64 | skip, dense, routed | routed |" in out


def test_merge_checks_routed_and_strategy_entries():
    import importlib.util

    from densemoe.kernels.triton.routed import RoutedConfig

    spec = importlib.util.spec_from_file_location("merge_tuned", Path(__file__).parents[1] / "bench" / "merge_tuned.py")
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    s = SHAPES["deepseek-v3-tp8"]
    p = _routed_problem(100, FP8, s.hidden, s.experts, s.inter, s.topk)
    rkey = cache.make_key("routed", "NVIDIA H200", p)
    assert merge.problem_of(rkey) == dataclasses_replace(p, m=128)
    good = RoutedConfig(block_m=16, fc1_block_i=128, fc2_block_k=128).to_str()
    bad = RoutedConfig(block_m=16, fc1_block_i=64, fc2_block_k=128).to_str()  # fp8: 128 does not divide 64
    assert merge.check(rkey, {"best": {"config": good, "us": 1.0}, "triton": {"config": good}}) == ""
    assert "must divide" in merge.check(rkey, {"best": {"config": bad, "us": 1.0}})
    assert "not a routed config" in merge.check(rkey, {"best": {"config": "block_m=16", "us": 1.0}})
    bkey = cache.make_key("routed", "NVIDIA H200", dataclasses_replace(p, block=128))
    assert merge.problem_of(bkey) == dataclasses_replace(p, m=128, block=128)
    wide = RoutedConfig(block_m=16, fc1_block_i=256).to_str()  # block weights pin FC1's tile to 128
    assert merge.check(bkey, {"best": {"config": RoutedConfig(block_m=16, fc2_block_n=256).to_str(), "us": 1.0}}) == ""
    assert merge.check(bkey, {"best": {"config": good, "us": 1.0}}) == ""
    assert "block-scaled" in merge.check(bkey, {"best": {"config": wide, "us": 1.0}})
    skey = cache.make_key("strategy", "NVIDIA H200", p)
    entry = {"best": {"config": "routed", "us": 1.0}, "us": {"routed": 1.0}, "heuristic": {"config": "routed"}}
    assert merge.check(skey, entry) == ""
    assert "not one of" in merge.check(skey, {"best": {"config": "fast", "us": 1.0}})


# ---------------------------------------------------------------------------------- block-scaled fp8 (issue 20)

TINY_BLOCK = (256, 4, 128, 2)  # H, E, I, top_k: one and two 128 x 128 blocks


def test_block_dtype_plans_the_routed_and_strategy_jobs_only(capsys):
    from densemoe import __main__ as cli

    assert cli.main(["tune", "--op", "routed", "--m", "1,512,4096", "--dtypes", "fp8block", "--dry-run"]) == 0
    rows = [r.split("|") for r in capsys.readouterr().out.splitlines() if r.startswith("| fp8block |")]
    assert [r[2].strip() for r in rows] == ["1", "512", "4096", "distinct (compiles)"]
    assert all(0 < int(r[3]) <= 100 for r in rows)  # FC2 128 or 256 wide, the rest of the routed space's pruning (and its split FC1 and FC2 tiles)
    with pytest.raises(SystemExit):
        cli.main(["tune", "--op", "fc2", "--dtypes", "fp8block", "--dry-run"])
    assert "is for --op routed or strategy" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tune routed and strategy only"):
        tune("fc1", TINY_BLOCK, [1], dtypes=("fp8block",), device="cpu", timer=fake_timer, progress=False)


def test_block_routed_space_pins_fc1_and_the_k_steps_to_the_block():
    """Block-scaled weights: FC1's tile and both k-steps are one 128 x 128 block (one weight
    scale each); FC2's tile is one or two row blocks wide (a scale per column)."""
    from densemoe.kernels.triton.routed import can_implement
    from densemoe.tuning.space import routed_space

    for m in (1, 64, 4096):
        p = dataclasses_replace(_routed_problem(m, FP8, 7168, 256, 256, 8), block=128)
        space = routed_space(p)
        assert space and all(can_implement(p, c)[0] for c in space)
        assert {(c.fc1_block_i, c.fc1_block_k, c.fc2_block_k) for c in space} == {(128,) * 3}
        assert {c.fc2_block_n for c in space} == {128, 256}
    assert not can_implement(p, dataclasses_replace(space[0], fc2_block_n=64))[0]


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_block_routed_tuning_and_crossover_on_the_interpreter(cache_dir):
    """``tune`` with dtype fp8block: block-scaled inputs (scales that differ per block), every
    candidate checked against the reference that dequantises block by block (none dropped), the
    entries keyed ``|block=128``; the crossover too, over the three strategies on block weights."""
    from densemoe.tuning.ops import make_routed_inputs, routed_reference

    (r,) = tune("routed", TINY_BLOCK, [3], dtypes=("fp8block",), device="cpu", timer=fake_timer, progress=False)
    assert r.problem.block == 128 and "|block=128|" in r.key and not r.failures and len(r.timings) >= 4
    assert cache.lookup(r.key)[1] == "cache"
    inputs = make_routed_inputs(r.problem, "cpu", seed=5)
    assert inputs.prepared.block == 128 and inputs.x_quant[1].shape == (4, 2)
    assert inputs.prepared.w1_block_scale.unique().numel() == inputs.prepared.w1_block_scale.numel()
    exact = routed_reference(inputs)
    wrong = inputs._replace(prepared=dataclasses_replace(inputs.prepared,
                                                         w1_block_scale=inputs.prepared.w1_block_scale.flip(0)))
    assert ((routed_reference(wrong) - exact).norm() / exact.norm()).item() > 0.1  # the blocks matter
    (s,) = tune("strategy", TINY_BLOCK, [3], dtypes=("fp8block",), device="cpu", timer=fake_timer, progress=False)
    assert s.problem.block == 128 and "|block=128|" in s.key and set(s.us) == {"skip", "dense", "routed"}, s.errors
