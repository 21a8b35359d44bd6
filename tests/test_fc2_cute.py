"""The CuTe DSL FC2 backend (sm_90a).

CPU (CI): config validity, backend selection and fallback, and the real kernel compiled for
sm_90a without a GPU (``CUTE_DSL_ARCH=sm_90a``) for several configs, cluster ones included,
with the PTX checked for the instructions the design relies on.
GPU (marker ``gpu``): results against the float64 reference, error bounded by PyTorch at the
same precision, over the FC2 shapes, ragged M, both dtypes, pinned variants and graph replay.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

import pytest
import torch

import densemoe
from densemoe import Fc2CuteConfig, Fc2Problem
from densemoe.kernels.cute import fc2_sm90
from densemoe.kernels.cute.fc2_sm90 import can_implement
from densemoe.ops.fc2 import which_backend
from densemoe.ops.fc2_configs import cute_preferred, default_cute_config
from densemoe.reference import fc2_ref
from _helpers import FP8, assert_close_to_torch, cute_dump_dir, dtype_id, errors, make_inputs, seed_of

C = Fc2CuteConfig
BF16 = torch.bfloat16


@pytest.fixture
def seed(request):
    return seed_of(request.node.nodeid)


def problem(M=16, N=7168, E=256, I=256, dtype=FP8, out_dtype=BF16):
    return Fc2Problem(M, N, E, I, dtype, out_dtype)


# ---------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("cfg, reason", [
    (C(tile_n=96), "tile_n"),
    (C(tile_n=64, consumers=2), "tile_n"),
    (C(tile_m=8), "tile_m"),
    (C(tile_m=24), "tile_m"),
    (C(tile_k=64), "128 or 256 bytes"),
    (C(consumers=3), "consumers"),
    (C(cluster_n=4), "cluster"),
    (C(cluster_m=5), "cluster"),
    (C(tile_n=128, cluster_m=3), "multiple of 8"),
    (C(acc_buffers=3), "acc_buffers"),
    (C(tile_n=128, tile_m=128, consumers=1), "registers"),
    (C(stages=1), "stages"),
    (C(tile_n=256, tile_m=64, consumers=2, stages=8), "shared memory"),
    (C(ctas=3, cluster_n=2), "multiple of the cluster size"),
    (C(swap_ab=2), "swap_ab"),
    (C(lockstep=2), "lockstep"),
    (C(tile_n=128, tile_m=64, consumers=2, swap_ab=0), "64 * consumers"),
    (C(tile_n=48, tile_m=64, swap_ab=0), "multiple of 32"),
    (C(tile_n=256, tile_m=128, consumers=2, swap_ab=0), "registers"),
    (C(tile_n=192, tile_m=64, acc_buffers=2, swap_ab=0), "registers"),
    (C(promote=2), "promote"),
    (C(promote=1, acc_buffers=2), "acc_buffers=1"),
])
def test_can_implement_rejects(cfg, reason):
    ok, why = can_implement(problem(), cfg)
    assert not ok and reason in why


def test_can_implement_allows_clusters_up_to_eight():
    assert can_implement(problem(), C(tile_n=64, tile_m=16, cluster_n=2, cluster_m=4))[0]
    assert can_implement(problem(), C(tile_n=192, tile_m=128, tile_k=128, consumers=2, cluster_n=2,
                                      cluster_m=4, swap_ab=0))[0]


@pytest.mark.parametrize("units_per_tile, tiles, clusters", [(256, 76, 66), (24, 16, 132), (24, 160, 7), (8, 3, 3)])
def test_lockstep_rotation_is_a_bijection_per_tile_and_in_phase(units_per_tile, tiles, clusters):
    E, U = units_per_tile, units_per_tile * tiles
    for t in range(tiles):
        assert sorted(fc2_sm90.lockstep_expert(u, U, clusters, E) for u in range(t * E, (t + 1) * E)) == list(range(E))
    # every cluster meets expert j at its j-th unit, except in a tile that started in an earlier slice
    for c in range(clusters):
        u0, u1 = c * U // clusters, (c + 1) * U // clusters
        first_full = -(-u0 // E) * E
        assert all(fc2_sm90.lockstep_expert(u, U, clusters, E) == (u - u0) % E for u in range(first_full, u1))


def test_can_implement_k_tile_must_divide_expert():
    ok, why = can_implement(problem(I=384), C(tile_k=256))
    assert not ok and "does not divide I" in why
    assert can_implement(problem(I=384), C(tile_k=128))[0]


def test_promote_rules_and_strings():
    """promote=1 is fp8 only, with the one temporary; strings written before the field parse
    to promote=0; fp8's default config and every fp8 CuTe tactic of the space promote."""
    from densemoe.tuning.space import cute_space
    assert "fp8 inputs" in can_implement(problem(dtype=BF16), C(tile_k=64, promote=1))[1]
    assert can_implement(problem(), C(promote=1))[0]
    old = "cute:tile_n=128,tile_m=16,tile_k=128,stages=0,consumers=2,acc_buffers=1,cluster_n=1,cluster_m=1,ctas=0,swap_ab=1,lockstep=0"
    assert C.from_str(old).promote == 0
    cfg = C(tile_n=128, tile_m=32, promote=1)
    assert C.from_str(cfg.to_str()) == cfg and cfg.to_str().endswith(",promote=1")
    for M in (1, 100, 300):
        for dt in (FP8, BF16):
            p = problem(M, 2048, 128, 768, dtype=dt)
            space = cute_space(p)
            assert space and all(c.promote == (dt == FP8) for c in space)
            assert all(c.acc_buffers == 1 for c in space if c.promote)


