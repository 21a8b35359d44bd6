"""The CuTe DSL routed FC1 (``kernels/cute/routed_fc1_sm90.py``) and the tile list it reads.

CPU (CI): the tile list kernel (Triton, through the interpreter) against its torch twin on
ragged, skewed and empty routings; the config rules; the kernel compiled for sm_90a without a GPU
(``CUTE_DSL_ARCH=sm_90a``), fp8 and bf16, both tiles of I and both k-tiles, with the PTX checked
for what the design relies on (x, gate and up through TMA; fp8: one wgmma wait a product, the
quad's amax by two butterfly shuffles, NaN-keeping max and clamp).
GPU (marker ``gpu``): on both model shapes, uniform routing, M = 1 ... 2048, y and its scales
poisoned: every valid row written, the error against float64 within 1.1x the Triton routed FC1's
on the same inputs; a CUDA graph replayed with other routings gives an eager call's bits; x's
rows gathered by TMA (``gather``) give the sorted copy's bits, alone and in the routed path.
"""

import dataclasses
import glob
import os
import re

import pytest
import torch

from densemoe.kernels.cute import routed_fc1_sm90 as rc
from densemoe.kernels.cute.routed_fc1_sm90 import RoutedFc1CuteConfig as C
from densemoe.kernels.triton import routed as kern
from densemoe.reference import tile_list_ref
from _helpers import FP8, cute_dump_dir

BF16 = torch.bfloat16
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------- tile list

def _offsets(counts):
    return torch.tensor([0] + list(torch.tensor(counts).cumsum(0).tolist()), dtype=torch.int32)


@pytest.mark.skipif(not INTERPRET, reason="the CPU path: Triton's interpreter")
@pytest.mark.parametrize("counts", [[5, 0, 130, 128, 1], [0, 0, 0], [300], [0] * 7 + [257], [1] * 9,
                                    [128] * 3 + [129]])
def test_tile_list_is_its_twin(counts):
    off = _offsets(counts)
    E = len(counts)
    P = int(off[-1])
    n = rc.max_tiles(P, E)
    tiles = torch.full((n, 2), -7, dtype=torch.int32)
    count = torch.full((1,), -7, dtype=torch.int32)
    kern.tile_list_launch(off, E, rc.TILE_M, tiles, count)
    want = tile_list_ref(off, rc.TILE_M)
    assert int(count) == want.shape[0] <= n
    assert torch.equal(tiles[:want.shape[0]], want)
    assert (tiles[want.shape[0]:] == -7).all()  # nothing written past the list


def test_tile_list_rejects_other_dtypes():
    with pytest.raises(ValueError, match="int32"):
        kern.tile_list_launch(_offsets([3]), 1, 128, torch.zeros(1, 2, dtype=torch.int64),
                              torch.zeros(1, dtype=torch.int32))


def test_launchers_check_the_tile_list_they_read():
    """The CuTe routed kernels read each (expert, first row) of the list as one 8-byte load and
    the other schedule buffers as int32: a view off that alignment, another dtype or a list too
    short for the routing's worst case is refused before any launch (CPU: the check comes first)."""
    from densemoe.kernels.common import check_tile_list
    P, E = 300, 4
    n = rc.max_tiles(P, E)
    srt, off, cnt = (torch.zeros(P, dtype=torch.int32), torch.zeros(E + 1, dtype=torch.int32),
                     torch.zeros(1, dtype=torch.int32))
    good = torch.zeros(n, 2, dtype=torch.int32)
    check_tile_list(good, cnt, srt, off, P, E, rc.TILE_M)
    odd = torch.zeros(2 * n + 1, dtype=torch.int32)[1:].view(n, 2)  # contiguous, 4 bytes off
    for tiles, what in ((odd, "8-byte aligned"), (good[:-1], ">= "), (good.long(), "int32"), (good.t(), "contiguous")):
        with pytest.raises(ValueError, match="tiles must be"):
            check_tile_list(tiles, cnt, srt, off, P, E, rc.TILE_M)
    with pytest.raises(ValueError, match="offsets must be int32"):
        check_tile_list(good, cnt, srt, off[:-1], P, E, rc.TILE_M)
    with pytest.raises(ValueError, match="sorted_pairs must be int32"):
        check_tile_list(good, cnt, srt.long(), off, P, E, rc.TILE_M)


