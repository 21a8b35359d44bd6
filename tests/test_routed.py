"""The routed path on the CPU (Triton's interpreter): the schedule against its twin bit for bit,
the grouped GEMMs against float64 and against PyTorch at the same precision, the dense path,
the edge cases of routing, the custom ops, torch.compile, the strategy rule and bad input."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import densemoe
from densemoe import experts_forward, prepare_weights
from densemoe.kernels.common import RoutedProblem
from densemoe.kernels.triton.routed import RoutedConfig, can_implement
from densemoe.ops import routed_configs, strategy
from densemoe.ops.routed import moe_schedule, routed_experts
from densemoe.quant import FP8, quantize_per_token, quantize_per_token_group
from densemoe.reference import experts_ref, moe_schedule_ref, routed_experts_ref
from densemoe.shapes import SHAPES
from densemoe.tuning import cache

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
interp = pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
BF16 = torch.bfloat16

# small tiles so that tiny shapes still cut experts into several tiles and columns
SMALL = RoutedConfig(block_m=16, fc1_block_i=32, fc1_block_k=32, fc2_block_n=32, fc2_block_k=32)
SMALL_SWAP = RoutedConfig(block_m=16, fc1_block_i=32, fc1_block_k=32, fc1_swap_ab=True, fc2_block_n=32,
                          fc2_block_k=32, fc2_swap_ab=True, programs_per_sm=2)


def weights(E, I, H, seed=0, nan_experts=()):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    for e in nan_experts:
        w13[e] = float("nan")
        w2[e] = float("nan")
    return w13, w2


def uniform_routing(M, E, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(M, E, generator=g).topk(k, dim=1).indices
    wts = torch.softmax(torch.randn(M, k, generator=g), dim=1)
    return ids, wts


def tokens(M, H, seed=2):
    return torch.randn(M, H, generator=torch.Generator().manual_seed(seed)).to(BF16)


def errors(out, ref):
    d = out.double() - ref.double()
    return (d.norm() / ref.double().norm().clamp_min(1e-300)).item(), d.abs().max().item()


def torch_same_precision(pw, x, ids, wts, group, round_rows=True):
    """The routed pipeline in plain torch at the kernels' precision: float32 GEMMs on the same
    quantised operands (y rounded as the kernel stores it), each pair's row rounded to bf16,
    the k rows summed in float32, bf16 out (``round_rows=False``: the rows stay float32, as
    FC2's atomic combine adds them)."""
    M, H = x.shape
    k = ids.shape[1]
    if pw.dtype == FP8:
        xq, sx = quantize_per_token(x)
        kw = dict(x_scale=sx, y_group=group)
    else:
        xq, kw = x, dict(y_dtype=BF16)
    rows = torch.zeros(M, k, H)
    for j in range(k):  # one slot at a time: each (token, slot) row on its own, rounded to bf16
        ids_j = torch.full_like(ids, -1)
        ids_j[:, j] = ids[:, j]
        rows[:, j] = routed_experts_ref(xq, pw.w1, pw.alpha1, pw.w2, pw.w2_scale, ids_j, wts, compute_dtype=torch.float32,
                                        **kw)
        rows[:, j] = rows[:, j].to(BF16).float() if round_rows else rows[:, j]
    return rows.sum(1).to(BF16)


def exact(pw, x, ids, wts, group):
    if pw.dtype == FP8:
        xq, sx = quantize_per_token(x)
        return routed_experts_ref(xq, pw.w1, pw.alpha1, pw.w2, pw.w2_scale, ids, wts, x_scale=sx, y_group=group)
    return routed_experts_ref(x, pw.w1, pw.alpha1, pw.w2, pw.w2_scale, ids, wts, y_dtype=BF16)


def assert_as_accurate_as_torch(out, ref, same):
    assert torch.isfinite(out).all()
    rel, mx = errors(out, ref)
    t_rel, t_mx = errors(same, ref)
    assert rel <= 1.5 * t_rel + 2 ** -20, (rel, t_rel)
    assert mx <= 2 * t_mx + 2 ** -20 * ref.abs().max().item(), (mx, t_mx)


# ------------------------------------------------------------------------------- the schedule


def assert_schedule(ids, E, small_p=None):
    """offsets equal the twin's; each expert's segment holds the twin's pairs (in pair order up
    to ``SMALL_P`` pairs; above, the order within a segment is the atomics'). The same for the
    launch that also quantises x (``quant_schedule_launch``), whose x8 and scales are
    ``quantize_per_token``'s bits."""
    from densemoe.kernels.triton.routed import quant_schedule_launch, schedule_launch

    s = torch.empty(ids.numel(), dtype=torch.int32)
    o = torch.empty(E + 1, dtype=torch.int32)
    schedule_launch(ids, E, s, o, small_p=small_p)
    _same_schedule(s, o, ids, E, small_p)
    M = ids.shape[0]
    x = torch.randn(M, 96, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16)
    for group in (0, 32):  # per token; in groups of 32 columns (three a row)
        xq = torch.full((M, 96), 7.0).to(FP8)
        sx = torch.full((M, 96 // group) if group else (M,), float("nan"))
        s.fill_(-7)
        o.fill_(-7)
        quant_schedule_launch(x, xq, sx, ids, E, s, o, group=group, small_p=small_p)
        _same_schedule(s, o, ids, E, small_p)
        q_ref, s_ref = quantize_per_token_group(x, group) if group else quantize_per_token(x)
        assert torch.equal(xq.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(sx, s_ref), group


def _same_schedule(s, o, ids, E, small_p):
    from densemoe.kernels.triton.routed import SMALL_P

    s_ref, o_ref = moe_schedule_ref(ids, E)
    assert torch.equal(o, o_ref), (o, o_ref)
    n = int(o_ref[-1])
    if ids.numel() <= (SMALL_P if small_p is None else small_p):
        assert torch.equal(s[:n], s_ref[:n])
    for e in range(E):
        seg = slice(int(o_ref[e]), int(o_ref[e + 1]))
        assert torch.equal(s[seg].sort().values, s_ref[seg].sort().values), e


@interp
@pytest.mark.parametrize("M,E,k", [(1, 8, 2), (7, 16, 4), (100, 40, 8), (1000, 256, 8), (3, 1024, 8)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("small_p", [None, 0])  # the default split; the two-launch form for every size
def test_schedule_matches_its_twin(M, E, k, dtype, small_p):
    ids, _ = uniform_routing(M, E, k)
    assert_schedule(ids.to(dtype), E, small_p)
    s, o = moe_schedule(ids.to(dtype), E)  # the public op
    assert torch.equal(o, moe_schedule_ref(ids, E)[1])


@interp
@pytest.mark.parametrize("small_p", [None, 0])
def test_schedule_edge_routings(small_p):
    E = 16
    one = torch.full((9, 2), 3, dtype=torch.int64)  # every pair on expert 3 (repeats in a row too)
    bad = torch.tensor([[0, -1], [E, 5], [2 ** 33 + 1, 1], [7, 15]])  # outside [0, E): dropped; no wrap
    for ids in (one, bad):
        assert_schedule(ids, E, small_p)
    assert int(moe_schedule(bad, E)[1][-1]) == 5



@interp
@pytest.mark.parametrize("M,k,E", [(3, 2, 8), (5, 3, 4), (37, 8, 64)])  # P = 6, 15, 296: not powers of two
@pytest.mark.parametrize("small_p", [None, 0])
def test_schedule_writes_nothing_past_its_buffers(M, k, E, small_p):
    """Guard elements after sorted_pairs and offsets stay as they were (every id valid, so the
    sort's store mask runs to the last pair: a mask one too wide writes past the buffer)."""
    from densemoe.kernels.triton.routed import quant_schedule_launch, schedule_launch
    ids, _ = uniform_routing(M, E, k, seed=M)
    P = M * k
    s = torch.full((P + 1,), -7, dtype=torch.int32)
    o = torch.full((E + 2,), -7, dtype=torch.int32)
    schedule_launch(ids, E, s[:P], o[:E + 1], small_p=small_p)
    assert s[P] == -7 and o[E + 1] == -7
    assert torch.equal(o[:E + 1], moe_schedule_ref(ids, E)[1])
    H = 80  # not a power of two: the quantisation's row mask matters too (and five groups of 16)
    x = torch.randn(M + 1, H).to(torch.bfloat16)
    for group in (0, 16):
        xq = torch.full((M + 1, H), 7.0).to(FP8)
        sx = torch.full((M + 1, H // group) if group else (M + 1,), -7.0)
        s.fill_(-7)
        o.fill_(-7)
        quant_schedule_launch(x[:M], xq[:M], sx[:M], ids, E, s[:P], o[:E + 1], group=group, small_p=small_p)
        assert s[P] == -7 and o[E + 1] == -7 and (sx[M] == -7).all() and (xq[M].float() == 7).all()
        assert torch.equal(o[:E + 1], moe_schedule_ref(ids, E)[1])


@interp
def test_combine_skips_slots_whose_id_is_outside_the_experts():
    """The combine adds no row of a dropped pair, whatever that row holds (its buffer is not
    written for such pairs: NaN here stands for what torch.empty may hold)."""
    from densemoe.kernels.triton.routed import combine_launch
    M, k, H, E = 5, 3, 80, 8
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(M * k, H, generator=g).to(BF16)
    ids = torch.randint(0, E, (M, k), generator=g)
    ids[0, 0], ids[2, 1], ids[4, 2], ids[3, 0] = -1, E, 1 << 40, -5
    bad = ((ids < 0) | (ids >= E)).reshape(-1)
    rows[bad] = float("nan")
    out = torch.full((M, H), float("nan"), dtype=BF16)
    combine_launch(rows, ids, out, E)
    ref = rows.float().masked_fill(bad[:, None], 0.0).view(M, k, H).sum(1).to(BF16)
    assert torch.equal(out, ref)


# --------------------------------------------------------------------------- the whole path


@interp
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("M,E,k,cfg", [
    (1, 8, 2, SMALL), (7, 16, 4, SMALL_SWAP), (100, 8, 2, SMALL), (100, 8, 2, SMALL_SWAP),
    (1000, 8, 2, RoutedConfig(block_m=64, fc1_block_i=64, fc1_block_k=32, fc2_block_n=64, fc2_block_k=32)),
    (3, 32, 8, None),  # M * k smaller than a block, most experts without a token, the default config
    (100, 8, 2, dataclasses.replace(SMALL, atomic_combine=True, flatten=True)),
    (7, 16, 4, dataclasses.replace(SMALL_SWAP, atomic_combine=True)),
    (100, 8, 2, dataclasses.replace(SMALL, tma=False)),  # pointer loads of the weights
    (7, 16, 4, dataclasses.replace(SMALL_SWAP, tma=False, flatten=True)),
    # FC2 on tiles of its own: wider and narrower than FC1's, swapped, its own programs per SM
    (100, 8, 2, dataclasses.replace(SMALL, fc2_block_m=32, fc2_programs_per_sm=3)),
    (1000, 8, 2, RoutedConfig(block_m=64, fc1_block_i=64, fc1_block_k=32, fc2_block_n=64, fc2_block_k=32,
                              fc2_block_m=16, fc2_swap_ab=True)),
    (7, 16, 4, dataclasses.replace(SMALL_SWAP, fc2_block_m=64, fc2_swap_ab=False, fc2_programs_per_sm=1)),
])
def test_routed_against_float64_and_torch(dtype, M, E, k, cfg):
    _routed_against_float64_and_torch(dtype, M, E, k, cfg, 64, 64)


@interp
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("cfg", [
    # no tile divides I = 96 or H = 80: the column and k masks of both GEMMs, the y groups' last one
    # part past I, FC2's k-step a quarter of FC1's column tile (a y scale per two k-steps)
    RoutedConfig(block_m=16, fc1_block_i=64, fc1_block_k=32, fc2_block_n=64, fc2_block_k=16, tma=False),
    RoutedConfig(block_m=16, fc1_block_i=64, fc1_block_k=32, fc1_swap_ab=True, fc2_block_n=64, fc2_block_k=32,
                 fc2_swap_ab=True, tma=False),
    # square swapped tiles: a missing transpose or a wrong reduction axis changes values, not shapes
    RoutedConfig(block_m=32, fc1_block_i=32, fc1_block_k=32, fc1_swap_ab=True, fc2_block_n=32, fc2_block_k=32,
                 fc2_swap_ab=True),
])
def test_routed_where_no_tile_divides_the_dims(dtype, cfg):
    _routed_against_float64_and_torch(dtype, 37, 8, 2, cfg, 96 if cfg.fc1_block_i == 64 else 64,
                                      80 if cfg.fc1_block_i == 64 else 64)


def _routed_against_float64_and_torch(dtype, M, E, k, cfg, I, H):
    w13, w2 = weights(E, I, H)
    pw = prepare_weights(w13, w2, dtype=dtype)
    x = tokens(M, H)
    ids, wts = uniform_routing(M, E, k)
    out = routed_experts(x, pw, ids, wts, config=cfg)
    group = (cfg or routed_configs.choose(RoutedProblem(M, H, E, I, k, pw.dtype, BF16), "cpu").config).fc1_block_i
    assert out.dtype == BF16 and out.shape == (M, H)
    same = torch_same_precision(pw, x, ids, wts, group, round_rows=not (cfg and cfg.atomic_combine))
    assert_as_accurate_as_torch(out, exact(pw, x, ids, wts, group), same)


@interp
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("cfg", [SMALL, SMALL_SWAP, dataclasses.replace(SMALL, flatten=True, tma=False),
                                 dataclasses.replace(SMALL, fc2_block_m=32, fc2_programs_per_sm=2)])
def test_fused_combine_is_the_combine_bit_for_bit(dtype, cfg):
    """fused_combine: FC2's program that lands a token's last valid pair sums its k rows in slot
    order, as the combine kernel does: the same bits, with dropped slots, a token whose every id
    is out of range (a zero row), repeated ids in a row, ragged M; the per-(token, column tile)
    counters are left at zero for the next launch."""
    from densemoe.kernels.common import stream_buffer

    E, k, I, H = 8, 3, 64, 96  # H = 96: a ragged last column tile
    w13, w2 = weights(E, I, H)
    pw = prepare_weights(w13, w2, dtype=dtype)
    fused = dataclasses.replace(cfg, fused_combine=True)
    for M in (1, 7, 100):
        x = tokens(M, H, seed=M)
        ids, wts = uniform_routing(M, E, k, seed=M)
        ids[0, 1] = -1
        if M > 3:
            ids[2] = torch.tensor([E, -3, 1 << 40])  # no valid slot: the output row is 0
            ids[3, 2] = ids[3, 0]  # an expert twice in one row: once per slot
        want = routed_experts(x, pw, ids, wts, config=cfg)
        got = routed_experts(x, pw, ids, wts, config=fused)
        assert torch.equal(got, want), (M, (got.float() - want.float()).abs().max())
        if M > 3:
            assert (got[2] == 0).all()
        assert not stream_buffer("cpu").any()  # the counters back at zero
        assert torch.equal(routed_experts(x, pw, ids, wts, config=fused), want)  # and reused


@interp
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("cfg", [SMALL, dataclasses.replace(SMALL, tma=False), SMALL_SWAP])
@pytest.mark.parametrize("hoist", [True, False])
def test_column_stream_is_fc2_bit_for_bit(dtype, cfg, hoist, monkeypatch):
    """fc2_col_groups: FC2's units run over a group of column tiles, the k-steps unrolled in the
    pipelined column loop; the same k-steps in the same order as one column tile per unit, so the
    same bits: for one group (every column tile), two (the last group shorter: 3 tiles of 32) and
    three (one tile each), I in one k-step and in two, ragged M, dropped slots; with the unit's y
    operand loaded once before the column loop (``FC2_HOIST_Y``) and in the loop."""
    from densemoe.kernels.triton import routed as kern

    monkeypatch.setattr(kern, "FC2_HOIST_Y", hoist)
    E, k, H = 8, 3, 96
    for I, bk, ms in ((64, 32, (1, 7, 100)), (32, 32, (7,))):
        w13, w2 = weights(E, I, H)
        pw = prepare_weights(w13, w2, dtype=dtype)
        base = dataclasses.replace(cfg, fc1_block_i=min(cfg.fc1_block_i, I), fc2_block_k=bk)
        for M in ms:
            x = tokens(M, H, seed=M)
            ids, wts = uniform_routing(M, E, k, seed=M)
            ids[0, 1] = -1
            want = routed_experts(x, pw, ids, wts, config=base)
            for groups in (1, 2, 3):
                got = routed_experts(x, pw, ids, wts, config=dataclasses.replace(base, fc2_col_groups=groups))
                assert torch.equal(got, want), (I, M, groups, (got.float() - want.float()).abs().max())


@interp
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("cfg", [SMALL, dataclasses.replace(SMALL_SWAP, fused_combine=True)])
def test_column_major_order_is_the_same_bits(dtype, cfg):
    """fc2_col_major: FC2's units column tile by column tile; every unit computes what it did, so
    the rows, and the fused combine's sums, are the same bits; ragged M, dropped slots, H = 96
    (a ragged last column tile)."""
    E, k, I, H = 8, 3, 64, 96
    w13, w2 = weights(E, I, H)
    pw = prepare_weights(w13, w2, dtype=dtype)
    for M in (1, 7, 100):
        x = tokens(M, H, seed=M)
        ids, wts = uniform_routing(M, E, k, seed=M)
        ids[0, 1] = -1
        want = routed_experts(x, pw, ids, wts, config=cfg)
        got = routed_experts(x, pw, ids, wts, config=dataclasses.replace(cfg, fc2_col_major=True))
        assert torch.equal(got, want), (M, (got.float() - want.float()).abs().max())


@interp
@pytest.mark.parametrize("order", [dict(fc2_col_groups=2), dict(fc2_col_major=True)])
def test_column_stream_and_order_with_the_atomic_combine(order):
    """The atomic combine adds in no fixed order: the stream and the column-major order are held to
    the float64 bound."""
    E, k, I, H, M = 8, 2, 64, 96, 100
    w13, w2 = weights(E, I, H)
    pw = prepare_weights(w13, w2, dtype="fp8")
    x = tokens(M, H)
    ids, wts = uniform_routing(M, E, k)
    cfg = dataclasses.replace(SMALL, atomic_combine=True, **order)
    out = routed_experts(x, pw, ids, wts, config=cfg)
    same = torch_same_precision(pw, x, ids, wts, cfg.fc1_block_i, round_rows=False)
    assert_as_accurate_as_torch(out, exact(pw, x, ids, wts, cfg.fc1_block_i), same)


@interp
def test_the_column_stream_probe_checks_itself_on_the_cpu():
    """bench/probes/routed_fc2_stream.py checks every config it would time against the choice's
    rows: on a tiny shape through the interpreter, so a device call does not find its bugs."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "bench" / "probes" / "routed_fc2_stream.py"), "--check"],
                       cwd=root, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "check passed" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


def test_column_stream_configs_are_checked():
    from densemoe.kernels.triton.routed import config_problems

    p = RoutedProblem(64, 7168, 256, 256, 8, FP8, BF16)
    ok = RoutedConfig(block_m=16, fc1_swap_ab=True, fc2_block_n=256, fc2_swap_ab=True, fc2_stages=3, fc2_col_groups=4)
    assert can_implement(p, ok) == (True, "")
    for bad, why in ((dataclasses.replace(ok, fc2_col_groups=29), "exceeds H's 28 column tiles"),
                     (dataclasses.replace(ok, fc2_stages=4), "FC2's 4 stages"),  # 4 x 68 KB: whole-I stages
                     (dataclasses.replace(ok, flatten=True), "one at most"),
                     (dataclasses.replace(ok, fused_combine=True), "stop Triton from pipelining"),
                     (dataclasses.replace(ok, fc2_col_major=True), "two orders")):
        good, msg = can_implement(p, bad)
        assert not good and why in msg, msg
    assert not can_implement(RoutedProblem(64, 2048, 128, 2048, 8, FP8, BF16), ok)[0]  # 16 unrolled k-steps
    assert "0..64" in " ".join(config_problems(dataclasses.replace(ok, fc2_col_groups=-1), True))


def test_fc2_on_tiles_of_its_own_is_what_fc2_runs():
    """fc2_block_m / fc2_programs_per_sm: FC2's launch and FC2's rules read ``fc2_part`` (FC2's
    own block_m and programs); 0 is the shared value, and setting the shared value is refused
    (one config, one string); FC2's shared memory is counted at its own rows."""
    from densemoe.kernels.triton.routed import config_problems

    cfg = RoutedConfig(block_m=128, fc1_warps=8, fc1_stages=2, fc2_block_m=64, fc2_programs_per_sm=2)
    part = cfg.fc2_part()
    assert (part.block_m, part.programs_per_sm, part.fc2_block_m, part.fc2_programs_per_sm) == (64, 2, 0, 0)
    assert part.fc1_warps == 8 and SMALL.fc2_part() is SMALL
    assert "fc2:n128k128w4st3m64p2/p1" in cfg.short()
    assert not config_problems(cfg, True)
    for bad in (dataclasses.replace(cfg, fc2_block_m=128), dataclasses.replace(cfg, fc2_programs_per_sm=1)):
        assert "leave them 0" in " ".join(config_problems(bad, True))
    assert "power of two" in " ".join(config_problems(dataclasses.replace(cfg, fc2_block_m=48), True))
    assert "fc2_programs_per_sm" in " ".join(config_problems(dataclasses.replace(cfg, fc2_programs_per_sm=5), True))
    # FC2's stages at 256-row tiles of its own do not fit where 64-row FC1 tiles' do
    p = RoutedProblem(4096, 2048, 128, 768, 8, BF16, BF16)
    assert can_implement(p, RoutedConfig(fc2_block_k=64, fc1_block_k=64, fc2_stages=4))[0]
    ok, why = can_implement(p, RoutedConfig(fc2_block_k=64, fc1_block_k=64, fc2_stages=4, fc2_block_m=256,
                                            fc2_block_n=256))
    assert not ok and "FC2's 4 stages" in why, why


@interp
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_split_config_runs_fc1_of_one_and_fc2_of_the_other_bit_for_bit(dtype):
    """A config with FC1 and FC2 on tiles of their own (``tuning.space.with_fc1_of``): the bits of
    FC1's stage at the one config, then FC2's stage at the other, run by hand; ragged M, dropped
    slots, FC2's rows cut wider and narrower than FC1's."""
    from densemoe.ops.routed import _fc1_stage, _fc2_stage, _inputs
    from densemoe.tuning.space import with_fc1_of

    E, k, I, H = 8, 3, 64, 96
    w13, w2 = weights(E, I, H)
    pw = prepare_weights(w13, w2, dtype=dtype)
    fc1s = (SMALL, dataclasses.replace(SMALL_SWAP, block_m=32, programs_per_sm=1))
    fc2s = (dataclasses.replace(SMALL, block_m=64, fc2_block_n=64, programs_per_sm=3),
            dataclasses.replace(SMALL_SWAP, fc2_col_groups=2), dataclasses.replace(SMALL, fused_combine=True))
    for M, (a, b) in zip((1, 7, 100, 100, 7, 1), [(a, b) for a in fc1s for b in fc2s]):
        x = tokens(M, H, seed=M)
        ids, wts = uniform_routing(M, E, k, seed=M)
        ids[0, 1] = -1
        split = with_fc1_of(b, a)
        assert split.fc2_part() == dataclasses.replace(b, **{n: getattr(a, n) for n in (
            "fc1_block_k", "fc1_swap_ab", "fc1_warps", "fc1_stages", "fc1_tail_m", "fc1_sorted_x", "fc1_cute")})
        xq, sx, ids_c, wts_c = _inputs(x, pw, ids, wts, split, None)
        sorted_pairs, offsets, y, ys = _fc1_stage(xq, sx, pw.w1, pw.alpha1, ids_c, a)
        want = torch.full((M, H), float("nan"), dtype=BF16)
        _fc2_stage(y, ys, pw.w2, pw.w2_scale, sorted_pairs, offsets, ids_c, wts_c, want, b)
        got = routed_experts(x, pw, ids, wts, config=split)
        assert torch.equal(got, want), (M, a.short(), b.short())


def test_column_stream_counts_the_hoisted_y_once(monkeypatch):
    """Where I is one or two k-steps the column stream loads a unit's y tiles once before its
    column loop, so can_implement counts them once and the ring as w2's tiles only."""
    from densemoe.kernels.triton import routed as kern

    p = RoutedProblem(4096, 7168, 256, 256, 8, FP8, BF16)
    cfg = RoutedConfig(block_m=64, fc2_block_n=256, fc2_block_k=128, fc2_stages=3, fc2_col_groups=2)
    assert kern.stream_hoists_y(256, 128) and not kern.stream_hoists_y(768, 128)
    assert can_implement(p, cfg)[0]  # 2 x 64 x 128 once + 3 stages of 2 x 256 x 128: 208 KB
    monkeypatch.setattr(kern, "FC2_HOIST_Y", False)
    ok, why = can_implement(p, cfg)  # 3 stages of 2 x (64 + 256) x 128: 240 KB
    assert not ok and "exceed shared memory" in why


def test_config_strings_stored_before_later_fields_still_parse():
    full = RoutedConfig(block_m=32, fc2_block_n=256, programs_per_sm=2).to_str()
    old = full.rsplit(",", 11)[0]  # 15 fields: stored before the eleven later ones (_LATER_FIELDS)
    assert RoutedConfig.from_str(old) == RoutedConfig(block_m=32, fc2_block_n=256, programs_per_sm=2)
    for later in range(1, 11):  # 25 ... 16 fields
        assert RoutedConfig.from_str(full.rsplit(",", later)[0]) == RoutedConfig.from_str(old)
    assert RoutedConfig.from_str(RoutedConfig(fc2_col_major=True).to_str()).fc2_col_major
    assert RoutedConfig.from_str(RoutedConfig(fused_combine=True).to_str()).fused_combine
    assert RoutedConfig.from_str(RoutedConfig(fc2_col_groups=7).to_str()).fc2_col_groups == 7
    assert RoutedConfig.from_str(RoutedConfig(fc2_block_m=32, fc2_programs_per_sm=2).to_str()).fc2_block_m == 32
    assert RoutedConfig.from_str(RoutedConfig(fc1_cute=True, fc1_cute_gather=True).to_str()).fc1_cute_gather
    with pytest.raises(ValueError, match="a routed config has 26 fields, got 14"):
        RoutedConfig.from_str(old.rsplit(",", 1)[0])
    from densemoe.kernels.triton.routed import config_problems

    assert "one at most" in " ".join(config_problems(RoutedConfig(fused_combine=True, atomic_combine=True), True))


@interp
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_ragged_counts_one_expert_and_zero_weights(dtype):
    M, E, k, I, H = 37, 8, 2, 64, 64
    w13, w2 = weights(E, I, H, seed=3)
    pw = prepare_weights(w13, w2, dtype=dtype)
    x = tokens(M, H, seed=4)
    g = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(M)])  # experts 6, 7: no token
    ids[:20, 0] = 2  # expert 2 gets at least 20 rows: ragged tiles
    ids[:20, 1] = torch.where(ids[:20, 1] == 2, 1, ids[:20, 1])
    wts = torch.rand(M, k, generator=g)
    wts[::3, 1] = 0.0  # zero routing weights add nothing
    out = routed_experts(x, pw, ids, wts, config=SMALL)
    assert_as_accurate_as_torch(out, exact(pw, x, ids, wts, 32), torch_same_precision(pw, x, ids, wts, 32))
    ids_one = torch.full((M, 1), 4)  # all tokens on one expert
    out1 = routed_experts(x, pw, ids_one, wts[:, :1], config=SMALL_SWAP)
    assert_as_accurate_as_torch(out1, exact(pw, x, ids_one, wts[:, :1], 32),
                                torch_same_precision(pw, x, ids_one, wts[:, :1], 32))


@interp
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_nan_in_experts_no_token_picked_never_reaches_the_output(dtype):
    M, E, k, I, H = 9, 8, 2, 64, 64
    w13, w2 = weights(E, I, H, nan_experts=(6, 7))
    pw = prepare_weights(w13, w2, dtype="bf16") if dtype == "bf16" else None
    if dtype == "fp8":  # quantise the finite experts; the NaN ones stay NaN in fp8
        w13c, w2c = weights(E, I, H)
        pw0 = prepare_weights(w13c, w2c, dtype="fp8")
        w1 = pw0.w1.clone().view(E, 2 * I, H)
        w1[6:] = torch.tensor(float("nan")).to(FP8)
        w2k = pw0.w2.clone().view(H, E, I)
        w2k[:, 6:] = torch.tensor(float("nan")).to(FP8)
        pw = type(pw0)(w1.reshape(E * 2 * I, H), pw0.alpha1, w2k.reshape(H, E * I), pw0.w2_scale)
    x = tokens(M, H)
    g = torch.Generator().manual_seed(6)
    ids = torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(M)])
    out = routed_experts(x, pw, ids, torch.rand(M, k, generator=g), config=SMALL)
    assert torch.isfinite(out).all()


@interp
def test_routed_equals_dense_within_the_rows_rounding():
    """bf16: the dense path (FC1 -> FC2 over all experts, alpha) and the routed path compute the
    same y in bf16; routed rounds each pair's weighted row to bf16 before the fp32 combine, so
    the two differ by at most that rounding (2^-8 of the rows' magnitudes) and the outputs'."""
    M, E, k, I, H = 33, 8, 2, 64, 64
    w13, w2 = weights(E, I, H, seed=7)
    pw = prepare_weights(w13, w2, dtype="bf16")
    x = tokens(M, H, seed=8)
    ids, wts = uniform_routing(M, E, k, seed=9)
    alpha = torch.zeros(M, E).scatter(1, ids, wts)
    dense = experts_forward(x, pw, alpha, strategy="dense")
    routed = experts_forward(x, pw, alpha, strategy="routed", expert_ids=ids)
    rows = torch.stack([routed_experts_ref(x, pw.w1, pw.alpha1, pw.w2, pw.w2_scale, ids[:, j:j + 1], wts[:, j:j + 1],
                                           y_dtype=BF16).abs() for j in range(k)]).sum(0)
    bound = 2 ** -8 * rows + 2 ** -8 * dense.double().abs() + 2 ** -8 * routed.double().abs()
    assert ((routed.double() - dense.double()).abs() <= bound).all()


@interp
def test_repeated_and_changing_routings_are_deterministic():
    M, E, k, I, H = 20, 8, 2, 64, 64
    pw = prepare_weights(*weights(E, I, H), dtype="fp8")
    x = tokens(M, H)
    a, wa = uniform_routing(M, E, k, seed=10)
    b, wb = uniform_routing(M, E, k, seed=11)
    first = routed_experts(x, pw, a, wa, config=SMALL)
    other = routed_experts(x, pw, b, wb, config=SMALL)
    again = routed_experts(x, pw, a, wa, config=SMALL)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@interp
def test_m_zero_and_x_quant():
    E, k, I, H = 8, 2, 64, 64
    pw = prepare_weights(*weights(E, I, H), dtype="fp8")
    out = routed_experts(torch.empty(0, H, dtype=BF16), pw, torch.empty(0, k, dtype=torch.long), torch.empty(0, k))
    assert out.shape == (0, H)
    for M in (5, 600):  # x quantised in the schedule's one launch (P <= 1024), then apart (P > 1024)
        x = tokens(M, H)
        ids, wts = uniform_routing(M, E, k)
        assert torch.equal(routed_experts(x, pw, ids, wts, x_quant=quantize_per_token(x), config=SMALL),
                           routed_experts(x, pw, ids, wts, config=SMALL))


@interp
@pytest.mark.parametrize("M", [5, 600])
def test_block_fp8_x_quant_given_or_in_the_schedules_launch(M):
    """With block-scaled weights, x quantised in 1 x 128 groups by the caller (``x_quant``) or by
    the routed op: the same bits (in the schedule's one launch at M = 5, apart at M = 600)."""
    from _helpers import block_weights

    E, k, I, H = 4, 2, 128, 256
    w13, s13, _, w2, s2, _ = block_weights(E, I, H, seed=M)
    pw = prepare_weights(w13, w2, w13_scale=s13, w2_scale=s2)
    x = tokens(M, H)
    ids, wts = uniform_routing(M, E, k)
    assert torch.equal(routed_experts(x, pw, ids, wts, x_quant=quantize_per_token_group(x, 128)),
                       routed_experts(x, pw, ids, wts))


@interp
@pytest.mark.parametrize("block", [False, True])
def test_x_quantised_in_the_schedules_launch_up_to_small_p_pairs(monkeypatch, block):
    """The op quantises x in the schedule's launch only where that is one launch (P <= SMALL_P);
    above, the fused form's two launches measured slower (docs/routed-journal.md "Seventeenth session")."""
    from _helpers import block_weights

    from densemoe.kernels.triton import routed as kern

    calls = []
    fused = kern.quant_schedule_launch
    monkeypatch.setattr(kern, "quant_schedule_launch", lambda *a, **kw: (calls.append(a[3].numel()), fused(*a, **kw)))
    monkeypatch.setattr(kern, "SMALL_P", 16)
    E, k, I, H = 4, 2, 128, 256
    if block:
        w13, s13, _, w2, s2, _ = block_weights(E, I, H, seed=3)
        pw = prepare_weights(w13, w2, w13_scale=s13, w2_scale=s2)
    else:
        pw = prepare_weights(*weights(E, I, H), dtype="fp8")
    for M in (8, 9):  # 16 pairs, then 18
        x = tokens(M, H)
        ids, wts = uniform_routing(M, E, k)
        xq = quantize_per_token_group(x, 128) if block else quantize_per_token(x)
        assert torch.equal(routed_experts(x, pw, ids, wts, x_quant=xq), routed_experts(x, pw, ids, wts))
    assert calls == [16], calls


# -------------------------------------------------------------------- custom ops and compile


@interp
def test_custom_ops_opcheck():
    M, E, k, I, H = 7, 8, 2, 64, 64
    pw = prepare_weights(*weights(E, I, H), dtype="bf16")  # (opcheck's schema test multiplies inputs: no fp8)
    x = tokens(M, H)
    ids, wts = uniform_routing(M, E, k)
    out = torch.empty(M, H, dtype=BF16)
    for cfg in (SMALL.to_str(), ""):
        torch.library.opcheck(torch.ops.densemoe.routed_experts.default,
                              (x, None, pw.w1, pw.alpha1, pw.w2, pw.w2_scale, ids, wts, out, cfg))
    torch.library.opcheck(torch.ops.densemoe.moe_schedule.default,
                          (ids, E, torch.empty(M * k, dtype=torch.int32), torch.empty(E + 1, dtype=torch.int32)))


@interp
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_torch_compile_fullgraph(dtype):
    M, E, k, I, H = 9, 8, 2, 64, 64
    pw = prepare_weights(*weights(E, I, H), dtype=dtype)
    x = tokens(M, H)
    ids, wts = uniform_routing(M, E, k)
    alpha = torch.zeros(M, E).scatter(1, ids, wts)

    def f(x, alpha, ids):
        return experts_forward(x, pw, alpha, strategy="routed", expert_ids=ids)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(x, alpha, ids)
    assert torch.equal(got, f(x, alpha, ids))


# ------------------------------------------------------------------------- rule and configs


def test_pick_skips_small_batches_and_routes_the_rest():
    assert strategy.pick(1, 256, 8) == "skip"
    assert strategy.pick(64, 256, 8) == "skip"
    assert strategy.pick(65, 256, 8) == "routed"
    assert strategy.pick(4096, 128, 8) == "routed"
    assert strategy.pick(4096, 128, 8, routed_ok=False) == "dense"


def test_resolve_forced_and_older_switch():
    r = strategy.resolve
    assert r("op", None, True, 4096, 8) == "skip"
    assert r("op", None, False, 1, 8) == "dense"
    assert r("op", "routed", None, 1, 8) == "routed"
    with pytest.raises(ValueError, match="disagree"):
        r("op", "routed", False, 1, 8)
    with pytest.raises(ValueError, match="strategy must be"):
        r("op", "fast", None, 1, 8)
    with pytest.raises(ValueError, match="cannot run here: needs ids"):
        r("op", "routed", None, 1, 8, routed_blocker="needs ids")
    assert r("op", None, None, 4096, 8, routed_blocker="needs ids") == "dense"


def test_a_recorded_crossover_is_what_pick_returns(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEMOE_CACHE_DIR", str(tmp_path))
    cache.reload()
    try:
        p = RoutedProblem(4096, 64, 8, 64, 2, FP8, BF16)
        assert strategy.pick(4096, 8, 2, problem=p, device="cpu") == "routed"
        cache.record(cache.make_key("strategy", "cpu", p), {"best": {"config": "dense"}})
        cache.reload()
        assert strategy.pick(4096, 8, 2, problem=p, device="cpu") == "dense"
        # another M bucket: not recorded, the rule
        q = RoutedProblem(2, 64, 8, 64, 2, FP8, BF16)
        assert strategy.pick(2, 8, 2, problem=q, device="cpu") == "skip"
    finally:
        cache.reload()


def test_a_block_scaled_crossover_is_keyed_by_its_block(tmp_path, monkeypatch):
    # the H200 tables record routed for block-fp8 DeepSeek-V3 TP8 at M = 16-64 where per-expert
    # fp8 records skip: each problem must find its own record, not the other's
    monkeypatch.setenv("DENSEMOE_CACHE_DIR", str(tmp_path))
    cache.reload()
    try:
        pe = RoutedProblem(64, 64, 8, 64, 2, FP8, BF16)
        blk = RoutedProblem(64, 64, 8, 64, 2, FP8, BF16, 128)
        cache.record(cache.make_key("strategy", "cpu", pe), {"best": {"config": "skip"}})
        cache.record(cache.make_key("strategy", "cpu", blk), {"best": {"config": "dense"}})
        cache.reload()
        assert strategy.pick(64, 8, 2, problem=pe, device="cpu") == "skip"
        assert strategy.pick(64, 8, 2, problem=blk, device="cpu") == "dense"
    finally:
        cache.reload()


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [FP8, BF16])
def test_default_configs_run_every_shape_and_m(shape, dtype):
    s = SHAPES[shape]
    for m in (1, 2, 7, 64, 100, 512, 1000, 4096, 16384):
        p = RoutedProblem(m, s.hidden, s.experts, s.inter, s.topk, dtype, BF16)
        cfg = routed_configs.default_config(p)
        assert can_implement(p, cfg)[0]
        assert RoutedConfig.from_str(cfg.to_str()) == cfg


def test_bad_configs_are_refused_with_the_reason():
    p = RoutedProblem(8, 64, 8, 64, 2, FP8, BF16)
    with pytest.raises(ValueError, match="fc2_block_k=128 must divide fc1_block_i=64"):
        routed_configs.choose(p, "cpu", config=RoutedConfig(fc1_block_i=64, fc2_block_k=128))
    with pytest.raises(ValueError, match="power of two"):
        routed_configs.choose(p, "cpu", config=RoutedConfig(block_m=24))
    with pytest.raises(TypeError, match="RoutedConfig"):
        routed_configs.choose(p, "cpu", config="m64")
    with pytest.raises(ValueError, match="not a routed config"):
        RoutedConfig.from_str("fc2:1,2")


# --------------------------------------------------------------------------------- bad input


@interp
def test_bad_input_names_the_argument():
    M, E, k, I, H = 4, 8, 2, 64, 64
    pw = prepare_weights(*weights(E, I, H), dtype="bf16")
    x = tokens(M, H)
    ids, wts = uniform_routing(M, E, k)
    alpha = torch.zeros(M, E).scatter(1, ids, wts)
    with pytest.raises(TypeError, match="topk_ids must have an integer dtype"):
        routed_experts(x, pw, ids.float(), wts)
    with pytest.raises(ValueError, match="topk_ids must be"):
        routed_experts(x, pw, ids[:2], wts[:2])
    with pytest.raises(ValueError, match="topk_weights must have topk_ids' shape"):
        routed_experts(x, pw, ids, wts[:, :1])
    with pytest.raises(ValueError, match=r"k must be in \[1, E=8\]"):
        routed_experts(x, pw, torch.zeros(M, 9, dtype=torch.long), torch.zeros(M, 9))
    with pytest.raises(ValueError, match="x must be"):
        routed_experts(x[:, :32], pw, ids, wts)
    with pytest.raises(ValueError, match="x_quant is for fp8"):
        routed_experts(x, pw, ids, wts, x_quant=quantize_per_token(x))
    with pytest.raises(ValueError, match="top_k=4 but expert_ids has k=2"):
        experts_forward(x, pw, alpha, top_k=4, expert_ids=ids)
    with pytest.raises(ValueError, match="strategy='routed' cannot run here"):
        experts_forward(x, pw, alpha, strategy="routed")
    with pytest.raises(ValueError, match="topk_weights needs expert_ids"):
        experts_forward(x, pw, alpha, topk_weights=wts)


def test_deterministic_mode_keeps_the_combine_in_slot_order(tmp_path, monkeypatch):
    p = RoutedProblem(4096, 64, 8, 64, 2, FP8, BF16)
    atomic = dataclasses.replace(routed_configs.default_config(p), atomic_combine=True)
    monkeypatch.setenv("DENSEMOE_CACHE_DIR", str(tmp_path))
    cache.reload()
    was = torch.are_deterministic_algorithms_enabled()
    try:
        cache.record(cache.make_key("routed", "cpu", p), {"best": {"config": atomic.to_str(), "us": 1.0}})
        cache.reload()
        assert routed_configs.choose(p, "cpu").config.atomic_combine
        torch.use_deterministic_algorithms(True)
        got = routed_configs.choose(p, "cpu")
        assert got.source == "cache" and not got.config.atomic_combine
        with pytest.raises(RuntimeError, match="not deterministic"):
            routed_configs.choose(p, "cpu", config=atomic)
    finally:
        torch.use_deterministic_algorithms(was)
        cache.reload()


@interp
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("tail,swap", [(16, False), (16, True), (32, False)])
def test_fc1_tails_ride_on_the_last_whole_tile(dtype, tail, swap):
    """fc1_tail_m: an expert's rows past a whole number of tiles, up to the tail, are multiplied
    by its last whole tile's loop. Counts that reach every case of the cut (none, fewer than a
    tile, one whole tile, a whole tile plus 1..tail rows, plus more than the tail, two whole
    tiles plus a tail, an id outside the experts): against float64 and torch as any config, and
    against the same config without tails within fp32 rounding (fp8: a y rounding step)."""
    E, k, I, H = 8, 2, 64, 64
    bm = 64 if tail == 32 else 32
    counts = [0, 5, bm, bm + 1, bm + tail, bm + tail + 1, 2 * bm, 2 * bm + 7]
    g = torch.Generator().manual_seed(3)
    flat = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)])
    flat = torch.cat([flat, torch.tensor([E])])  # one dropped pair
    flat = flat[torch.randperm(flat.numel(), generator=g)]
    if flat.numel() % k:
        flat = torch.cat([flat, torch.tensor([1])])
    ids = flat.view(-1, k)
    M = ids.shape[0]
    wts = torch.softmax(torch.randn(M, k, generator=g), dim=1)
    w13, w2 = weights(E, I, H)
    pw = prepare_weights(w13, w2, dtype=dtype)
    x = tokens(M, H)
    base = RoutedConfig(block_m=bm, fc1_block_i=32, fc1_block_k=32, fc1_swap_ab=swap, fc2_block_n=32,
                        fc2_block_k=32, fc2_swap_ab=swap)
    cfg = dataclasses.replace(base, fc1_tail_m=tail)
    assert can_implement(RoutedProblem(M, H, E, I, k, pw.dtype, BF16), cfg)[0]
    out = routed_experts(x, pw, ids, wts, config=cfg)
    valid = (ids >= 0) & (ids < E)  # torch's pipeline on the valid slots (the dropped one weighs 0)
    same = torch_same_precision(pw, x, ids.clamp(0, E - 1), wts * valid, cfg.fc1_block_i)
    assert_as_accurate_as_torch(out, exact(pw, x, ids, wts, cfg.fc1_block_i), same)
    plain = routed_experts(x, pw, ids, wts, config=base)
    rel = ((out.float() - plain.float()).norm() / plain.float().norm()).item()
    assert rel < (2e-2 if dtype == "fp8" else 1e-2), rel


def test_fc1_tail_configs_are_checked():
    from densemoe.kernels.triton.routed import config_problems

    assert not config_problems(RoutedConfig(block_m=64, fc1_tail_m=32), True)
    assert not config_problems(RoutedConfig(block_m=16, fc1_tail_m=16, fc1_swap_ab=True), True)
    for bad in (RoutedConfig(block_m=16, fc1_tail_m=32), RoutedConfig(block_m=64, fc1_tail_m=24),
                RoutedConfig(block_m=64, fc1_tail_m=16, flatten=True),
                RoutedConfig(block_m=64, fc1_tail_m=16, fc1_sorted_x=True)):
        assert any("fc1_tail_m" in b for b in config_problems(bad, True)), bad
    assert RoutedConfig.from_str(RoutedConfig(block_m=64, fc1_tail_m=16).to_str()).fc1_tail_m == 16
    assert RoutedConfig.from_str(RoutedConfig(fc1_sorted_x=True).to_str()).fc1_sorted_x
    assert RoutedConfig.from_str(RoutedConfig(fc2_y_tma=True).to_str()).fc2_y_tma


@interp
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("cfg", [SMALL, SMALL_SWAP, RoutedConfig(block_m=32, fc1_block_i=32, fc1_block_k=32,
                                                                 fc2_block_n=32, fc2_block_k=32, tma=False)])
def test_fc1_sorted_x_is_the_gather_bit_for_bit(dtype, cfg):
    """fc1_sorted_x: FC1 reads x from a copy in the sorted order (rows past the valid pairs zero)
    instead of gathering by token: the same products in the same order, so the same bits; with
    dropped slots, a token whose every id is out of range, an expert with no token, ragged M."""
    E, k, I, H = 8, 3, 64, 96
    w13, w2 = weights(E, I, H)
    pw = prepare_weights(w13, w2, dtype=dtype)
    srt = dataclasses.replace(cfg, fc1_sorted_x=True)
    for M in (1, 7, 100):
        x = tokens(M, H, seed=M)
        ids, wts = uniform_routing(M, E, k, seed=M)
        ids[ids == 5] = 6  # expert 5 gets no token
        ids[0, 1] = -1
        if M > 3:
            ids[2] = torch.tensor([E, -3, 1 << 40])
        want = routed_experts(x, pw, ids, wts, config=cfg)
        got = routed_experts(x, pw, ids, wts, config=srt)
        assert torch.equal(got, want), (M, (got.float() - want.float()).abs().max())


def test_sorted_rows_kernel_copies_the_valid_pairs_and_zeros_the_rest():
    from densemoe.kernels.triton.routed import sorted_rows_launch

    g = torch.Generator().manual_seed(0)
    M, k, E, H = 9, 2, 4, 40
    x = torch.randn(M, H, generator=g).to(BF16)
    ids = torch.randint(0, E + 2, (M, k), generator=g)  # some outside [0, E): dropped
    srt, off = moe_schedule(ids, E)
    out = torch.full((M * k, H), float("nan")).to(BF16)
    sorted_rows_launch(x, srt, off, k, out)
    n = int(off[E])
    assert torch.equal(out[:n], x[srt[:n].long() // k]) and (out[n:] == 0).all()
    assert 0 < n < M * k


@interp
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("cfg", [SMALL, SMALL_SWAP, dataclasses.replace(SMALL, fused_combine=True),
                                 dataclasses.replace(SMALL_SWAP, fc2_col_groups=2),
                                 dataclasses.replace(SMALL, flatten=True)])
def test_fc2_y_through_tma_is_the_pointer_loads_bit_for_bit(dtype, cfg):
    """fc2_y_tma: FC2 loads a tile's y rows through a TMA box at the tile's first row (the rows
    past the tile's, other experts' or never written, reach only masked outputs): the same bits
    as pointer loads, with dropped slots, a token without a valid slot, an expert with no token,
    ragged M; with the fused combine, the column stream and flatten."""
    E, k, I, H = 8, 3, 64, 96
    w13, w2 = weights(E, I, H)
    pw = prepare_weights(w13, w2, dtype=dtype)
    ytma = dataclasses.replace(cfg, fc2_y_tma=True)
    for M in (1, 7, 100):
        x = tokens(M, H, seed=M)
        ids, wts = uniform_routing(M, E, k, seed=M)
        ids[ids == 5] = 6
        ids[0, 1] = -1
        if M > 3:
            ids[2] = torch.tensor([E, -3, 1 << 40])
        want = routed_experts(x, pw, ids, wts, config=cfg)
        got = routed_experts(x, pw, ids, wts, config=ytma)
        assert torch.equal(got, want), (M, (got.float() - want.float()).abs().max())