def test_two_temporaries_need_room_for_two_experts():
    ok, why = can_implement(problem(N=2048, E=128, I=768), C(tile_n=128, tile_m=32, tile_k=128, acc_buffers=2))
    assert not ok and "acc_buffers=2" in why


@pytest.mark.parametrize("M", (1, 7, 16, 33, 64, 96, 100, 128, 200, 512, 4096))
@pytest.mark.parametrize("dtype", (FP8, BF16), ids=dtype_id)
@pytest.mark.parametrize("nei", [(7168, 256, 256), (7168, 256, 512), (2048, 128, 768), (4096, 8, 7168)])
def test_default_config_valid_and_deterministic(M, dtype, nei):
    p = problem(M, *nei, dtype=dtype)
    cfg = default_cute_config(p)
    assert can_implement(p, cfg)[0]
    assert cfg.promote == (dtype == FP8)  # fp8 promotes each k-tile (the Triton FC2's precision)
    assert default_cute_config(p) == cfg
    assert C.from_str(cfg.to_str()) == cfg


NOISE = 1.03  # the band inside which either backend may be picked (ops/fc2_configs.py, CUTE_WINS)


def default_times(records):
    """{(shape, dtype, M, backend): us of that backend's default config} from benchmark records:
    a record's own time when it ran the heuristic, its ``heuristic_us`` when it ran a tuned one;
    only records that asked for one backend (``requested``; older files: every record)."""
    us = {}
    for r in records:
        if r.get("requested", r["backend"]) not in ("triton", "cute"):
            continue
        t = r.get("heuristic_us") if r.get("tuned") else r.get("us")
        if t:
            us[(r["shape"], r["dtype"], r["M"], r["backend"])] = t
    return us


def test_measured_rule_matches_the_committed_benchmark():
    """The auto rule is the data: at every measured point where one backend's default was at
    least 3% faster than the other's in the committed run the table cites, that backend is picked."""
    import gzip
    import json
    from pathlib import Path

    from densemoe.ops.fc2_configs import CUTE_WINS_SOURCE
    from densemoe.shapes import SHAPES as MODEL_SHAPES

    data = json.loads(gzip.decompress((Path(__file__).resolve().parents[1] / CUTE_WINS_SOURCE).read_bytes()))
    us = default_times(data["records"])
    checked = 0
    for (shape, dt, M, be), t in us.items():
        if be != "cute" or (shape, dt, M, "triton") not in us:
            continue
        s = MODEL_SHAPES[shape]
        p = problem(M, s.fc2_nk[0], s.experts, s.inter, FP8 if dt == "fp8" else BF16)
        tri = us[(shape, dt, M, "triton")]
        if t * NOISE < tri:
            assert cute_preferred(p), (shape, dt, M, t, tri)
        elif tri * NOISE < t:
            assert not cute_preferred(p), (shape, dt, M, t, tri)
        checked += 1
    assert checked >= 70
    assert cute_preferred(problem(1000)) and not cute_preferred(problem(64))
    assert not cute_preferred(problem(96, N=4096, E=8, I=7168))  # Mixtral: not measured, Triton


