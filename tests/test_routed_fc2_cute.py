"""The CuTe DSL routed FC2 (``kernels/cute/routed_fc2_sm90.py``) and ``RoutedConfig.fc2_cute``.

CPU (CI): the config rules; the kernel compiled for sm_90a without a GPU, fp8 and bf16, both
tiles of H, with the PTX checked for what the design relies on (y and w2 through TMA, no
cp.async; fp8: one wgmma wait a k-tile); the field, its string, its rules and the space; the
fallback off Hopper. GPU (marker ``gpu``): the kernel's rows against float64 within 1.1x the
Triton FC2's error on the same y, every valid pair's row written; the whole routed path with FC2
(and FC1) on CuTe within the routed GPU tests' torch bound.
"""

import glob
import os
import re

import pytest
import torch

from densemoe.kernels.cute import routed_fc2_sm90 as rc
from densemoe.kernels.cute.routed_fc2_sm90 import RoutedFc2CuteConfig as C
from densemoe.kernels.triton import routed as kern
from _helpers import FP8, cute_dump_dir

BF16 = torch.bfloat16
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_gpu = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and TRITON_INTERPRET unset")


@pytest.mark.parametrize("cfg, dtype, group, why", [
    (C(tile_n=256), FP8, 128, "64 or 128"),
    (C(tile_m=32), FP8, 128, "tile_m=32"),
    (C(cols=3), FP8, 128, "cols=3"),
    (C(cols=2, tile_k=64), BF16, 64, "cols=2"),
    (C(tile_k=256), FP8, 256, "128 bytes"),
    (C(tile_k=128), BF16, 128, "128 bytes"),
    (C(), FP8, 64, "scale group"),
    (C(), torch.float16, 128, "input dtype"),
    (C(ctas=-1), FP8, 128, "ctas"),
    (C(stages=40), FP8, 128, "shared memory"),
])
def test_can_implement_rejects(cfg, dtype, group, why):
    ok, msg = rc.can_implement(2048, 128, 768, dtype, group, cfg)
    assert not ok and why in msg, msg