def test_max_tiles_bounds_every_routing():
    for counts in ([5, 0, 130, 128, 1], [300], [1] * 9, [127] * 4, [128] * 4):
        off = _offsets(counts)
        assert tile_list_ref(off, rc.TILE_M).shape[0] <= rc.max_tiles(int(off[-1]), len(counts))


# ---------------------------------------------------------------------------------- config rules

@pytest.mark.parametrize("cfg, dtype, out, why", [
    (C(tile_i=96), FP8, FP8, "64 or 128"),
    (C(tile_k=64), FP8, FP8, "128 or 256 bytes"),
    (C(tile_k=128), FP8, BF16, "y must be"),
    (C(tile_k=64), BF16, FP8, "y must be"),
    (C(), torch.float16, torch.float16, "input dtype"),
    (C(ctas=-1), FP8, FP8, "ctas"),
    (C(stages=40), FP8, FP8, "shared memory"),
])
def test_can_implement_rejects(cfg, dtype, out, why):
    ok, msg = rc.can_implement(2048, 128, 768, dtype, out, cfg)
    assert not ok and why in msg, msg


def test_can_implement_shapes_and_registers():
    assert rc.can_implement(2048, 128, 768, FP8, FP8, C())[0]
    assert rc.can_implement(7168, 256, 256, FP8, FP8, C(tile_k=256))[0]
    assert rc.can_implement(2048, 128, 768, BF16, BF16, C(tile_i=64, tile_k=64))[0]
    assert "does not divide I" in rc.can_implement(2048, 128, 192, FP8, FP8, C())[1]
    assert "does not divide H" in rc.can_implement(2048 + 64, 128, 768, FP8, FP8, C())[1]
    assert "32-bit" in rc.can_implement(7168, 256, 256, FP8, FP8, C(), pairs=400000)[1]
    # fp8: the gate and up accumulators and one temporary, 64 rows x tile_i over 128 threads each
    assert C().acc_regs(FP8) == 192 and C().acc_regs(BF16) == 128 and C(tile_i=64).acc_regs(FP8) == 96
    assert C().resolved_stages(FP8) == min(12, (rc.SMEM_BYTES - rc.SMEM_RESERVE) // ((128 + 256) * 128))


# ---------------------------------------------------------------------------------- sm_90a compile

COMPILE = [(C(), FP8, (2048, 128, 768)), (C(tile_i=64, tile_k=256), FP8, (7168, 256, 256)),
           (C(tile_k=64), BF16, (2048, 128, 768)), (C(tile_i=64, tile_k=128, stages=3), BF16, (7168, 256, 256)),
           (C(tile_m=64), FP8, (7168, 256, 256)), (C(tile_m=64, tile_k=64), BF16, (2048, 128, 768)),
           # x's rows gathered by TMA (no sorted copy)
           (C(gather=True), FP8, (2048, 128, 768)), (C(tile_m=64, tile_k=256, gather=True), FP8, (2048, 128, 768)),
           (C(tile_m=64, tile_k=64, gather=True), BF16, (7168, 256, 256))]


@pytest.mark.cute_compile
@pytest.mark.parametrize("cfg, dtype, hei", COMPILE, ids=lambda v: v.to_str().split(":")[1] if isinstance(v, C) else None)
def test_compiles_for_sm90a(tmp_path, cfg, dtype, hei):
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed (pip install -e '.[dev]')")
    H, E, I = hei
    with cute_dump_dir(tmp_path) as dump:
        rc.compile_routed_fc1.cache_clear()
        fn = rc.compile_routed_fc1(cfg, dtype, H, E, I)
        assert rc.compile_routed_fc1(cfg, dtype, H, E, I) is fn
        (path,) = glob.glob(os.path.join(dump, "*.ptx"))
        ptx = open(path).read()
    assert ".target sm_90a" in ptx
    ab = "e4m3.e4m3" if dtype == FP8 else "bf16.bf16"
    assert f"wgmma.mma_async.sync.aligned.m64n{cfg.tile_i}k{32 if dtype == FP8 else 16}.f32.{ab}" in ptx
    boxes = cfg.tile_k * dtype.itemsize // 128
    assert ptx.count("cp.async.bulk.tensor.2d.shared::cta.global") == 3 * boxes  # x, gate, up: no gather
    assert "cp.async.ca" not in ptx and "cp.async.cg" not in ptx
    assert "setmaxnreg.inc" in ptx and "setmaxnreg.dec" in ptx
    waits = {int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)}
    if dtype == FP8:
        assert waits == {0}, waits  # each product waited for, then added in fp32
        assert ptx.count("shfl.sync.bfly") == 4  # two rows a thread, two shuffles each (the quad)
        assert "max.NaN.f32" in ptx and "min.NaN.f32" in ptx  # amax and clamp keep NaN
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "st.global.b8" in ptx
    else:
        assert waits == {0, 1}, waits
        assert "shfl.sync.bfly" not in ptx and "st.global.b16" in ptx
    assert ".local" not in ptx
    # tile_m 64: a warpgroup waits for its unit's stages after the other has read the unit
    # before (one named barrier each way), none with 128 (both read every stage)
    named = (len(re.findall(r"\bbar\.sync\s+%r", ptx)), len(re.findall(r"\bbar\.arrive\s+%r", ptx)))
    assert named == ((1, 1) if cfg.tile_m == 64 else (0, 0)), named
    if cfg.gather:  # against the same config on the sorted copy: the row loop's shuffle of the
        # lane's token, and the other producer warps' wait for a free stage; the same TMA loads
        with cute_dump_dir(tmp_path / "copy") as dump:
            rc.compile_routed_fc1(dataclasses.replace(cfg, gather=False), dtype, H, E, I)
            (path,) = glob.glob(os.path.join(dump, "*.ptx"))
            plain = open(path).read()
        for what, more in (("shfl.sync.idx", 1), ("mbarrier.try_wait", 1), ("mbarrier.arrive.expect_tx", 0),
                           ("cp.async.bulk.tensor.2d.shared::cta.global", 0)):
            assert ptx.count(what) == plain.count(what) + more, (what, ptx.count(what), plain.count(what))