def test_default_times_reads_tuned_and_untuned_records():
    recs = [dict(shape="s", dtype="fp8", M=8, backend="triton", requested="triton", tuned=True, us=9.0, heuristic_us=10.0),
            dict(shape="s", dtype="fp8", M=8, backend="cute", requested="cute", tuned=False, us=11.0),
            dict(shape="s", dtype="fp8", M=8, backend="cute", requested="auto", tuned=False, us=1.0),
            dict(shape="s", dtype="fp8", M=16, backend="triton", us=5.0)]  # an older file: no "requested"
    assert default_times(recs) == {("s", "fp8", 8, "triton"): 10.0, ("s", "fp8", 8, "cute"): 11.0,
                                   ("s", "fp8", 16, "triton"): 5.0}


# ---------------------------------------------------------------------------------- selection

def test_backend_cute_on_cpu_raises_clearly(seed):
    a, w, alpha = make_inputs(7, 64, 2, 128, BF16, seed)
    with pytest.raises(ValueError, match="backend='cute' cannot run this call: .*CUDA"):
        densemoe.fc2(a, w, alpha, backend="cute")


def test_auto_falls_back_to_triton_on_cpu(seed):
    a, w, alpha = make_inputs(7, 64, 2, 128, BF16, seed)
    out = torch.empty(7, 64, dtype=BF16)
    assert which_backend(a, w, alpha, out)[0] == "triton"
    got = densemoe.fc2(a, w, alpha)
    ref = fc2_ref(a, w, alpha, torch.float64)
    assert (got.double() - ref).abs().max() < 1e-2 * ref.abs().max()


def test_bad_backend_and_config_mismatch(seed):
    a, w, alpha = make_inputs(7, 64, 2, 128, BF16, seed)
    with pytest.raises(ValueError, match="backend must be one of"):
        densemoe.fc2(a, w, alpha, backend="cutlass")
    with pytest.raises(ValueError, match="is a cute config but backend='triton'"):
        densemoe.fc2(a, w, alpha, config=C(tile_k=64), backend="triton")
    with pytest.raises(ValueError, match="cannot run this problem"):
        densemoe.fc2(a, w, alpha, config=C(tile_k=32))
    with pytest.raises(TypeError, match="Fc2TritonConfig or Fc2CuteConfig"):
        densemoe.fc2(a, w, alpha, config="tile_n=128")


# ---------------------------------------------------------------------------------- compile (no GPU)

COMPILE_CASES = [
    (C(tile_n=128, tile_m=16, tile_k=256, acc_buffers=2, cluster_n=2), FP8, (7168, 256, 256)),
    (C(tile_n=64, tile_m=64, tile_k=128), FP8, (7168, 256, 256)),
    (C(tile_n=128, tile_m=128, tile_k=256, consumers=2, cluster_m=2), FP8, (7168, 256, 256)),
    (C(tile_n=256, tile_m=32, tile_k=128, consumers=2, cluster_n=2), FP8, (2048, 128, 768)),
    (C(tile_n=128, tile_m=32, tile_k=64, acc_buffers=2), BF16, (7168, 256, 256)),
    (C(tile_n=64, tile_m=96, tile_k=128), BF16, (4096, 8, 7168)),
    (C(tile_n=192, tile_m=128, tile_k=128, consumers=2, cluster_m=2, swap_ab=0), FP8, (7168, 256, 256)),
    (C(tile_n=128, tile_m=64, tile_k=64, acc_buffers=2, cluster_n=2, swap_ab=0), BF16, (7168, 256, 256)),
    (C(tile_n=192, tile_m=128, tile_k=128, consumers=2, cluster_n=2, cluster_m=4, swap_ab=0), FP8, (7168, 256, 256)),
    (C(tile_n=128, tile_m=128, tile_k=128, consumers=2, cluster_m=2, swap_ab=0, lockstep=1), FP8, (7168, 256, 256)),
    (C(tile_n=192, tile_m=128, tile_k=128, consumers=2, cluster_m=3, swap_ab=0, lockstep=1), FP8, (7168, 256, 256)),
    # fp8 promoted per k-tile: swapped with a token-tile cluster, and tokens as wgmma's M
    (C(tile_n=128, tile_m=32, tile_k=128, consumers=2, cluster_m=2, promote=1), FP8, (2048, 128, 768)),
    (C(tile_n=128, tile_m=128, tile_k=128, consumers=2, swap_ab=0, lockstep=1, promote=1), FP8, (7168, 256, 256)),
]


