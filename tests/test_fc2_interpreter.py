"""The real Triton FC2 kernel through ``densemoe.fc2`` on CPU tensors (Triton's interpreter).

Every result is compared with the float64 reference, with an error bound relative to what
PyTorch gets at the same precision (``_helpers.assert_close_to_torch``).
"""

import math

import pytest
import torch

from _helpers import (FP8, IN_DTYPES, OUT_DTYPES, assert_close_to_torch, dtype_id, make_inputs,
                      seed_of, torch_loop)
import densemoe
from densemoe.kernels.triton import fc2 as kfc2
from densemoe.kernels.common import stream_buffer
from densemoe.kernels.common import Fc2Problem
from densemoe.kernels.triton.fc2 import Fc2TritonConfig, can_implement, fc2_triton
from densemoe.ops.fc2_configs import default_config
from densemoe.reference import fc2_ref

pytestmark = pytest.mark.interpreter


@pytest.fixture
def seed(request):
    return seed_of(request.node.nodeid)


def check(out, a, w, alpha):
    ref = fc2_ref(a, w, alpha, torch.float64, compute_dtype=torch.float64)
    same = torch_loop(a, w, alpha, out.dtype)
    assert_close_to_torch(out, ref, same)


def run_checked(a, w, alpha, out_dtype, config=None):
    """fc2 into a NaN-poisoned view of a larger NaN buffer; checks the result and the poison."""
    M, N = a.shape[0], w.shape[0]
    buf = torch.full((M + 2, N + 3), float("nan"), dtype=out_dtype)
    out = buf[1:M + 1, 1:N + 1]
    assert out.stride() == (N + 3, 1)
    res = densemoe.fc2(a, w, alpha, out=out, config=config)
    assert res is out
    inside = torch.zeros_like(buf, dtype=torch.bool)
    inside[1:M + 1, 1:N + 1] = True
    assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} elements of out never written"
    assert torch.isnan(buf[~inside]).all(), "fc2 wrote outside out"
    check(out, a, w, alpha)
    return out


# --------------------------------------------------------------------------------------------
# Shape grid with the default config.
# --------------------------------------------------------------------------------------------

