"""The routed path on the GPU: model shapes (DeepSeek-V3 TP8, Qwen3-30B-A3B), fp8 and bf16, against
float64 and PyTorch at the same precision; routed against dense; CUDA-graph replay with routing
that changes between replays, the output poisoned before each."""

from __future__ import annotations

import os

import pytest
import torch

import densemoe
from densemoe.kernels.common import RoutedProblem
from densemoe.ops import routed_configs
from densemoe.ops.routed import moe_schedule, routed_experts
from densemoe.quant import FP8, quantize_per_token, quantize_per_token_group
from densemoe.reference import moe_schedule_ref
from densemoe.shapes import SHAPES
from densemoe.timing import capture
from densemoe.weights import prepare_weights

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = [pytest.mark.gpu, pytest.mark.xdist_group("gpu_big"),
              pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and TRITON_INTERPRET unset")]
BF16 = torch.bfloat16


def _case(shape, M, seed):
    s = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(seed)
    E, I, H = s.experts, s.inter, s.hidden
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g, dtype=BF16) * H ** -0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=g, dtype=BF16) * I ** -0.5
    x = torch.randn(M, H, device="cuda", generator=g, dtype=BF16)
    ids = torch.rand(M, E, device="cuda", generator=g).topk(s.topk, dim=1).indices
    wts = torch.softmax(torch.randn(M, s.topk, device="cuda", generator=g), dim=1)
    return w13, w2, x, ids, wts