@pytest.fixture
def cute_env(tmp_path):
    """This test's own directory for the PTX the compile keeps (see ``_helpers.cute_dump_dir``)."""
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed (pip install -e '.[dev]')")
    assert "ptx" in os.environ.get("CUTE_DSL_KEEP", ""), "tests/conftest.py sets the CuTe dump env"
    with cute_dump_dir(tmp_path) as dump:
        yield dump


@pytest.mark.cute_compile
@pytest.mark.parametrize("cfg, dtype, nei", COMPILE_CASES, ids=lambda x: x.to_str()[5:] if isinstance(x, C) else None)
def test_compiles_for_sm90a(cute_env, cfg, dtype, nei):
    _DUMP = cute_env
    N, E, I = nei
    assert can_implement(problem(1, N, E, I, dtype), cfg)[0]
    for f in glob.glob(os.path.join(_DUMP, "*.ptx")):
        os.remove(f)
    fc2_sm90.compile_fc2.cache_clear()
    fn = fc2_sm90.compile_fc2(cfg, dtype, BF16, N, E, I)
    assert callable(fn)
    ptx_files = glob.glob(os.path.join(_DUMP, "*.ptx"))
    assert len(ptx_files) == 1, ptx_files
    ptx = open(ptx_files[0]).read()
    assert ".target sm_90a" in ptx
    ab = "e4m3.e4m3" if dtype == FP8 else "bf16.bf16"
    wg_n = cfg.tile_m if cfg.swap_ab else cfg.tile_n  # tokens are wgmma's N only when swapped
    assert f"wgmma.mma_async.sync.aligned.m64n{wg_n}k" in ptx and ab in ptx
    assert "cp.async.bulk.tensor.2d" in ptx
    assert ("multicast::cluster" in ptx) == (cfg.cluster_size > 1)
    assert "setmaxnreg.inc" in ptx and "setmaxnreg.dec" in ptx
    assert "red.relaxed.gpu.global.add.f32" in ptx  # split tiles reduce in the workspace
    assert "atom.global.acq_rel" in ptx  # the last CTA of a split tile is found by a counter
    assert ".local" not in ptx  # nothing spilled to local memory at the PTX level
    waits = {int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)}
    if cfg.promote:
        # each k-tile's group is waited for before its add, and its first k-block overwrites
        # the temporary (scale-d from a zero predicate), so no zero-fill feeds a wgmma
        assert waits == {0}, waits
        assert re.search(r"mov\.b32\s+%r\d+, 0;\s*\n(?:.*\n){0,12}?\s*setp\.ne\.b32\s+p, %r\d+, 0;\s*\n\s*wgmma", ptx)
    elif cfg.acc_buffers == 2 or I // cfg.tile_k > 1:
        assert 1 in waits, waits  # one expert's (or k-tile's) group stays in flight


# ---------------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
SHAPES = {"deepseek-v3-tp8": (7168, 256, 256), "qwen3-30b-a3b": (2048, 128, 768)}


def _gpu_helpers():
    from test_fc2_gpu import gpu_inputs, torch_same_precision
    return gpu_inputs, torch_same_precision


@gpu
@pytest.mark.parametrize("dtype", (FP8, BF16), ids=dtype_id)
@pytest.mark.parametrize("M", (1, 7, 96, 100, 256, 1000))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cute_model_shapes(shape, M, dtype, request):
    from test_fc2_gpu import check_model_shape
    check_model_shape(SHAPES[shape], M, dtype, seed_of(request.node.nodeid), backend="cute")