def test_can_implement_shapes_and_registers():
    assert rc.can_implement(2048, 128, 768, FP8, 128, C())[0]
    assert rc.can_implement(7168, 256, 256, BF16, 128, C(tile_n=64, tile_k=64))[0]  # bf16: no scale group
    assert "does not divide H" in rc.can_implement(2048 + 64, 128, 768, FP8, 128, C())[1]
    assert rc.can_implement(2048 + 128, 128, 768, FP8, 128, C())[0]  # two column tiles a unit: 256 columns
    assert "does not divide H" in rc.can_implement(2048 + 128, 128, 768, FP8, 128, C(cols=2))[1]
    assert C(cols=2).acc_regs(FP8) == 192 and C(cols=2).stage_bytes(FP8) == (128 + 2 * 128) * 128
    assert "does not divide I" in rc.can_implement(2048, 128, 704, FP8, 128, C())[1]
    assert "32-bit" in rc.can_implement(7168, 256, 256, FP8, 128, C(), pairs=400000)[1]
    assert C().acc_regs(FP8) == 128 and C().acc_regs(BF16) == 64 and C(tile_n=64).acc_regs(FP8) == 64
    assert rc.max_tiles(1000, 8) == min(1000, (1000 + 8 * 127) // 128)
    assert rc.max_tiles(1000, 8, 64) == min(1000, (1000 + 8 * 63) // 64)
    assert C(tile_m=64).stage_bytes(FP8) == (64 + 128) * 128 and C().stage_bytes(FP8) == (128 + 128) * 128


COMPILE = [(C(), FP8), (C(tile_n=64), FP8), (C(tile_k=64), BF16), (C(tile_n=64, tile_k=64, stages=3), BF16),
           (C(tile_m=64), FP8), (C(tile_m=64, tile_k=64), BF16), (C(ahead=False), FP8),
           (C(tile_m=64, ahead=False), FP8), (C(cols=2), FP8), (C(cols=2, tile_m=64), FP8)]


@pytest.mark.cute_compile
@pytest.mark.parametrize("cfg, dtype", COMPILE, ids=lambda v: v.to_str().split(":")[1] if isinstance(v, C) else str(v))
def test_compiles_for_sm90a(tmp_path, cfg, dtype):
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed (pip install -e '.[dev]')")
    with cute_dump_dir(tmp_path) as dump:
        rc.compile_routed_fc2.cache_clear()
        fn = rc.compile_routed_fc2(cfg, dtype, 7168, 256, 256)
        assert rc.compile_routed_fc2(cfg, dtype, 7168, 256, 256) is fn
        (path,) = glob.glob(os.path.join(dump, "*.ptx"))
        ptx = open(path).read()
    assert ".target sm_90a" in ptx
    ab = "e4m3.e4m3" if dtype == FP8 else "bf16.bf16"
    assert f"wgmma.mma_async.sync.aligned.m64n{cfg.tile_n}k{32 if dtype == FP8 else 16}.f32.{ab}" in ptx
    # y's tile and w2's (one a column tile of the unit): no gather
    assert ptx.count("cp.async.bulk.tensor.2d.shared::cta.global") == 1 + cfg.cols
    assert ptx.count("wgmma.mma_async") == cfg.cols * cfg.tile_k // (32 if dtype == FP8 else 16)  # a k-tile's
    assert "cp.async.ca" not in ptx and "cp.async.cg" not in ptx
    waits = {int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)}
    assert waits == ({0} if dtype == FP8 else {0, 1}), waits
    # the rows' stores: a thread's two adjacent columns at once (tile_n / 4 a unit: 2 rows x tile_n / 8 pairs)
    stores = re.findall(r"st\.global(?:\.[a-z0-9]+)*", ptx)
    assert stores and set(stores) == {"st.global.b32"} and len(stores) == cfg.cols * cfg.tile_n // 4, stores
    assert ".local" not in ptx
    # units of 64 rows: one 64-row wgmma atom a warpgroup, and the two warpgroups' hand-over on
    # named barriers 1 and 2 (bar.sync / bar.arrive of 256 threads, the id in a register)
    handover = re.findall(r"bar(?:rier)?\.(?:sync|arrive)(?:\.aligned)?\s+\S+,\s*256;", ptx)
    assert bool(handover) == (cfg.tile_m == 64), handover


# ---------------------------------------------------------------------------------- in the routed path

def _problem(M, dtype=FP8, block=0, h=2048, e=128, i=768):
    from densemoe.kernels.common import RoutedProblem

    return RoutedProblem(M, h, e, i, 8, dtype, BF16, block)


def _cfg(**kw):
    base = dict(block_m=64, fc1_block_i=128, fc1_block_k=128, fc2_block_n=128, fc2_block_k=128, programs_per_sm=2,
                fc2_cute=True)
    return kern.RoutedConfig(**{**base, **kw})


def test_fc2_cute_field_string_and_rules():
    from densemoe.ops import routed_configs

    cfg = _cfg()
    assert kern.RoutedConfig.from_str(cfg.to_str()) == cfg and "fc2:cute-n128k128" in cfg.short()
    old = cfg.to_str().rsplit(",", 4)[0]  # before fc2_cute (and the three fields after it)
    assert kern.RoutedConfig.from_str(old) == kern.RoutedConfig(**{**cfg.__dict__, "fc2_cute": False})
    assert routed_configs.can_implement(_problem(4096), cfg)[0]
    assert routed_configs.can_implement(_problem(4096), _cfg(fc1_cute=True))[0]
    for kw in (dict(fc2_swap_ab=True), dict(fused_combine=True), dict(atomic_combine=True), dict(fc2_col_groups=2),
               dict(fc2_col_major=True), dict(fc2_y_tma=True), dict(flatten=True), dict(fc2_warps=8),
               dict(fc2_block_n=512)):
        ok, msg = routed_configs.can_implement(_problem(4096), _cfg(**kw))
        assert not ok and "fc2_cute" in msg, (kw, msg)
    # fp8's 256 columns a unit: two column tiles of 128 (the kernel's cols 2); not bf16
    wide = _cfg(fc2_block_n=256)
    assert routed_configs.can_implement(_problem(4096), wide)[0] and "fc2:cute-n256" in wide.short()
    assert (routed_configs.cute_fc2_config(wide).tile_n, routed_configs.cute_fc2_config(wide).cols) == (128, 2)
    assert routed_configs.cute_fc2_config(cfg).cols == 1
    ok, msg = routed_configs.can_implement(_problem(4096, dtype=BF16), _cfg(fc2_block_n=256, fc1_block_k=64,
                                                                            fc2_block_k=64))
    assert not ok and "fc2_cute" in msg, msg
    ok, msg = routed_configs.can_implement(_problem(4096, h=2048 + 128), wide)  # H a multiple of 128, not of 256
    assert not ok and "does not divide H" in msg, msg
    # the CuTe FC2's units: fc2_block_m rows, or block_m's; 64 or 128
    assert routed_configs.cute_fc2_config(cfg).tile_m == 64
    assert routed_configs.cute_fc2_config(_cfg(block_m=128)).tile_m == 128
    assert routed_configs.cute_fc2_config(_cfg(block_m=32, fc2_block_m=128)).tile_m == 128
    assert routed_configs.can_implement(_problem(4096), _cfg(block_m=32, fc2_block_m=64))[0]
    ok, msg = routed_configs.can_implement(_problem(4096), _cfg(block_m=32))
    assert not ok and "fc2_cute" in msg and "units' rows" in msg, msg
    # fp8: FC2's k-tile is y's scale group (FC1's tile of I)
    ok, msg = routed_configs.can_implement(_problem(4096), _cfg(fc1_block_i=256))
    assert not ok and "scale group" in msg, msg
    ok, msg = routed_configs.can_implement(_problem(4096, block=128), _cfg())
    assert not ok and "block-scaled" in msg, msg


def test_space_and_fallback(monkeypatch):
    from densemoe.ops import routed_configs
    from densemoe.tuning import cache
    from densemoe.tuning.space import routed_space

    # in the space from 32 rows an expert, units of 64 and 128 rows; not with block-scaled weights
    assert not any(c.fc2_cute for c in routed_space(_problem(64)))
    big = [c for c in routed_space(_problem(4096)) if c.fc2_cute]
    assert 0 < len(big) <= 12 and {routed_configs.cute_fc2_config(c).tile_m for c in big} == {64, 128}
    assert {routed_configs.cute_fc2_config(c).cols for c in big} == {1, 2}
    assert {c.fc2_block_n for c in routed_space(_problem(4096, dtype=BF16)) if c.fc2_cute} == {128}
    assert all(routed_configs.can_implement(_problem(4096), c)[0] for c in big)
    assert not any(c.fc2_cute for c in routed_space(_problem(4096, block=128)))
    cfg = _cfg(fc1_cute=True)
    entry = {"best": {"backend": "triton", "config": cfg.to_str(), "us": 1.0}}
    monkeypatch.setattr(cache, "lookup_or_autotune", lambda key, problem, device: (entry, "shipped"))
    monkeypatch.setenv("DENSEMOE_TUNED", "1")
    ch = routed_configs.choose(_problem(4096), "cpu")  # no "no_cute" slot: the default rule here
    assert ch.config == routed_configs.default_config(_problem(4096)) and ch.source == "heuristic"
    entry["no_cute"] = {"backend": "triton", "config": _cfg(fc2_cute=False).to_str(), "us": 2.0}
    assert routed_configs.choose(_problem(4096), "cpu").config == _cfg(fc2_cute=False)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.xdist_group("cute_fc2_big")  # model-shape weights and float64 references: one worker (memory)
@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("M", [1, 100, 2048])
@pytest.mark.parametrize("dtype, tile_n, tile_m, ahead, cols", [
    (dt, *v, 1) for dt in ("fp8", "bf16") for v in ((128, 128, True), (64, 128, True), (128, 64, True), (128, 64, False))
] + [("fp8", 128, 128, True, 2), ("fp8", 128, 64, True, 2)])  # two column tiles a unit: fp8 only
def test_routed_fc2_cute_rows_on_model_shapes(shape, dtype, M, tile_n, tile_m, ahead, cols):
    """The CuTe FC2's rows (from the Triton FC1's y) against float64, within 1.1x the Triton
    FC2's rows' error; the rows poisoned, every valid pair's written; units of 128 rows (both
    warpgroups) and of 64 (each warpgroup its own), the units' indices loaded ahead or not, and
    (fp8) two column tiles a unit."""
    from test_routed_gpu import _case

    from densemoe.kernels.common import max_tiles
    from densemoe.quant import quantize_per_token
    from densemoe.weights import prepare_weights

    w13, w2, x, ids, wts = _case(shape, M, M + 31)
    pw = prepare_weights(w13, w2, dtype=dtype)
    E, k = pw.num_experts, ids.shape[1]
    I, H = pw.inter, pw.hidden
    P = M * k
    xq, sx = quantize_per_token(x) if pw.dtype == FP8 else (x, None)
    srt = torch.empty(P, dtype=torch.int32, device="cuda")
    off = torch.empty(E + 1, dtype=torch.int32, device="cuda")
    kern.schedule_launch(ids.contiguous(), E, srt, off)
    bk = 128 if dtype == "fp8" else 64
    fp8 = pw.dtype == FP8
    y = torch.empty(P, I, dtype=FP8 if fp8 else BF16, device="cuda")
    ys = torch.empty(P, I // 128, device="cuda") if fp8 else None
    tcfg = kern.RoutedConfig(block_m=64, fc1_block_i=128, fc1_block_k=bk, fc2_block_n=tile_n, fc2_block_k=bk)
    kern.fc1_launch(xq, pw.w1, pw.alpha1, sx, srt, off, y, ys, k, tcfg)
    tw = wts.to(torch.float32).contiguous().reshape(-1)
    tiles = torch.empty(max_tiles(P, E, tile_m), 2, dtype=torch.int32, device="cuda")
    count = torch.empty(1, dtype=torch.int32, device="cuda")
    kern.tile_list_launch(off, E, tile_m, tiles, count)
    rows = torch.full((P, H), float("nan"), dtype=BF16, device="cuda")
    rc.routed_fc2_cute(y, ys, pw.w2, pw.w2_scale, tw, srt, off, tiles, count, rows,
                       C(tile_n=tile_n, tile_k=bk, tile_m=tile_m, ahead=ahead, cols=cols))
    rows_t = torch.full_like(rows, float("nan"))
    kern.fc2_launch(y, ys, pw.w2, pw.w2_scale, srt, off, tw, rows_t, 128, tcfg, k)
    torch.cuda.synchronize()
    assert not rows.float().isnan().any(), "a pair's row unwritten"
    # float64 of the same products: y dequantised as stored, w2 and the scales exact
    yd = y.double() * (ys.double().repeat_interleave(128, 1) if fp8 else 1.0)
    ref = torch.zeros(P, H, dtype=torch.float64, device="cuda")
    o = off.tolist()
    for e in range(E):
        if o[e + 1] > o[e]:
            pairs = srt[o[e]:o[e + 1]].long()
            ref[pairs] = (yd[o[e]:o[e + 1]] @ pw.w2[:, e * I:(e + 1) * I].double().T
                          * float(pw.w2_scale[e]) * tw[pairs].double()[:, None])
    err = ((rows.double() - ref).norm() / ref.norm()).item()
    err_t = ((rows_t.double() - ref).norm() / ref.norm()).item()
    assert err <= 1.1 * err_t + 1e-6, (err, err_t)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.xdist_group("cute_fc2_big")  # model-shape weights and float64 references: one worker (memory)
@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("fc1_cute", [False, True])
@pytest.mark.parametrize("fc2_block_m", [0, 128])  # the CuTe FC2's units: block_m's 64 rows, or 128
def test_routed_experts_with_fc2_cute_on_model_shapes(shape, dtype, fc1_cute, fc2_block_m):
    _fc2_cute_on_model_shape(shape, dtype, fc1_cute, fc2_block_m, 128)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.xdist_group("cute_fc2_big")
@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("fc2_block_m", [0, 128])
def test_routed_experts_with_fc2_cute_two_column_tiles_a_unit(shape, fc2_block_m):
    """fp8's 256 columns a unit (the kernel's cols 2) through ``RoutedConfig``."""
    _fc2_cute_on_model_shape(shape, "fp8", False, fc2_block_m, 256)


def _fc2_cute_on_model_shape(shape, dtype, fc1_cute, fc2_block_m, fc2_block_n):
    import dataclasses

    from test_routed_gpu import _case, _within_torch

    from densemoe.ops.routed import routed_experts
    from densemoe.weights import prepare_weights

    M = 1000
    w13, w2, x, ids, wts = _case(shape, M, M + 41)
    pw = prepare_weights(w13, w2, dtype=dtype)
    bk = 128 if dtype == "fp8" else 64
    cfg = _cfg(fc1_block_k=bk, fc2_block_k=bk, fc1_cute=fc1_cute, fc2_block_m=fc2_block_m, fc2_block_n=fc2_block_n)
    out = routed_experts(x, pw, ids, wts, config=cfg)
    assert torch.isfinite(out).all()
    _within_torch(out, pw, x, ids, wts, cfg.fc1_block_i, True)
    plain = routed_experts(x, pw, ids, wts, config=dataclasses.replace(cfg, fc1_cute=False, fc2_cute=False,
                                                                       fc2_block_n=128))
    assert ((out.float() - plain.float()).norm() / plain.float().norm()).item() < 1e-2
