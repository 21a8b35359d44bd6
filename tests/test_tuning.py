"""The tuning layer: search space, M buckets, keys, the on-disk cache (round trip, corrupt and
stale files, two processes writing at once), lookups in ``fc2``, pinning, the heuristic, and the
tuner end to end (CPU: Triton's interpreter with an injected timer; GPU: the real timer)."""

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
from densemoe.tuning.buckets import bucket_range, m_bucket
from densemoe.tuning.space import fc2_space
from densemoe.tuning.ops import make_inputs
from densemoe.tuning.tuner import TOL, summary, tune, tune_problem
from _helpers import FP8

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
    assert {c.acc_buffers for c in cute} == {1, 2}
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

    def fake_tune(op, shape, ms, dtypes, backends, reps, save, compile_workers):
        seen.update(op=op, shape=shape, ms=ms, dtypes=dtypes, backends=backends, reps=reps, save=save,
                    compile_workers=compile_workers)
        p = Fc2Problem(8, 64, 4, 32, FP8, BF16)
        best = tuner.Timing(Fc2TritonConfig(16, 64, 32, 4, 2, True, True, 1, 1), 10.0)
        heur = tuner.Timing(Fc2TritonConfig(16, 32, 32, 4, 2, True, True, 1, 1), 12.5)
        return [tuner.TuneResult("k", p, best, {"triton": best}, heur, [], [best, heur])]
    monkeypatch.setattr(tuner, "tune", fake_tune)
    out = tmp_path / "t.md"
    assert cli.main(["tune", "--shape", "64,4,32", "--m", "1-8,100", "--dtypes", "fp8,bf16",
                     "--backends", "triton", "--reps", "7", "--no-save", "--out", str(out), "--compile-workers", "3"]) == 0
    assert seen == dict(op="fc2", shape=(64, 4, 32), ms=[1, 2, 4, 8, 100], dtypes=["fp8", "bf16"],
                        backends=("triton",), reps=7, save=False, compile_workers=3)
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

    data = json.loads((Path(__file__).resolve().parents[1] / "bench/results/fc2_h100_2026-11-26_large_m.json").read_text())
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
    assert ops == {"fc1", "fc2"}