GPU_CONFIGS = [
    C(128, 16, 256, acc_buffers=2, cluster_n=2),
    C(64, 32, 256, cluster_n=2),
    C(64, 64, 128, acc_buffers=2, ctas=6, cluster_n=2),  # few CTAs: every tile cut
    C(128, 128, 256, consumers=2, cluster_m=2),
    C(256, 64, 128, consumers=2, cluster_n=2, cluster_m=1),
    C(64, 96, 256, ctas=7),
    C(128, 32, 128, acc_buffers=2, cluster_m=2, ctas=10),
    C(192, 128, 128, consumers=2, cluster_m=2, swap_ab=0),  # tokens as wgmma M
    C(128, 64, 128, acc_buffers=2, ctas=10, swap_ab=0),
    C(128, 128, 128, consumers=2, cluster_n=2, swap_ab=0),
    C(128, 128, 128, consumers=2, cluster_n=2, cluster_m=2, swap_ab=0),
    C(192, 128, 128, consumers=2, cluster_m=4, swap_ab=0),
    C(64, 16, 256, cluster_m=4, ctas=16),  # 4 token tiles (M=100) in lock step
    C(64, 32, 256, lockstep=1),  # rotated expert order; at M=7 slices are shorter than a tile
    C(128, 128, 128, consumers=2, cluster_m=2, ctas=14, swap_ab=0, lockstep=1),
    C(192, 128, 128, consumers=2, cluster_m=3, swap_ab=0, lockstep=1),  # 3-CTA clusters
]


def _pinned(cfg, dtype):
    """The pinned config for this dtype: the same k-tile bytes (tile_k halves for bf16)."""
    return dataclasses.replace(cfg, tile_k=cfg.tile_k if dtype == FP8 else cfg.tile_k // 2)


@pytest.mark.parametrize("dtype", (FP8, BF16), ids=dtype_id)
def test_gpu_pinned_configs_are_valid(dtype):
    """CPU guard for the GPU list below: a pinned config that can_implement rejects would
    only show up as a GPU failure."""
    for cfg in GPU_CONFIGS:
        for M in (7, 100, 300):
            ok, why = can_implement(problem(M, 1000, 24, 256, dtype), _pinned(cfg, dtype))
            assert ok, (cfg, why)


@gpu
@pytest.mark.parametrize("dtype", (FP8, BF16), ids=dtype_id)
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: c.to_str()[5:].replace(",", "|"))
@pytest.mark.parametrize("M", (7, 100, 300))
def test_cute_pinned_configs(cfg, M, dtype, request):
    gpu_inputs, torch_same_precision = _gpu_helpers()
    N, E, I = 1000, 24, 256  # ragged N; 24 experts so the work list cuts tiles unevenly
    cfg = _pinned(cfg, dtype)
    a, w, alpha = gpu_inputs(M, N, E, I, dtype, seed_of(request.node.nodeid), "zero_col")
    ref = fc2_ref(a, w, alpha, torch.float64)
    base = torch_same_precision(a, w, alpha).to(BF16)
    out = torch.full((M, N), float("nan"), dtype=BF16, device="cuda")
    densemoe.fc2(a, w, alpha, out=out, config=cfg)
    assert_close_to_torch(out.cpu(), ref.cpu(), base.cpu())


PROMOTE_CONFIGS = [
    C(tile_n=128, tile_m=32, tile_k=128, consumers=2, promote=1),
    C(tile_n=64, tile_m=16, tile_k=256, ctas=6, promote=1),  # few CTAs: tiles cut, reduced in the workspace
    C(tile_n=128, tile_m=128, tile_k=128, consumers=2, swap_ab=0, lockstep=1, promote=1),
    C(tile_n=192, tile_m=128, tile_k=128, consumers=2, cluster_m=2, swap_ab=0, promote=1),
]