# ---------------------------------------------------------------------------------- GPU

needs_gpu = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and TRITON_INTERPRET unset")


def _problem(shape, M, dtype, seed):
    from densemoe.quant import quantize_per_token
    from densemoe.shapes import SHAPES
    from densemoe.weights import prepare_weights

    s = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(seed)
    E, I, H, k = s.experts, s.inter, s.hidden, s.topk
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g, dtype=BF16) * H ** -0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=g, dtype=BF16) * I ** -0.5
    pw = prepare_weights(w13, w2, dtype=dtype)
    x = torch.randn(M, H, device="cuda", generator=g, dtype=BF16)
    ids = torch.rand(M, E, device="cuda", generator=g).topk(k, dim=1).indices.to(torch.int32)
    if pw.dtype == FP8:
        xq, sx = quantize_per_token(x)
    else:
        xq, sx = x, None
    return pw, xq, sx, ids, k


def _run(pw, xq, sx, ids, k, cfg, tiles=None, count=None, bufs=None):
    """Schedule, sorted copy, tile list, CuTe FC1: (y, y_scale, sorted, offsets)."""
    E = pw.alpha1.shape[0]
    I = pw.w1.shape[0] // (2 * E)
    P = ids.numel()
    srt, off, y, ys, tiles, count = bufs or (
        torch.empty(P, dtype=torch.int32, device="cuda"), torch.empty(E + 1, dtype=torch.int32, device="cuda"),
        torch.full((P, I), float("nan"), device="cuda").to(xq.dtype if xq.dtype == FP8 else BF16),
        torch.full((P, I // cfg.tile_i), float("nan"), device="cuda"),
        torch.empty(rc.max_tiles(P, E, cfg.tile_m), 2, dtype=torch.int32, device="cuda"),
        torch.empty(1, dtype=torch.int32, device="cuda"))
    kern.schedule_launch(ids, E, srt, off)
    xs_sorted = xq if cfg.gather else xq[srt.long() // k].contiguous()
    kern.tile_list_launch(off, E, cfg.tile_m, tiles, count)
    rc.routed_fc1_cute(xs_sorted, pw.w1, pw.alpha1, sx, srt, off, tiles, count, y, ys if y.dtype == FP8 else None,
                       k, cfg)
    return y, ys, srt, off


def _exact_v(pw, xq, sx, srt, off, k):
    """float64 v = silu(g) * u of each sorted row (the exact math on the quantised inputs)."""
    E = pw.alpha1.shape[0]
    I = pw.w1.shape[0] // (2 * E)
    xd = xq.double() * (sx.double()[:, None] if sx is not None else 1.0)
    v = torch.zeros(srt.numel(), I, dtype=torch.float64, device="cuda")
    o = off.tolist()
    for e in range(E):
        if o[e + 1] == o[e]:
            continue
        rows = srt[o[e]:o[e + 1]].long() // k
        h = xd[rows] @ pw.w1[e * 2 * I:(e + 1) * 2 * I].double().T * float(pw.alpha1[e])
        v[o[e]:o[e + 1]] = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    return v


def _deq(y, ys, group):
    return y.double() * ys.double().repeat_interleave(group, 1) if y.dtype == FP8 else y.double()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.xdist_group("cute_fc1_big")  # model-shape weights and float64 references: one worker (memory)
@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("M", [1, 7, 100, 1000, 2048])
@pytest.mark.parametrize("tile_i, tile_m", [(128, 128), (64, 128), (128, 64)])
def test_routed_fc1_cute_on_model_shapes(shape, dtype, M, tile_i, tile_m):
    """tile_m 64: the two warpgroups take alternate units (M = 1 and 7: most warpgroups idle; at
    2048 each CTA's units are many times its ring)."""
    pw, xq, sx, ids, k = _problem(shape, M, dtype, M + 11)
    cfg = C(tile_i=tile_i, tile_k=128 if dtype == "fp8" else 64, tile_m=tile_m)
    y, ys, srt, off = _run(pw, xq, sx, ids, k, cfg)
    torch.cuda.synchronize()
    valid = int(off[-1])
    assert valid == ids.numel()
    assert not y[:valid].float().isnan().any(), "a row of y unwritten"
    if y.dtype == FP8:
        assert not ys[:valid].isnan().any(), "a scale unwritten"
    v = _exact_v(pw, xq, sx, srt, off, k)
    err = ((_deq(y, ys, tile_i) - v).norm() / v.norm()).item()
    # the Triton routed FC1 on the same inputs, the same y groups
    yt = torch.full_like(y, float("nan"))
    yst = torch.full_like(ys, float("nan"))
    tcfg = kern.RoutedConfig(block_m=64, fc1_block_i=tile_i, fc1_block_k=128 if dtype == "fp8" else 64,
                             fc1_warps=4, fc1_stages=3)
    kern.fc1_launch(xq, pw.w1, pw.alpha1, sx, srt, off, yt, yst if y.dtype == FP8 else None, k, tcfg)
    err_t = ((_deq(yt, yst, tile_i) - v).norm() / v.norm()).item()
    assert err <= 1.1 * err_t + 1e-6, (err, err_t)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.xdist_group("cute_fc1_big")
@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("M", [1, 7, 100, 2048])
@pytest.mark.parametrize("tile_m, k_bytes", [(128, 128), (64, 256), (64, 128)])
def test_gather_gives_the_sorted_copys_bits(shape, dtype, M, tile_m, k_bytes):
    """x's rows gathered by TMA, a load a row (and 128-byte chunk): y and its scales equal the
    sorted copy's bit for bit (the same products in the same order); every valid row written.
    M = 1 and 7: units mostly past their expert's rows (loaded again from its last row)."""
    pw, xq, sx, ids, k = _problem(shape, M, dtype, M + 5)
    cfg = C(tile_k=k_bytes // xq.element_size(), tile_m=tile_m)
    y, ys, srt, off = _run(pw, xq, sx, ids, k, cfg)
    yg, ysg, srt_g, off_g = _run(pw, xq, sx, ids, k, dataclasses.replace(cfg, gather=True))
    torch.cuda.synchronize()
    assert torch.equal(off, off_g)
    valid = int(off[-1])
    assert not yg[:valid].float().isnan().any(), "a row of y unwritten"
    # pair by pair: above SMALL_P pairs the schedule's atomics order the pairs within an expert
    # (the two calls' orders differ), and each row's bits depend on its pair only
    bits = (lambda t: t.view(torch.uint8)) if y.dtype == FP8 else (lambda t: t)
    for got, want in ((yg, y), (ysg, ys)) if y.dtype == FP8 else ((yg, y),):
        a_, b_ = torch.empty_like(bits(got)), torch.empty_like(bits(want))
        a_[srt_g.long()] = bits(got)
        b_[srt.long()] = bits(want)
        assert torch.equal(a_, b_)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("tile_m", [128, 64])
@pytest.mark.parametrize("gather", [False, True])
def test_graph_replay_with_other_routings(dtype, tile_m, gather):
    """Schedule, sorted copy (or none: gather), tile list and kernel captured once; replays with
    other routings (written into the captured ids) give an eager call's bits."""
    pw, xq, sx, ids, k = _problem("qwen3-30b-a3b", 600, dtype, 3)
    cfg = C(tile_k=128 if dtype == "fp8" else 64, tile_m=tile_m, gather=gather)
    y, ys, srt, off = _run(pw, xq, sx, ids, k, cfg)
    E = pw.alpha1.shape[0]
    bufs = (srt, off, y, ys, torch.empty(rc.max_tiles(ids.numel(), E, tile_m), 2, dtype=torch.int32, device="cuda"),
            torch.empty(1, dtype=torch.int32, device="cuda"))
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        _run(pw, xq, sx, ids, k, cfg, bufs=bufs)
    for seed in (5, 6):
        g = torch.Generator(device="cuda").manual_seed(seed)
        ids.copy_(torch.rand(ids.shape[0], E, device="cuda", generator=g).topk(k, dim=1).indices)
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = _run(pw, xq, sx, ids.clone(), k, cfg)
        # each row's bits depend on its pair only (the order within an expert may differ: above
        # SMALL_P pairs the schedule's atomics place them): compare pair by pair
        assert not y.float().isnan().any()
        for got, ref in ((y, want[0]), (ys, want[1])) if dtype == "fp8" else ((y, want[0]),):
            a_ = torch.empty_like(got)
            b_ = torch.empty_like(ref)
            a_[srt.long()] = got
            b_[want[2].long()] = ref
            assert torch.equal(a_.view(torch.uint8) if got.dtype == FP8 else a_,
                               b_.view(torch.uint8) if ref.dtype == FP8 else b_)


# ---------------------------------------------------------------------------------- in the routed path

def _qwen3(M, dtype=FP8, block=0):
    from densemoe.kernels.common import RoutedProblem

    return RoutedProblem(M, 2048, 128, 768, 8, dtype, BF16, block)


def _cute_cfg(**kw):
    base = dict(block_m=64, fc1_block_i=128, fc1_block_k=128, fc2_block_n=128, fc2_block_k=128, fc2_warps=4,
                fc2_stages=4, programs_per_sm=2, fc1_cute=True)
    return kern.RoutedConfig(**{**base, **kw})


def test_fc1_cute_field_string_and_rules():
    from densemoe.ops import routed_configs

    cfg = _cute_cfg()
    assert kern.RoutedConfig.from_str(cfg.to_str()) == cfg and "fc1:cute-i128k128" in cfg.short()
    old = cfg.to_str().rsplit(",", 5)[0]  # a string written before the field (and the four after it): the Triton FC1
    assert kern.RoutedConfig.from_str(old) == kern.RoutedConfig(**{**cfg.__dict__, "fc1_cute": False})
    assert routed_configs.can_implement(_qwen3(4096), cfg)[0]
    # the CuTe FC1's units are block_m rows
    assert [routed_configs.cute_fc1_config(_cute_cfg(block_m=b)).tile_m for b in (64, 128)] == [64, 128]
    assert routed_configs.can_implement(_qwen3(4096, BF16), _cute_cfg(fc1_block_k=64, fc2_block_k=64))[0]
    for kw, why in ((dict(fc1_swap_ab=True), "fc1_cute"), (dict(fc1_tail_m=16), "fc1_cute"),
                    (dict(fc1_sorted_x=True), "fc1_cute"), (dict(fc1_warps=8), "fc1_cute"),
                    (dict(fc1_block_i=256, fc2_block_k=128), "fc1_cute"), (dict(block_m=32), "block_m")):
        ok, msg = routed_configs.can_implement(_qwen3(4096), _cute_cfg(**kw))
        assert not ok and why in msg, (kw, msg)
    # gathering x's rows by TMA: a way of the CuTe FC1's, in its config and its short name
    g = _cute_cfg(fc1_cute_gather=True)
    assert routed_configs.cute_fc1_config(g).gather and not routed_configs.cute_fc1_config(cfg).gather
    assert "fc1:cute-g-i128" in g.short() and kern.RoutedConfig.from_str(g.to_str()) == g
    assert routed_configs.can_implement(_qwen3(4096), g)[0]
    ok, msg = routed_configs.can_implement(_qwen3(4096), _cute_cfg(fc1_cute=False, fc1_cute_gather=True))
    assert not ok and "needs fc1_cute" in msg, msg
    # the CuTe rules through the op layer's validity function: k-tile bytes, block weights
    ok, msg = routed_configs.can_implement(_qwen3(4096), _cute_cfg(fc1_block_k=64))
    assert not ok and "128 or 256 bytes" in msg, msg
    ok, msg = routed_configs.can_implement(_qwen3(4096, block=128), _cute_cfg())
    assert not ok and "block-scaled" in msg, msg


def test_space_offers_fc1_cute_where_experts_get_many_rows():
    from densemoe.ops import routed_configs
    from densemoe.tuning.space import routed_space

    for M, want in ((4096, True), (2048, True), (512, True), (256, True), (128, False), (1, False)):
        for dt in (FP8, BF16):
            sp = routed_space(_qwen3(M, dt))
            cute = [c for c in sp if c.fc1_cute and not c.fc2_cute]  # (with FC2 on CuTe: test_routed_fc2_cute)
            assert bool(cute) == want, (M, dt)
            assert all(routed_configs.can_implement(_qwen3(M, dt), c)[0] for c in cute)
            assert {c.fc1_block_i for c in cute} == ({64, 128} if want else set())
            # each on the sorted copy, and those of tile 128 also gathering x's rows by TMA
            assert {dataclasses.replace(c, fc1_cute_gather=False) for c in cute if c.fc1_cute_gather} == \
                {c for c in cute if not c.fc1_cute_gather and c.fc1_block_i == 128}
            # units of 64 rows wherever CuTe is offered (from 16 rows an expert), of 128 from 64 rows
            assert {c.block_m for c in cute} == ({64, 128} if M >= 2048 else {64} if want else set()), (M, sorted({c.block_m for c in cute}))
    assert not [c for c in routed_space(_qwen3(4096, FP8, 128)) if c.fc1_cute]


def test_choose_runs_a_tuned_fc1_cute_on_triton_where_cute_cannot(monkeypatch):
    """A table entry naming fc1_cute (tuned on an H200) on a device without it (here the CPU):
    the entry's fastest config without CuTe (its "no_cute" slot), or the default rule where the
    entry has none; a pinned one says why it cannot run."""
    from densemoe.ops import routed_configs
    from densemoe.tuning import cache

    cfg = _cute_cfg()
    entry = {"best": {"backend": "triton", "config": cfg.to_str(), "us": 1.0}}
    monkeypatch.setattr(cache, "lookup_or_autotune", lambda key, problem, device: (entry, "shipped"))
    monkeypatch.setenv("DENSEMOE_TUNED", "1")
    ch = routed_configs.choose(_qwen3(4096), "cpu")
    assert ch.config == routed_configs.default_config(_qwen3(4096)) and ch.source == "heuristic"
    with pytest.raises(ValueError, match="runs a GEMM on CuTe, which cannot run here"):
        routed_configs.choose(_qwen3(4096), "cpu", config=cfg)
    # an entry with the tuner's fastest config without CuTe: that one
    plain = _cute_cfg(fc1_cute=False, fc2_stages=3, programs_per_sm=1)
    entry["no_cute"] = {"backend": "triton", "config": plain.to_str(), "us": 2.0}
    ch = routed_configs.choose(_qwen3(4096), "cpu")
    assert ch.config == plain and ch.source == "shipped"
    # where CuTe runs, the entry as it is
    monkeypatch.setattr(routed_configs, "cute_fc1_runs_on", lambda device: (True, ""))
    assert routed_configs.choose(_qwen3(4096), "cpu").config == cfg


@pytest.mark.gpu
@needs_gpu
@pytest.mark.xdist_group("cute_fc1_big")  # model-shape weights and float64 references: one worker (memory)
@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("M", [100, 2048])
@pytest.mark.parametrize("block_m", [64, 128])
def test_routed_experts_with_fc1_cute_on_model_shapes(shape, dtype, M, block_m):
    """The whole routed path with FC1 on CuTe in units of block_m rows (and FC2's tiles of as
    many): within torch's error at the kernels' precision (the routed GPU tests' bound), and
    within 1e-2 of the Triton FC1's output."""
    import dataclasses

    from test_routed_gpu import _case, _within_torch

    from densemoe.ops.routed import routed_experts
    from densemoe.weights import prepare_weights

    w13, w2, x, ids, wts = _case(shape, M, M + 21)
    pw = prepare_weights(w13, w2, dtype=dtype)
    bk = 128 if dtype == "fp8" else 64
    cfg = _cute_cfg(fc1_block_k=bk, fc2_block_k=bk, block_m=block_m)
    out = routed_experts(x, pw, ids, wts, config=cfg)
    assert torch.isfinite(out).all()
    _within_torch(out, pw, x, ids, wts, cfg.fc1_block_i, True)
    plain = routed_experts(x, pw, ids, wts, config=dataclasses.replace(cfg, fc1_cute=False))
    assert ((out.float() - plain.float()).norm() / plain.float().norm()).item() < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.xdist_group("cute_fc1_big")
@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("M", [100, 2048])
def test_routed_experts_gathering_x_gives_the_copys_bits(shape, dtype, M):
    """The routed path with the CuTe FC1 gathering x's rows by TMA (no sorted copy): the output
    equals the one on the sorted copy bit for bit (64-row units, 256-byte k-tiles: the H100
    table's Qwen3 pick)."""
    from test_routed_gpu import _case

    from densemoe.ops.routed import routed_experts
    from densemoe.weights import prepare_weights

    w13, w2, x, ids, wts = _case(shape, M, M + 23)
    pw = prepare_weights(w13, w2, dtype=dtype)
    bk = 128 if dtype == "fp8" else 64
    cfg = _cute_cfg(fc1_block_k=2 * bk, fc2_block_k=bk, block_m=64)
    want = routed_experts(x, pw, ids, wts, config=cfg)
    got = routed_experts(x, pw, ids, wts, config=dataclasses.replace(cfg, fc1_cute_gather=True))
    assert torch.isfinite(got).all() and torch.equal(got, want)


@pytest.mark.skipif(not INTERPRET, reason="the CPU path: Triton's interpreter (the CuTe launch is stood in for)")
@pytest.mark.parametrize("gather", [False, True])
def test_fc1_stage_passes_x_itself_when_gathering(monkeypatch, gather):
    """The op layer's FC1 stage with the CuTe FC1: gathering, the kernel gets x itself (no sorted
    copy launched); a view of x off 16-byte alignment (TMA's) gets an aligned copy of its rows;
    on the copy, the sorted rows. The CuTe launch is stood in for (it needs a GPU)."""
    from densemoe.kernels.common import max_tiles
    from densemoe.ops import routed as ops_routed

    seen = {}

    def fake_fc1(xs, w1, alpha1, x_scale, srt, off, tiles, count, y, ys, k, ccfg):
        seen.update(xs=xs, gather=ccfg.gather, tile_m=ccfg.tile_m, tiles=tiles)

    copies = []
    monkeypatch.setattr(rc, "routed_fc1_cute", fake_fc1)
    monkeypatch.setattr(kern, "sorted_rows_launch", lambda *a: copies.append(a))
    M, H, E, I, k = 5, 256, 4, 128, 2
    g = torch.Generator().manual_seed(0)
    base = torch.randn(M * H + 1, generator=g).to(BF16)
    w1 = torch.randn(E * 2 * I, H, generator=g).to(BF16)
    alpha1 = torch.ones(E)
    ids = torch.rand(M, E, generator=g).topk(k, dim=1).indices.to(torch.int32)
    cfg = kern.RoutedConfig(block_m=64, fc1_block_i=128, fc1_block_k=64, fc2_block_k=64, fc1_cute=True,
                            fc1_cute_gather=gather)
    for x in (base[:M * H].view(M, H), base[1:].view(M, H)):  # aligned, and 2 bytes off
        seen.clear()
        copies.clear()
        ops_routed._fc1_stage(x, None, w1, alpha1, ids, cfg)
        assert seen["gather"] == gather and seen["tile_m"] == 64
        assert seen["tiles"].shape[0] >= max_tiles(M * k, E, 64)
        if gather:
            assert not copies and torch.equal(seen["xs"], x)
            assert seen["xs"].data_ptr() % 16 == 0
            assert (seen["xs"].data_ptr() == x.data_ptr()) == (x.data_ptr() % 16 == 0)
        else:
            assert len(copies) == 1 and seen["xs"].shape == (M * k, H)