def _by_expert(pw, x, ids, wts, group, dt, round_rows, absolute=False, y_fp8=None, exact_y=False):
    """The routed math in ``dt`` (float64: the reference; float32: torch at the kernels'
    precision), one expert at a time on the GPU: y rounded as the kernel stores it (bf16, or fp8
    per (row, group) with float32 scales), each pair's weighted row rounded to bf16 if
    ``round_rows``, the rows (their magnitudes if ``absolute``) summed per token. ``exact_y``: y
    kept as computed (the exact math on the quantised x and the weights, for the float64 reference)."""
    M, H = x.shape
    E = pw.alpha1.shape[0]
    I = pw.w1.shape[0] // (2 * E)
    if pw.dtype == FP8:
        xq, sx = quantize_per_token(x)
        xs = xq.to(dt) * sx.to(dt)[:, None]
    else:
        xs = x.to(dt)
    flat = ids.reshape(-1)
    rows = torch.zeros(flat.numel(), H, dtype=dt, device=x.device)
    for e in range(E):
        p = (flat == e).nonzero().squeeze(1)
        if p.numel() == 0:
            continue
        h = xs[p // ids.shape[1]] @ pw.w1[e * 2 * I:(e + 1) * 2 * I].to(dt).T * pw.alpha1[e].to(dt)
        v = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        if exact_y:
            pass
        elif (pw.dtype == FP8) if y_fp8 is None else y_fp8:
            v32 = v.float().reshape(-1, I // group, group)
            sc = v32.abs().amax(-1, keepdim=True)
            sc = torch.where(sc > 0, sc / 448.0, torch.ones_like(sc))
            v = ((v32 / sc).clamp(-448, 448).to(FP8).float() * sc).reshape(-1, I).to(dt)
        else:
            v = v.to(BF16).to(dt)
        r = v @ pw.w2[:, e * I:(e + 1) * I].to(dt).T * pw.w2_scale[e].to(dt)
        r = r * wts.reshape(-1)[p].to(dt)[:, None]
        rows[p] = r.to(BF16).to(dt) if round_rows else (r.abs() if absolute else r)
    return rows.reshape(M, -1, H).sum(1)


def _errs(out, ref):
    d = out.double() - ref
    return (d.norm() / ref.norm()).item(), d.abs().max().item()


@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("M", [1, 7, 100, 1000])
def test_routed_on_model_shapes(shape, dtype, M):
    w13, w2, x, ids, wts = _case(shape, M, M)
    pw = prepare_weights(w13, w2, dtype=dtype)
    out = routed_experts(x, pw, ids, wts)
    cfg = routed_configs.choose(RoutedProblem(M, x.shape[1], pw.num_experts, pw.inter, ids.shape[1], pw.dtype, BF16),
                                x.device).config
    assert torch.isfinite(out).all()
    _within_torch(out, pw, x, ids, wts, cfg.fc1_block_i, True)


def _within_torch(out, pw, x, ids, wts, group, round_rows):
    """out against the exact math in float64 (y not rounded), within 1.1x (fp8; bf16 1.5x) the
    error of the same pipeline in torch at the kernels' precision (float32, y rounded as the
    kernel stores it). Not against a float64 twin that rounds y to fp8 too: Hopper's fp8 wgmma
    adds inside each instruction at reduced precision (gate_up.py), which moves v by enough to
    flip the fp8 rounding of some of y's elements against any float32 twin: each flip is one fp8
    step, and together they came to ~0.004 relative beside the pipeline's own ~0.03 (H200)."""
    ref = _by_expert(pw, x, ids, wts, group, torch.float64, False, exact_y=True)
    same = _by_expert(pw, x, ids, wts, group, torch.float32, round_rows).to(BF16)
    rel, mx = _errs(out, ref)
    t_rel, t_mx = _errs(same, ref)
    k = 1.1 if pw.dtype == FP8 else 1.5
    assert rel <= k * t_rel + 2 ** -20 and mx <= 2 * t_mx + 2 ** -20 * ref.abs().max().item(), (rel, t_rel, mx, t_mx)


@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
def test_schedule_on_the_gpu(shape):
    """Offsets bit for bit; each expert's segment the twin's pairs (in pair order up to SMALL_P
    pairs; above, in the atomics' order). The same from the launch that also quantises x
    (``quant_schedule_launch``), whose x8 and scales are ``quantize_per_token``'s bits (per token)
    and ``quantize_per_token_group``'s (groups of 128)."""
    from densemoe.kernels.triton.routed import SMALL_P, quant_schedule_launch

    s = SHAPES[shape]
    for M in (1, 7, 100, SMALL_P // s.topk, 1000, 4096):  # SMALL_P // k: the one-launch form's largest
        ids = torch.rand(M, s.experts, device="cuda").topk(s.topk, dim=1).indices
        sr, orf = moe_schedule_ref(ids, s.experts)
        seg = torch.repeat_interleave(torch.arange(s.experts, device="cuda"), (orf[1:] - orf[:-1]).long())
        key = lambda v: (seg.long() << 32) + v.long()  # noqa: E731 - sort within each segment
        x = torch.randn(M, s.hidden, device="cuda").to(BF16)
        runs = [moe_schedule(ids, s.experts)]
        for group in (0, 128):  # per token; DeepSeek-V3's 1 x 128 groups (block-scaled weights)
            xq = torch.full_like(x, 7.0).to(FP8)
            sx = torch.full((M, s.hidden // group) if group else (M,), float("nan"), device="cuda")
            runs.append((torch.full_like(sr, -7), torch.full_like(orf, -7)))
            quant_schedule_launch(x, xq, sx, ids, s.experts, *runs[-1], group=group)
            q_ref, s_ref = quantize_per_token_group(x, group) if group else quantize_per_token(x)
            assert torch.equal(xq.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(sx, s_ref), group
        for so, oo in runs:
            assert torch.equal(oo, orf)
            if M * s.topk <= SMALL_P:
                assert torch.equal(so, sr)
            assert torch.equal(key(so).sort().values, key(sr).sort().values)


def test_outputs_do_not_depend_on_the_order_within_an_expert():
    """Above SMALL_P pairs the schedule's order within an expert varies run to run; the output
    (rows mode) must not: every row is computed on its own and written at its pair index."""
    w13, w2, x, ids, wts = _case("qwen3-30b-a3b", 4096, 21)
    pw = prepare_weights(w13, w2, dtype="fp8")
    first = routed_experts(x, pw, ids, wts)
    for _ in range(3):
        assert torch.equal(routed_experts(x, pw, ids, wts), first)


def test_routed_matches_dense_bf16():
    w13, w2, x, ids, wts = _case("qwen3-30b-a3b", 100, 5)
    pw = prepare_weights(w13, w2, dtype="bf16")
    alpha = torch.zeros(100, pw.num_experts, device="cuda").scatter(1, ids, wts)
    dense = densemoe.experts_forward(x, pw, alpha, strategy="dense").double()
    routed = densemoe.experts_forward(x, pw, alpha, strategy="routed", expert_ids=ids).double()
    rows = _by_expert(pw, x, ids, wts, 128, torch.float64, False, absolute=True)  # sum_j |row_j|
    assert ((routed - dense).abs() <= 2 ** -8 * (rows + dense.abs() + routed.abs()) + 1e-6).all()


def _replays_as_eager(shape, M, x, pw, ids, wts, config, want_config, seed0, n=3):
    """``routed_experts`` with ``config`` captured as a CUDA graph, replayed with n other routings
    of the shape (seeds seed0...) into a NaN-poisoned output: each replay the bits of an eager
    call with ``want_config``."""
    s_ids, s_wts = ids.clone(), wts.clone()
    graph, out = capture(lambda: routed_experts(x, pw, s_ids, s_wts, config=config))
    for seed in range(n):
        _, _, _, new_ids, new_wts = _case(shape, M, seed0 + seed)
        s_ids.copy_(new_ids)
        s_wts.copy_(new_wts)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, routed_experts(x, pw, new_ids, new_wts, config=want_config)), seed


@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_graph_replay_with_changing_routing_and_a_poisoned_output(dtype):
    w13, w2, x, ids, wts = _case("deepseek-v3-tp8", 64, 9)
    pw = prepare_weights(w13, w2, dtype=dtype)
    s_ids, s_wts = ids.clone(), wts.clone()
    graph, out = capture(lambda: routed_experts(x, pw, s_ids, s_wts))
    for seed in range(3):
        _, _, _, new_ids, new_wts = _case("deepseek-v3-tp8", 64, 100 + seed)
        if seed == 2:
            new_ids[:, :] = new_ids[:1, :]  # every token on the same 8 experts
        s_ids.copy_(new_ids)
        s_wts.copy_(new_wts)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, routed_experts(x, pw, new_ids, new_wts))


def test_ids_outside_the_experts_are_dropped_on_the_gpu():
    w13, w2, x, ids, wts = _case("qwen3-30b-a3b", 7, 11)
    pw = prepare_weights(w13, w2, dtype="fp8")
    bad = ids.clone()
    bad[0, 0], bad[3, 2] = -1, 1 << 40
    good_wts = wts.clone()
    good_wts[0, 0] = good_wts[3, 2] = 0.0
    # a dropped pair adds nothing; a zero weight adds +0 to the same fp32 sum: the same bits
    assert torch.equal(routed_experts(x, pw, bad, wts), routed_experts(x, pw, ids, good_wts))


@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("M", [1, 7, 100, 1000])
def test_fused_combine_is_the_combine_on_model_shapes(shape, M):
    """fused_combine across programs on the GPU (acq_rel counters, rows read back from L2): the
    combine kernel's bits at every M, again under graph replay with other routings (the counters
    reused), with a dropped slot."""
    import dataclasses

    w13, w2, x, ids, wts = _case(shape, M, M + 5)
    pw = prepare_weights(w13, w2, dtype="fp8")
    base = routed_configs.choose(RoutedProblem(M, x.shape[1], pw.num_experts, pw.inter, ids.shape[1], pw.dtype, BF16),
                                 x.device).config
    # neither the column stream (the H200 tables' pick at some M) nor the CuTe FC2 takes the fused combine:
    # test the fused combine on the table's tiles without it
    base = dataclasses.replace(base, atomic_combine=False, fc2_col_groups=0, fc2_cute=False)
    fused = dataclasses.replace(base, fused_combine=True)
    ids[0, 0] = -1
    want = routed_experts(x, pw, ids, wts, config=base)
    assert torch.equal(routed_experts(x, pw, ids, wts, config=fused), want)
    if not base.fc2_col_groups:  # the units column tile by column tile: the same bits
        assert torch.equal(routed_experts(x, pw, ids, wts, config=dataclasses.replace(fused, fc2_col_major=True)), want)
    _replays_as_eager(shape, M, x, pw, ids, wts, fused, base, 200)


@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("M", [1, 7, 100, 1000])
@pytest.mark.parametrize("hoist", [True, False])
def test_column_stream_is_fc2_on_model_shapes(shape, M, hoist, monkeypatch):
    """fc2_col_groups (FC2's loop over column tiles pipelined, the k-steps unrolled) on the GPU:
    the bits of one column tile per unit, for one group and for several, with y's rows by
    pointer and through TMA, the unit's y operand loaded once before the column loop or in it,
    again under graph replay with other routings, with a dropped slot."""
    import dataclasses

    from densemoe.kernels.triton import routed as kern

    monkeypatch.setattr(kern, "FC2_HOIST_Y", hoist)

    from densemoe.kernels.triton.routed import can_implement

    w13, w2, x, ids, wts = _case(shape, M, M + 9)
    pw = prepare_weights(w13, w2, dtype="fp8")
    p = RoutedProblem(M, x.shape[1], pw.num_experts, pw.inter, ids.shape[1], pw.dtype, BF16)
    base = dataclasses.replace(routed_configs.choose(p, x.device).config, atomic_combine=False, fused_combine=False,
                               flatten=False, fc1_block_i=128, fc2_block_n=128, fc2_block_k=128)
    ids[0, 0] = -1
    for groups in (1, 3):
        stream = next(c for n in (128, 64) for st in (4, 3, 2) if can_implement(p, c := dataclasses.replace(
            base, fc2_col_groups=groups, fc2_block_n=n, fc2_stages=st))[0])
        one_tile = dataclasses.replace(stream, fc2_col_groups=0)  # one column tile a unit, the same tiles
        want = routed_experts(x, pw, ids, wts, config=one_tile)
        assert torch.equal(routed_experts(x, pw, ids, wts, config=stream), want), groups
        # and with y's rows through TMA (the same products)
        assert torch.equal(routed_experts(x, pw, ids, wts, config=dataclasses.replace(stream, fc2_y_tma=True)),
                           want), groups
    _replays_as_eager(shape, M, x, pw, ids, wts, stream, one_tile, 300)


@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("M", [2048, 3000])
def test_split_fc1_and_fc2_tiles_on_model_shapes(shape, dtype, M):
    """The space's split configs (128-row FC1, Triton and CuTe, before a 64-row FC2 of the
    space's; ``tuning.space.with_fc1_of``): within torch's error; the bits of FC1's stage at the
    split config then FC2's at its FC2 part, run by hand; graph replays with other routings give
    an eager call's bits."""
    from densemoe.ops.routed import _fc1_stage, _fc2_stage, _inputs
    from densemoe.tuning.space import routed_space

    w13, w2, x, ids, wts = _case(shape, M, M + 31)
    pw = prepare_weights(w13, w2, dtype=dtype)
    p = RoutedProblem(M, x.shape[1], pw.num_experts, pw.inter, ids.shape[1], pw.dtype, BF16)
    split = [c for c in routed_space(p) if c.fc2_block_m]
    picks = [next(c for c in split if not c.fc1_cute), next(c for c in split if c.fc1_cute)]
    picks.append(next(c for c in split if not c.fc1_cute and not c.fc2_col_groups))
    for cfg in picks:
        out = routed_experts(x, pw, ids, wts, config=cfg)
        _within_torch(out, pw, x, ids, wts, cfg.fc1_block_i, not cfg.atomic_combine)
        xq, sx, ids_c, wts_c = _inputs(x, pw, ids, wts, cfg, None)
        sorted_pairs, offsets, y, ys = _fc1_stage(xq, sx, pw.w1, pw.alpha1, ids_c, cfg)
        want = torch.full_like(out, float("nan"))
        _fc2_stage(y, ys, pw.w2, pw.w2_scale, sorted_pairs, offsets, ids_c, wts_c, want, cfg.fc2_part())
        assert torch.equal(out, want), cfg.short()
    _replays_as_eager(shape, M, x, pw, ids, wts, picks[0], picks[0], M + 70, n=2)


@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("M", [7, 1000])
def test_atomic_combine_and_flatten_on_model_shapes(shape, M):
    import dataclasses

    w13, w2, x, ids, wts = _case(shape, M, M + 1)
    pw = prepare_weights(w13, w2, dtype="fp8")
    base = routed_configs.choose(RoutedProblem(M, x.shape[1], pw.num_experts, pw.inter, ids.shape[1], pw.dtype, BF16),
                                 x.device).config
    cfg = dataclasses.replace(base, atomic_combine=True, flatten=True, fc2_col_groups=0, fc2_cute=False)
    out = routed_experts(x, pw, ids, wts, config=cfg)
    _within_torch(out, pw, x, ids, wts, cfg.fc1_block_i, False)


@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("M,bm,tail,warps", [(100, 64, 16, 8), (2048, 64, 32, 8), (2048, 128, 16, 8),
                                             (4096, 128, 32, 8)])
def test_fc1_tails_on_model_shapes(shape, dtype, M, bm, tail, warps):
    """fc1_tail_m (an expert's few rows past its whole tiles multiplied by its last whole tile's
    loop) on uniform routing, where about half the experts have such a rest: within torch's
    error as any config; graph replays with other routings give an eager call's bits."""
    import dataclasses

    from densemoe.kernels.triton.routed import RoutedConfig, can_implement

    w13, w2, x, ids, wts = _case(shape, M, M + 5)
    pw = prepare_weights(w13, w2, dtype=dtype)
    bk = 128 if dtype == "fp8" else 64
    cfg = RoutedConfig(block_m=bm, fc1_block_i=128, fc1_block_k=bk, fc1_warps=warps, fc1_stages=2,
                       fc2_block_n=128, fc2_block_k=bk, fc2_warps=8, fc2_stages=3, fc1_tail_m=tail)
    prob = RoutedProblem(M, x.shape[1], pw.num_experts, pw.inter, ids.shape[1], pw.dtype, BF16)
    assert can_implement(prob, cfg)[0], can_implement(prob, cfg)[1]
    out = routed_experts(x, pw, ids, wts, config=cfg)
    assert torch.isfinite(out).all()
    _within_torch(out, pw, x, ids, wts, cfg.fc1_block_i, True)
    plain = routed_experts(x, pw, ids, wts, config=dataclasses.replace(cfg, fc1_tail_m=0))
    assert ((out.float() - plain.float()).norm() / plain.float().norm()).item() < 1e-2
    # replays with other routings into a poisoned output: an eager call's bits (above 1024 pairs the
    # schedule's atomics order an expert's rows anew each call, so a row may move between a tile
    # and a tail: this also shows that its bits do not depend on which)
    _replays_as_eager(shape, M, x, pw, ids, wts, cfg, cfg, M + 50, n=2)


@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("dtype", ["fp8", "bf16", "fp8block"])
@pytest.mark.parametrize("M,bm,swap", [(7, 16, True), (1000, 64, False), (2048, 128, True), (4096, 128, False)])
def test_fc1_sorted_x_on_model_shapes(shape, dtype, M, bm, swap):
    """fc1_sorted_x (FC1 reads x's rows from a sorted copy through TMA instead of gathering them):
    the bits of the same config without it, eager and in graph replays with other routings."""
    import dataclasses

    from densemoe.kernels.triton.routed import RoutedConfig

    w13, w2, x, ids, wts = _case(shape, M, M + 7)
    if dtype == "fp8block":
        s = SHAPES[shape]
        w13, s13, _, w2, s2, _ = _block_weights(s.experts, s.inter, s.hidden, torch.Generator(device="cuda").manual_seed(M))
        pw = prepare_weights(w13, w2, w13_scale=s13, w2_scale=s2)
        bi = 128
    else:
        pw = prepare_weights(w13, w2, dtype=dtype)
        bi = 64 if swap else 128
    bk = 64 if dtype == "bf16" else 128
    base = RoutedConfig(block_m=bm, fc1_block_i=bi, fc1_block_k=bk, fc1_swap_ab=swap, fc1_warps=4 if bm * bi <= 8192 else 8,
                        fc1_stages=3, fc2_block_n=128, fc2_block_k=bk if dtype != "fp8" else min(bk, bi),
                        fc2_swap_ab=swap, fc2_warps=8, fc2_stages=3)
    cfg = dataclasses.replace(base, fc1_sorted_x=True)
    want = routed_experts(x, pw, ids, wts, config=base)
    got = routed_experts(x, pw, ids, wts, config=cfg)
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    _replays_as_eager(shape, M, x, pw, ids, wts, cfg, base, M + 70, n=2)


@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("M", [1, 100, 2048])
def test_fc2_y_tma_on_model_shapes(shape, dtype, M):
    """fc2_y_tma (FC2's y rows through TMA): the bits of the chosen config without it, eager and
    in graph replays with other routings into a poisoned output."""
    import dataclasses

    w13, w2, x, ids, wts = _case(shape, M, M + 9)
    pw = prepare_weights(w13, w2, dtype=dtype)
    base = dataclasses.replace(routed_configs.choose(
        RoutedProblem(M, x.shape[1], pw.num_experts, pw.inter, ids.shape[1], pw.dtype, BF16), x.device).config,
        fc2_y_tma=False)
    cfg = dataclasses.replace(base, fc2_y_tma=True)
    assert torch.equal(routed_experts(x, pw, ids, wts, config=cfg), routed_experts(x, pw, ids, wts, config=base))
    _replays_as_eager(shape, M, x, pw, ids, wts, cfg, base, M + 90, n=2)


@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("M", [1, 100, 1000])
def test_block_fp8_on_model_shapes(shape, M):
    """128 x 128 block-scaled weights (issue 20): within 1.2x the error of the same block-fp8
    pipeline in torch, against float64 on the dequantised weights."""
    from densemoe.reference import experts_ref, quantize_per_token_group_ref

    s = SHAPES[shape]
    E, I, H, B = s.experts, s.inter, s.hidden, 128
    g = torch.Generator(device="cuda").manual_seed(M)

    w13, s13, d13, w2, s2, d2 = _block_weights(E, I, H, g)
    pw = prepare_weights(w13, w2, w13_scale=s13, w2_scale=s2)
    x = torch.randn(M, H, device="cuda", generator=g, dtype=BF16)
    ids = torch.rand(M, E, device="cuda", generator=g).topk(s.topk, dim=1).indices
    wts = torch.softmax(torch.randn(M, s.topk, device="cuda", generator=g), dim=1)
    out = routed_experts(x, pw, ids, wts)
    exact = experts_ref(x, d13, d2, torch.zeros(M, E, device="cuda").scatter(1, ids, wts),
                        compute_dtype=torch.float64, experts_per_chunk=16)
    # the torch pipeline: x in 1 x 128 groups, float32 GEMMs on the dequantised weights, y per
    # (pair, 128 columns), rows rounded to bf16
    xq, sx = quantize_per_token_group_ref(x)
    xd = (xq.float().reshape(M, H // B, B) * sx[:, :, None]).reshape(M, H)
    pw32 = dataclasses_replace_weights(pw, d13, d2)
    same = _by_expert(pw32, xd, ids, wts, B, torch.float32, True, y_fp8=True).to(BF16)
    rel, _ = _errs(out, exact)
    t_rel, _ = _errs(same, exact)
    assert torch.isfinite(out).all() and rel <= 1.2 * t_rel, (rel, t_rel)


@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("M", [1, 64])
@pytest.mark.parametrize("strategy", ["dense", "skip"])
def test_block_fp8_dense_and_skip_on_model_shapes(shape, M, strategy):
    """The dense and skipping paths on 128 x 128 block-scaled weights: within 1.2x the error of the
    same pipeline in torch (x in 1 x 128 groups, y per (token, expert)), against float64."""
    from densemoe.reference import experts_ref, quantize_per_token_group_ref

    s = SHAPES[shape]
    E, I, H, B = s.experts, s.inter, s.hidden, 128
    g = torch.Generator(device="cuda").manual_seed(M + 7)

    w13, s13, d13, w2, s2, d2 = _block_weights(E, I, H, g)
    pw = prepare_weights(w13, w2, w13_scale=s13, w2_scale=s2)
    x = torch.randn(M, H, device="cuda", generator=g, dtype=BF16)
    ids = torch.rand(M, E, device="cuda", generator=g).topk(s.topk, dim=1).indices
    wts = torch.softmax(torch.randn(M, s.topk, device="cuda", generator=g), dim=1)
    alpha = torch.zeros(M, E, device="cuda").scatter(1, ids, wts)
    out = densemoe.experts_forward(x, pw, alpha, strategy=strategy, expert_ids=ids)
    exact = experts_ref(x, d13, d2, alpha, compute_dtype=torch.float64, experts_per_chunk=16)
    xq, sx = quantize_per_token_group_ref(x)
    xd = (xq.float().reshape(M, H // B, B) * sx[:, :, None]).reshape(M, H)
    same = _by_expert(dataclasses_replace_weights(pw, d13, d2), xd, ids, wts, I, torch.float32, False,
                      y_fp8=True).to(BF16)  # y quantised over all of I: per (token, expert)
    rel, _ = _errs(out, exact)
    t_rel, _ = _errs(same, exact)
    assert torch.isfinite(out).all() and rel <= 1.2 * t_rel, (rel, t_rel)


def _block_weights(E, I, H, g, B=128):
    """fp8 experts with a float32 scale per 128 x 128 block, spread over 20x as in checkpoints,
    and the float32 weights they stand for: (w13, s13, d13, w2, s2, d2)."""
    def one(rows, cols, fan_in):
        sc = (torch.rand(E, rows // B, cols // B, device="cuda", generator=g) * 19 + 1) * (fan_in ** -0.5 / 448)
        q = (torch.randn(E, rows, cols, device="cuda", generator=g) * 120).clamp(-448, 448).to(FP8)
        return q, sc, (q.float().reshape(E, rows // B, B, cols // B, B) * sc[:, :, None, :, None]).reshape(E, rows, cols)

    return (*one(2 * I, H, H), *one(H, I, I))


def dataclasses_replace_weights(pw, d13, d2):
    """PreparedWeights of the dequantised float32 weights (per-expert scales of one), in the
    kernels' layout, for ``_by_expert``'s torch pipeline."""
    from densemoe.weights import PreparedWeights

    E, two_i, H = d13.shape
    ones = torch.ones(E, device=d13.device)
    return PreparedWeights(d13.reshape(E * two_i, H), ones, d2.permute(1, 0, 2).reshape(H, E * two_i // 2), ones)


def test_checkpoint_loads_to_the_gpu_as_it_is(tmp_path):
    """A tiny DeepSeek-V3-style block-fp8 checkpoint loads onto the GPU without dequantising: fp8
    weights and float32 block scales on the device, the peak of memory while loading reported and
    within twice the experts' bytes (the stacks, and one permuted copy of w2 while preparing)."""
    import safetensors  # noqa: F401 - transformers brings it

    from test_checkpoint import write_checkpoint

    from densemoe.integrations.checkpoint import load_moe_layer

    write_checkpoint(tmp_path, "deepseek_v3", True)
    moe = load_moe_layer(tmp_path, 1, device="cuda")
    pw = moe.prepared
    assert pw.w1.device.type == "cuda" and pw.dtype == FP8 and pw.block == 128
    stats = moe.checkpoint_stats
    assert stats["peak_bytes_above_start"] is not None
    assert stats["peak_bytes_above_start"] <= 2 * stats["expert_bytes"] + (1 << 20), stats
    x = torch.randn(5, pw.hidden, device="cuda", dtype=BF16)
    assert torch.isfinite(moe(x)).all()