@gpu
@pytest.mark.parametrize("M", (1, 37, 300))
@pytest.mark.parametrize("cfg", PROMOTE_CONFIGS, ids=lambda c: c.to_str()[5:].replace(",", "|"))
def test_cute_fp8_promote_matches_cublas_without_fast_accumulation(cfg, M, request):
    """promote=1, fp32 output, I = 768 (Qwen3-30B-A3B's: 6 k-tiles of 128 an expert): within
    1.1x the error of cuBLAS FP8 without fast accumulation (per-k-tile sums added in fp32, as
    here) plus 1e-6, against the float64 reference; the output poisoned. The inputs must tell
    that precision from fast accumulation (else this test could not fail for a kernel that did
    not promote), and the same tile without promotion is held to the fast pipeline's bound."""
    from test_fc2_gpu import gpu_inputs, torch_same_precision
    N, E, I = 1000, 4, 768
    a, w, alpha = gpu_inputs(M, N, E, I, FP8, seed_of(request.node.nodeid), "dense")
    assert can_implement(problem(M, N, E, I, FP8, torch.float32), cfg)[0]
    ref = fc2_ref(a, w, alpha, torch.float64)
    precise = errors(torch_same_precision(a, w, alpha, fast=False), ref)[0]
    fast = errors(torch_same_precision(a, w, alpha, fast=True), ref)[0]
    out = torch.full((M, N), float("nan"), dtype=torch.float32, device="cuda")
    densemoe.fc2(a, w, alpha, out=out, config=cfg)
    assert torch.isfinite(out).all()
    got = errors(out, ref)[0]
    assert got <= 1.1 * precise + 1e-6, (got, precise, fast)
    assert fast > 1.1 * precise + 1e-6, (fast, precise)
    plain = torch.full((M, N), float("nan"), dtype=torch.float32, device="cuda")
    densemoe.fc2(a, w, alpha, out=plain, config=dataclasses.replace(cfg, promote=0))
    assert errors(plain, ref)[0] <= 1.5 * fast + 1e-6, (errors(plain, ref)[0], fast)


@gpu
def test_cute_cuda_graph_replay_with_new_inputs(request):
    from test_fc2_gpu import check_graph_replay
    # cut tiles: the workspace memset is captured too
    check_graph_replay(96, 1024, 32, 256, request.node.nodeid, config=C(64, 96, 256, ctas=20))


@gpu
def test_auto_with_expert_slices_below_a_cute_k_tile_runs_triton(request):
    # I = 32 fp8 (32 B per expert): no CuTe config fits; "auto" must take Triton, not fail
    gpu_inputs, torch_same_precision = _gpu_helpers()
    a, w, alpha = gpu_inputs(7, 256, 8, 32, FP8, seed_of(request.node.nodeid))
    out = torch.full((7, 256), float("nan"), dtype=BF16, device="cuda")
    assert which_backend(a, w, alpha, out)[0] == "triton"
    densemoe.fc2(a, w, alpha, out=out)
    assert_close_to_torch(out.cpu(), fc2_ref(a, w, alpha, torch.float64).cpu(),
                          torch_same_precision(a, w, alpha).to(BF16).cpu())


@gpu
def test_auto_picks_cute_where_measured_faster(request, monkeypatch):
    monkeypatch.setenv("DENSEMOE_TUNED", "0")  # the measured rule itself, not a tuned table
    gpu_inputs, _ = _gpu_helpers()
    a, w, alpha = gpu_inputs(512, 7168, 256, 256, FP8, seed_of(request.node.nodeid))
    out = torch.empty(512, 7168, dtype=BF16, device="cuda")
    assert which_backend(a, w, alpha, out)[0] == "cute"
    assert which_backend(a[:128], w, alpha[:128], out[:128])[0] == "triton"
    # strided a cannot take TMA in the CuTe kernel: auto falls back, forcing raises
    wide = torch.empty(512, a.shape[1] + 16, dtype=FP8, device="cuda")
    wide[:, :a.shape[1]] = a
    a_strided = wide[:, :a.shape[1]]
    assert which_backend(a_strided, w, alpha, out)[0] == "triton"
    with pytest.raises(ValueError, match="backend='cute' cannot run this call: a must be contiguous"):
        densemoe.fc2(a_strided, w, alpha, backend="cute")