GRID = [  # (M, N, E, I): every M in {1, 7, 33}, E in {1, 3, 8}, I in {32, 64}, N in {16, 48, 80}
    (1, 16, 1, 32),
    (1, 48, 3, 64),
    (1, 80, 8, 32),
    (1, 40, 3, 32),
    (1, 100, 8, 64),
    (7, 16, 3, 32),
    (7, 48, 8, 64),
    (7, 80, 1, 64),
    (7, 40, 8, 32),
    (7, 100, 1, 32),
    (7, 16, 8, 64),
    (33, 16, 8, 32),
    (33, 48, 1, 32),
    (33, 80, 3, 64),
    (33, 40, 1, 64),
    (33, 100, 3, 32),
    (33, 48, 8, 64),
    (1, 16, 3, 64),
    (7, 80, 3, 32),
    (33, 16, 1, 64),
]
OUT_FOR_SHAPE = {i: OUT_DTYPES[i % 3] for i in range(len(GRID))}


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("idx", range(len(GRID)), ids=lambda i: "M{}-N{}-E{}-I{}".format(*GRID[i]))
def test_grid_default_config(idx, dtype, seed):
    M, N, E, I = GRID[idx]
    a, w, alpha = make_inputs(M, N, E, I, dtype, seed)
    run_checked(a, w, alpha, OUT_FOR_SHAPE[idx])


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M,N,E,I", [(7, 48, 3, 64), (33, 100, 8, 32)])
def test_all_out_dtypes(M, N, E, I, dtype, out_dtype, seed):
    a, w, alpha = make_inputs(M, N, E, I, dtype, seed)
    out = densemoe.fc2(a, w, alpha, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    check(out, a, w, alpha)


def test_default_out_dtype_is_bf16(seed):
    a, w, alpha = make_inputs(7, 48, 3, 32, FP8, seed)
    out = densemoe.fc2(a, w, alpha)
    assert out.dtype == torch.bfloat16
    check(out, a, w, alpha)


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("alpha_kind", ["zero_col", "zero_row", "dense"])
@pytest.mark.parametrize("M,N,E,I", [(7, 48, 3, 32), (33, 80, 8, 64), (1, 40, 1, 32)])
def test_alpha_kinds(M, N, E, I, dtype, alpha_kind, seed):
    a, w, alpha = make_inputs(M, N, E, I, dtype, seed, alpha_kind=alpha_kind)
    if alpha_kind == "zero_col":
        assert (alpha[:, E // 2] == 0).all()
    if alpha_kind == "zero_row":
        assert (alpha[M // 2] == 0).all()
    out = run_checked(a, w, alpha, torch.float32)
    if alpha_kind == "zero_row":
        assert (out[M // 2] == 0).all()


def test_all_zero_alpha_gives_zeros(seed):
    a, w, _ = make_inputs(7, 48, 3, 32, torch.bfloat16, seed)
    alpha = torch.zeros(7, 3)
    out = run_checked(a, w, alpha, torch.bfloat16)
    assert (out == 0).all()


def test_alpha_scales_per_expert_partial_sum(seed):
    """alpha enters linearly per expert: doubling one column changes only that expert's share."""
    a, w, alpha = make_inputs(7, 48, 3, 32, torch.bfloat16, seed, alpha_kind="dense")
    base = densemoe.fc2(a, w, alpha, out_dtype=torch.float32).double()
    alpha2 = alpha.clone()
    alpha2[:, 1] *= 2
    got = densemoe.fc2(a, w, alpha2, out_dtype=torch.float32).double()
    only1 = alpha.clone()
    only1[:, [0, 2]] = 0
    share = fc2_ref(a, w, only1, torch.float64)
    torch.testing.assert_close(got - base, share, rtol=1e-5, atol=1e-5 * share.abs().max().item())


# --------------------------------------------------------------------------------------------
# Pinned configs: every variant.
# --------------------------------------------------------------------------------------------

def _configs():
    out = []
    for swap_ab in (True, False):
        for use_tma in (True, False):
            for split in (0, 1):  # stream-K, one program per column tile
                out.append(Fc2TritonConfig(block_m=16, block_n=16, block_k=32, swap_ab=swap_ab,
                                           use_tma=use_tma, split=split))
    out += [
        Fc2TritonConfig(block_m=32, block_n=32, block_k=32, ctas_per_sm=2),
        Fc2TritonConfig(block_m=32, block_n=64, block_k=64, swap_ab=False, ctas_per_sm=2),
        Fc2TritonConfig(block_m=16, block_n=64, block_k=64, use_tma=False, num_warps=8),
        Fc2TritonConfig(block_m=32, block_n=16, block_k=64, swap_ab=False, use_tma=False,
                        ctas_per_sm=2, num_stages=1),
        Fc2TritonConfig(block_m=16, block_n=32, block_k=32, split=1, num_stages=2),
        Fc2TritonConfig(block_m=32, block_n=64, block_k=32, swap_ab=False, split=1,
                        use_tma=False),
        Fc2TritonConfig(block_m=16, block_n=16, block_k=32, split=2),
        Fc2TritonConfig(block_m=32, block_n=32, block_k=64, swap_ab=False, use_tma=False, split=3),
        Fc2TritonConfig(block_m=16, block_n=64, block_k=32, split=16),  # > E: one expert each
    ]
    return out


CONFIGS = _configs()
CONFIG_SHAPES = [(7, 48, 3, 64), (33, 100, 8, 64), (1, 40, 1, 64), (33, 16, 3, 128)]


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M,N,E,I", CONFIG_SHAPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.to_str().replace(",", "|"))
def test_pinned_configs(cfg, M, N, E, I, dtype, seed):
    problem = Fc2Problem(M, N, E, I, dtype, torch.float32)
    ok, why = can_implement(problem, cfg)
    assert ok, why
    out_dtype = OUT_DTYPES[seed % 3]
    a, w, alpha = make_inputs(M, N, E, I, dtype, seed)
    run_checked(a, w, alpha, out_dtype, config=cfg)


def test_config_variants_covered():
    assert {c.swap_ab for c in CONFIGS} == {True, False}
    assert {c.use_tma for c in CONFIGS} == {True, False}
    assert {c.split for c in CONFIGS} == {0, 1, 2, 3, 16}
    assert {c.block_m for c in CONFIGS} == {16, 32}
    assert {c.block_n for c in CONFIGS} == {16, 32, 64}
    assert {c.block_k for c in CONFIGS} == {32, 64}
    assert {c.ctas_per_sm for c in CONFIGS} == {1, 2}


# --------------------------------------------------------------------------------------------
# Stream-K splits forced with num_programs (atomics + counter + last-arriver path).
# --------------------------------------------------------------------------------------------

SPLIT_SHAPES = [(7, 48, 3, 32), (33, 80, 8, 32), (1, 40, 1, 64), (7, 16, 8, 64)]


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("P", [1, 2, 3, 5, 13])
@pytest.mark.parametrize("M,N,E,I", SPLIT_SHAPES)
@pytest.mark.parametrize("swap_ab,use_tma", [(True, True), (False, False)])
def test_streamk_num_programs(M, N, E, I, P, dtype, swap_ab, use_tma, seed):
    cfg = Fc2TritonConfig(block_m=16, block_n=16, block_k=32, swap_ab=swap_ab, use_tma=use_tma)
    out_dtype = OUT_DTYPES[seed % 3]
    a, w, alpha = make_inputs(M, N, E, I, dtype, seed)
    buf = torch.full((M + 2, N + 3), float("nan"), dtype=out_dtype)
    out = buf[1:M + 1, 1:N + 1]
    fc2_triton(a, w, alpha, out, cfg, num_programs=P)
    assert not torch.isnan(out).any(), f"{int(torch.isnan(out).sum())} elements never written"
    inside = torch.zeros_like(buf, dtype=torch.bool)
    inside[1:M + 1, 1:N + 1] = True
    assert torch.isnan(buf[~inside]).all(), "wrote outside out"
    check(out, a, w, alpha)


def _split_facts(M, N, E, I, P, block_m=16, block_n=16):
    cfg = Fc2TritonConfig(block_m=block_m, block_n=block_n, block_k=32)
    problem = Fc2Problem(M, N, E, I, FP8, torch.bfloat16)
    m_tiles, groups = kfc2._grid_groups(problem, cfg, P)
    n_tiles = math.ceil(N / block_n)
    return groups, kfc2.tiles_cut(n_tiles, E, groups)


def test_streamk_cases_cover_both_paths():
    """The num_programs sweep above hits tiles split across programs (workspace + counter),
    several programs that each own whole tiles (no workspace), and one program per unit."""
    facts = {(s, P): _split_facts(*s, P) for s in SPLIT_SHAPES for P in (1, 2, 3, 5, 13)}
    assert facts[((7, 48, 3, 32), 1)] == (1, False)
    assert facts[((7, 48, 3, 32), 3)] == (3, False)  # 3 programs x 1 whole column tile
    assert facts[((7, 48, 3, 32), 2)] == (2, True)
    assert facts[((7, 48, 3, 32), 5)] == (5, True)
    assert facts[((7, 48, 3, 32), 13)] == (9, True)  # one program per (column tile, expert)
    assert facts[((1, 40, 1, 64), 13)] == (3, False)  # E=1: never a split tile
    assert facts[((33, 80, 8, 32), 13)] == (4, True)  # 3 token tiles x 4 programs


def test_tiles_cut_matches_unit_split():
    """tiles_cut is true exactly when some program boundary falls inside a column tile."""
    for n_tiles in range(1, 6):
        for E in range(1, 9):
            units = n_tiles * E
            for groups in range(1, units + 1):
                bounds = [g * units // groups for g in range(groups + 1)]
                split = any(b % E for b in bounds)
                assert kfc2.tiles_cut(n_tiles, E, groups) == split


@pytest.mark.parametrize("split", [1, 2, 3, 8])
@pytest.mark.parametrize("P", [1, 2, 5, 13])
def test_fixed_split_ignores_num_programs(split, P, seed):
    """split >= 1 launches split programs per column tile whatever num_programs says."""
    M, N, E, I = 7, 48, 3, 32
    cfg = Fc2TritonConfig(block_m=16, block_n=16, block_k=32, split=split)
    a, w, alpha = make_inputs(M, N, E, I, torch.bfloat16, seed)
    problem = Fc2Problem(M, N, E, I, a.dtype, torch.float32)
    assert kfc2._grid_groups(problem, cfg, P) == kfc2._grid_groups(problem, cfg, 1)
    out = torch.full((M, N), float("nan"), dtype=torch.float32)
    fc2_triton(a, w, alpha, out, cfg, num_programs=P)
    check(out, a, w, alpha)


@pytest.mark.parametrize("split", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("M,N,E,I", [(7, 48, 3, 64), (33, 80, 8, 32), (1, 40, 1, 32)])
def test_fixed_split_grid(M, N, E, I, split):
    """split = s cuts each column tile into min(s, E) expert ranges: a workspace exactly when
    a tile is cut (s > 1 and E > 1)."""
    cfg = Fc2TritonConfig(block_m=16, block_n=16, block_k=32, split=split)
    problem = Fc2Problem(M, N, E, I, FP8, torch.bfloat16)
    m_tiles, groups = kfc2._grid_groups(problem, cfg, 4)
    n_tiles = math.ceil(N / 16)
    assert m_tiles == math.ceil(M / 16)
    assert groups == n_tiles * min(split, E)
    assert kfc2.tiles_cut(n_tiles, E, groups) == (min(split, E) > 1)


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("split", [2, 3, 5, 8])
@pytest.mark.parametrize("M,N,E,I", [(7, 48, 3, 64), (33, 80, 8, 32), (1, 100, 8, 64)])
def test_fixed_split_results(M, N, E, I, split, dtype, seed):
    cfg = Fc2TritonConfig(block_m=16, block_n=16, block_k=32, split=split, swap_ab=bool(seed % 2))
    a, w, alpha = make_inputs(M, N, E, I, dtype, seed)
    run_checked(a, w, alpha, OUT_DTYPES[seed % 3], config=cfg)


def test_split_workspace_left_zeroed_and_reused(seed):
    """With skipping, split tiles meet in one workspace per device and stream, reused with no
    memset: every launch leaves the sums and counters it touched at zero, so back-to-back calls
    of other shapes (dense ones, which take fresh zeros, in between) stay right."""
    cfg = Fc2TritonConfig(block_m=16, block_n=16, block_k=32, split=3, swap_ab=True, use_tma=False)
    for M, N, E, I in ((7, 48, 3, 64), (33, 80, 8, 32), (7, 48, 3, 64)):
        a, w, alpha = make_inputs(M, N, E, I, torch.bfloat16, seed + M)
        for skip in (True, False):
            out = torch.full((M, N), float("nan"), dtype=torch.float32)
            fc2_triton(a, w, alpha, out, cfg, skip=skip)
            check(out, a, w, alpha)
            assert (stream_buffer(a.device) == 0).all()  # sums and counters, whatever the layout


def test_fc2_triton_rejects_bad_config():
    a, w, alpha = make_inputs(7, 48, 3, 32, torch.bfloat16, 0)
    out = torch.empty(7, 48, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="block_k=64 does not divide I=32"):
        fc2_triton(a, w, alpha, out, Fc2TritonConfig(16, 16, 64))


# --------------------------------------------------------------------------------------------
# out=, empty problems, layouts.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=dtype_id)
def test_out_is_returned(out_dtype, seed):
    a, w, alpha = make_inputs(7, 40, 3, 32, FP8, seed)
    out = torch.full((7, 40), float("nan"), dtype=out_dtype)
    res = densemoe.fc2(a, w, alpha, out=out)
    assert res is out
    check(out, a, w, alpha)
    res = densemoe.fc2(a, w, alpha, out=out, out_dtype=out_dtype)
    assert res is out


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=dtype_id)
def test_m_zero(dtype, out_dtype):
    a, w, alpha = make_inputs(0, 48, 3, 32, dtype, 0)
    res = densemoe.fc2(a, w, alpha, out_dtype=out_dtype)
    assert res.shape == (0, 48) and res.dtype == out_dtype
    out = torch.empty(0, 48, dtype=out_dtype)
    assert densemoe.fc2(a, w, alpha, out=out) is out


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=dtype_id)
def test_n_zero(dtype):
    a, w, alpha = make_inputs(7, 0, 3, 32, dtype, 0)
    res = densemoe.fc2(a, w, alpha, out_dtype=torch.float32)
    assert res.shape == (7, 0) and res.dtype == torch.float32
    out = torch.empty(7, 0, dtype=torch.bfloat16)
    assert densemoe.fc2(a, w, alpha, out=out) is out


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["a_col_slice", "w_transposed", "both", "alpha_strided"])
@pytest.mark.parametrize("cfg", [None, Fc2TritonConfig(16, 16, 32, use_tma=True),
                                 Fc2TritonConfig(16, 16, 32, swap_ab=False, use_tma=True)],
                         ids=["default", "tma-swap", "tma-noswap"])
def test_non_contiguous_inputs(layout, dtype, cfg, seed):
    M, N, E, I = 7, 40, 3, 32
    K = E * I
    a0, w0, alpha0 = make_inputs(M, N, E, I, dtype, seed)
    a, w, alpha = a0, w0, alpha0
    if layout in ("a_col_slice", "both"):
        wide = torch.zeros(M, K + 5, dtype=dtype)
        wide[:, 1:K + 1] = a0
        a = wide[:, 1:K + 1]
        assert a.stride(0) == K + 5 and not a.is_contiguous()
    if layout in ("w_transposed", "both"):
        wt = w0.T.contiguous()  # [K, N] contiguous
        w = wt.T
        assert w.stride() == (1, N)
    if layout == "alpha_strided":
        alpha = torch.zeros(E * 2, M).T[:, ::2]  # [M, E], strides (1, 2M)
        alpha.copy_(alpha0)
        assert alpha.stride() == (1, 2 * M)
    if layout != "alpha_strided":
        assert not kfc2.tma_compatible(a, w)  # so the pointer path runs
    out = densemoe.fc2(a, w, alpha, out_dtype=torch.float32, config=cfg)
    check(out, a0, w0, alpha0)


def test_single_column_out_any_column_stride(seed):
    """N = 1: out's column stride is irrelevant, so a transposed [M, 1] view is accepted."""
    M, N, E, I = 7, 1, 3, 32
    a, w, alpha = make_inputs(M, N, E, I, FP8, seed)
    buf = torch.full((2, M), float("nan"), dtype=torch.float32)
    out = buf[:1].T  # (M, 1), strides (1, M)
    assert out.stride() == (1, M)
    assert densemoe.fc2(a, w, alpha, out=out) is out
    assert torch.isnan(buf[1]).all()
    check(out, a, w, alpha)


@pytest.mark.parametrize("use_tma", [True, False])
def test_broadcast_inputs(use_tma, seed):
    """Stride-0 rows (one token broadcast to M rows, one alpha row for all) are accepted."""
    M, N, E, I = 7, 48, 3, 32
    a0, w, alpha0 = make_inputs(M, N, E, I, torch.bfloat16, seed, alpha_kind="dense")
    a = a0[:1].expand(M, -1)
    alpha = alpha0[:1].expand(M, -1)
    assert a.stride(0) == 0 and alpha.stride(0) == 0
    out = densemoe.fc2(a, w, alpha, out_dtype=torch.float32,
                       config=Fc2TritonConfig(16, 16, 32, use_tma=use_tma))
    check(out, a.contiguous(), w, alpha.contiguous())
    assert torch.equal(out, out[:1].expand(M, -1))


def test_a_row_slice_tma_compatible(seed):
    """A 16-byte aligned column window of a wider tensor still takes the TMA path."""
    M, N, E, I = 7, 40, 3, 32
    K = E * I
    a0, w, alpha = make_inputs(M, N, E, I, torch.bfloat16, seed)
    wide = torch.zeros(M, K + 16, dtype=torch.bfloat16)
    wide[:, 8:K + 8] = a0
    a = wide[:, 8:K + 8]
    assert kfc2.tma_compatible(a, w)
    out = densemoe.fc2(a, w, alpha, out_dtype=torch.float32,
                       config=Fc2TritonConfig(16, 16, 32, use_tma=True))
    check(out, a0, w, alpha)


def test_deterministic_without_split(seed):
    """Without split tiles (no atomics) two runs give bit-identical results."""
    a, w, alpha = make_inputs(33, 80, 8, 32, FP8, seed)
    cfg = Fc2TritonConfig(16, 16, 32, split=1)
    o1 = densemoe.fc2(a, w, alpha, out_dtype=torch.float32, config=cfg)
    o2 = densemoe.fc2(a, w, alpha, out_dtype=torch.float32, config=cfg)
    assert torch.equal(o1, o2)


# --------------------------------------------------------------------------------------------
# The default config choice, config strings.
# --------------------------------------------------------------------------------------------

MISSION = [(7168, 256, 256), (7168, 256, 512), (2048, 128, 768), (4096, 8, 7168)]  # (N, E, I)


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("N,E,I", MISSION + [(48, 3, 32), (16, 1, 64)])
def test_default_config_deterministic_and_valid(N, E, I, dtype):
    for out_dtype in OUT_DTYPES:
        for M in range(1, 1025):
            p1 = Fc2Problem(M, N, E, I, dtype, out_dtype)
            p2 = Fc2Problem(M, N, E, I, dtype, out_dtype)
            c1, c2 = default_config(p1), default_config(p2)
            assert c1 == c2 and c1.to_str() == c2.to_str()
            ok, why = can_implement(p1, c1)
            assert ok, f"{p1}: {c1}: {why}"
            assert Fc2TritonConfig.from_str(c1.to_str()) == c1


def test_default_config_m_zero_is_valid():
    p = Fc2Problem(0, 48, 3, 32, FP8, torch.bfloat16)
    assert can_implement(p, default_config(p))[0]


@pytest.mark.parametrize("cfg", CONFIGS + [
    Fc2TritonConfig(block_m=128, block_n=128, block_k=256, num_warps=8, num_stages=3,
                    swap_ab=False, use_tma=False, split=7, ctas_per_sm=4)])
def test_config_str_round_trip(cfg):
    s = cfg.to_str()
    back = Fc2TritonConfig.from_str(s)
    assert back == cfg
    assert back.to_str() == s
    for f in ("block_m", "block_n", "block_k", "num_warps", "num_stages", "ctas_per_sm"):
        assert type(getattr(back, f)) is int
    assert type(back.split) is int
    assert type(back.swap_ab) is bool and type(back.use_tma) is bool


# --------------------------------------------------------------------------------------------
# The custom op, torch.compile.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["", Fc2TritonConfig(16, 16, 32, swap_ab=False).to_str()],
                         ids=["default", "pinned"])
@pytest.mark.parametrize("skip", [False, True], ids=["dense", "skip"])
@pytest.mark.parametrize("w_scale", [False, True], ids=["", "w_scale"])
def test_custom_op_opcheck(config, skip, w_scale, seed):
    a, w, alpha = make_inputs(7, 48, 3, 32, torch.bfloat16, seed)
    out = torch.empty(7, 48, dtype=torch.float32)
    ws = torch.rand(3) + 0.5 if w_scale else None
    torch.library.opcheck(torch.ops.densemoe.fc2.default, (a, w, alpha, out, config, "auto", skip, ws))


# --------------------------------------------------------------------------------------------
# torch.compile.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("with_out", [False, True])
def test_torch_compile_fullgraph(backend, with_out, seed):
    torch._dynamo.reset()
    a, w, alpha = make_inputs(7, 48, 3, 32, FP8, seed)

    if with_out:
        def f(a, w, alpha, out):
            return densemoe.fc2(a, w, alpha, out=out) * 1.0
        out = torch.full((7, 48), float("nan"), dtype=torch.float32)
        args = (a, w, alpha, out)
    else:
        def f(a, w, alpha):
            return densemoe.fc2(a, w, alpha, out_dtype=torch.float32) * 1.0
        args = (a, w, alpha)

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = compiled(*args)
    check(got, a, w, alpha)
    if with_out:
        check(out, a, w, alpha)
    # a pinned config goes through the custom op as a string
    cfg = Fc2TritonConfig(16, 16, 32, swap_ab=False)

    def g(a, w, alpha):
        return densemoe.fc2(a, w, alpha, out_dtype=torch.float32, config=cfg)

    got = torch.compile(g, fullgraph=True, backend=backend)(a, w, alpha)
    check(got, a, w, alpha)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit internals of inductor
def test_torch_compile_inductor(seed):
    torch._dynamo.reset()
    a, w, alpha = make_inputs(7, 48, 3, 32, torch.bfloat16, seed)

    def f(a, w, alpha):
        return densemoe.fc2(a, w, alpha, out_dtype=torch.float32) * 2.0

    got = torch.compile(f, fullgraph=True)(a, w, alpha)
    check(got / 2.0, a, w, alpha)


def test_torch_compile_dynamic_shapes(seed):
    """One dynamic-shape graph serves several M (the validation runs on symbolic sizes)."""
    torch._dynamo.reset()

    def f(a, w, alpha):
        return densemoe.fc2(a, w, alpha, out_dtype=torch.float32)

    g = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for M in (3, 9, 17, 33):
        a, w, alpha = make_inputs(M, 48, 3, 32, FP8, seed + M)
        check(g(a, w, alpha), a, w, alpha)
