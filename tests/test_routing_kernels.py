"""The fused router kernels (densemoe.kernels.triton.routing) against the torch routers and the
float64 loop twins.

CPU (CI): impl="triton" runs through Triton's interpreter (tests/conftest.py switches it on).
GPU (marker ``gpu``): the model shapes, M = 1 / 100 / 1000, and CUDA-graph capture.

Rows whose routing hangs on a near-tie (two candidates within ``TIE_TOL`` in float64) may pick
differently under different roundings; they are checked for layout only (their count is
asserted small). Everything else must agree exactly on the ids, within 1e-6 on the weights.
"""

from __future__ import annotations

import os

import pytest
import torch

from _helpers import seed_of
from densemoe import routing
from densemoe.timing import capture
from densemoe.reference import deepseek_v3_topk_ref, softmax_topk_ref
from densemoe.routing import RouterOutput, deepseek_v3_topk, softmax_topk

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs the kernels on the CPU: TRITON_INTERPRET=1")
TIE_TOL = 1e-5
RTOL = 1e-6


def gen_for(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of("routing_kernels", *parts))


def rand_logits(M: int, E: int, g: torch.Generator, scale: float = 2.0) -> torch.Tensor:
    """[M, E] float32 logits, no two equal entries in a row, no zeros."""
    for _ in range(10):
        x = torch.randn(M, E, generator=g) * scale
        s = x.sort(dim=1).values
        if (s[:, 1:] > s[:, :-1]).all() and (x != 0).all():
            return x
    raise AssertionError("ties in random logits")


def exact_logits(M: int, E: int, g: torch.Generator) -> torch.Tensor:
    """[M, E] float32 logits, distinct within a row, every one exact in bf16 and fp16: odd
    multiples of 1/32 in (-E/32, E/32) (E <= 128), a random permutation per row."""
    assert E <= 128
    perm = torch.stack([torch.randperm(E, generator=g) for _ in range(M)]) if M else torch.empty(0, E)
    return (perm.float() - E / 2 + 0.5) / 16


def check_layout(out: RouterOutput, M: int, E: int, k: int) -> None:
    assert isinstance(out, RouterOutput)
    assert out.alpha.shape == (M, E) and out.alpha.dtype == torch.float32
    assert out.topk_ids.shape == (M, k) and out.topk_ids.dtype == torch.int64
    assert out.topk_weights.shape == (M, k) and out.topk_weights.dtype == torch.float32
    ids, alpha, w = out.topk_ids.cpu(), out.alpha.cpu(), out.topk_weights.cpu()
    assert ((ids >= 0) & (ids < E)).all()
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct within a row
    picked = torch.zeros(M, E, dtype=torch.bool).scatter(1, ids, True)
    assert (alpha[~picked] == 0).all()
    assert torch.equal(alpha.gather(1, ids), w)  # alpha and the weights: the same bits


# ----------------------------------------------------------------------------------------------
# near-ties, from float64 values


def _near(a: torch.Tensor, b: torch.Tensor, relative: bool) -> torch.Tensor:
    """a and b within TIE_TOL: relative to their size (probabilities), or absolute (DeepSeek's
    scores, of order 1, whose rounding errors are absolute)."""
    scale = torch.maximum(a.abs(), b.abs()) if relative else 1.0
    return (a - b).abs() <= TIE_TOL * scale


def softmax_ambiguous(x: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose top-k set or order hangs on a near-tie."""
    p = torch.softmax(x.double().cpu(), dim=1)
    s = p.sort(dim=1, descending=True).values[:, : k + 1]
    return _near(s[:, :-1], s[:, 1:], relative=True).any(dim=1)


def deepseek_ambiguous(x: torch.Tensor, k: int, n_group: int, topk_group: int, bias) -> torch.Tensor:
    """Rows whose kept groups, top-k set or slot order hangs on a near-tie."""
    M, E = x.shape
    G = E // n_group
    c = torch.sigmoid(x.double().cpu()) + (0 if bias is None else bias.double().cpu())
    gs = c.view(M, n_group, G).topk(2, dim=2).values.sum(dim=2)
    gsorted = gs.sort(dim=1, descending=True).values
    amb = torch.zeros(M, dtype=torch.bool)
    if topk_group < n_group:
        amb |= _near(gsorted[:, topk_group - 1], gsorted[:, topk_group], relative=False)
    keep = torch.zeros(M, n_group, dtype=torch.bool).scatter(1, gs.topk(topk_group, dim=1).indices, True)
    cm = c.masked_fill(~keep.repeat_interleave(G, dim=1), float("-inf"))
    s = cm.sort(dim=1, descending=True).values[:, : k + 1]
    return amb | _near(s[:, :-1], s[:, 1:], relative=False).any(dim=1)


def assert_same_routing(out: RouterOutput, ref: RouterOutput, amb: torch.Tensor, *, same_order: bool,
                        rtol: float = RTOL) -> None:
    """Rows not in amb: the same ids (as sets, or slot for slot), weights and alpha within rtol."""
    ids, w, alpha = out.topk_ids.cpu(), out.topk_weights.cpu(), out.alpha.cpu()
    rids, rw, ralpha = ref.topk_ids.cpu(), ref.topk_weights.cpu().float(), ref.alpha.cpu().float()
    assert amb.float().mean() <= 0.05, f"{int(amb.sum())} of {len(amb)} rows near-tied"
    ok = ~amb
    if not same_order:
        o, ro = ids.argsort(dim=1), rids.argsort(dim=1)
        ids, w, rids, rw = ids.gather(1, o), w.gather(1, o), rids.gather(1, ro), rw.gather(1, ro)
    assert torch.equal(ids[ok], rids[ok])
    torch.testing.assert_close(w[ok], rw[ok], rtol=rtol, atol=1e-12)
    torch.testing.assert_close(alpha[ok], ralpha[ok], rtol=rtol, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# softmax top-k

SOFTMAX_CASES = [  # (M, E, k, renormalize)
    *[(M, E, k, r) for M, E, k in [(1, 8, 1), (1, 60, 4), (1, 256, 8), (7, 8, 2), (7, 8, 8), (7, 60, 4),
                                   (7, 60, 60), (7, 128, 8), (7, 256, 16)] for r in (True, False)],
    (100, 60, 6, True), (100, 128, 8, False), (100, 256, 8, True),   # M = 100: ~1 s each in the interpreter
]


@needs_interpreter
@pytest.mark.parametrize("M,E,k,renormalize", SOFTMAX_CASES)
def test_softmax_kernel_matches_torch_and_ref(M, E, k, renormalize):
    x = rand_logits(M, E, gen_for("sm", M, E, k, renormalize))
    out = softmax_topk(x, k, renormalize=renormalize, impl="triton")
    check_layout(out, M, E, k)
    amb = softmax_ambiguous(x, k)
    # both sort the slots by descending weight
    assert_same_routing(out, softmax_topk(x, k, renormalize=renormalize, impl="torch"), amb, same_order=True)
    assert_same_routing(out, softmax_topk_ref(x, k, renormalize=renormalize), amb, same_order=True)
    if renormalize:
        torch.testing.assert_close(out.alpha.sum(dim=1), torch.ones(M), rtol=2e-6, atol=0)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
@pytest.mark.parametrize("E,k", [(60, 4), (128, 8)])
def test_softmax_kernel_low_precision_logits(dtype, E, k):
    """bf16/fp16/fp64 logits: the softmax of their float32 values; exact inputs, so no ties."""
    x = exact_logits(7, E, gen_for("sm_dtype", dtype, E, k))
    xd = x.to(dtype)
    out = softmax_topk(xd, k, renormalize=True, impl="triton")
    check_layout(out, 7, E, k)
    amb = softmax_ambiguous(x, k)
    assert_same_routing(out, softmax_topk(xd, k, renormalize=True, impl="torch"), amb, same_order=True)
    # the same as from the float32 values
    o32 = softmax_topk(xd.float(), k, renormalize=True, impl="triton")
    assert torch.equal(out.topk_ids, o32.topk_ids) and torch.equal(out.alpha, o32.alpha)


@needs_interpreter
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_kernel_ties_pick_lowest_index(renormalize):
    E, k = 16, 5
    x = torch.full((3, E), 0.75)                       # all equal
    x[1, 9] = x[1, 3] = 2.0                            # two equal maxima: 3 before 9
    x[2] = torch.arange(E, dtype=torch.float32) % 4    # four ties of 3.0: 3, 7, 11, 15
    out = softmax_topk(x, k, renormalize=renormalize, impl="triton")
    check_layout(out, 3, E, k)
    assert out.topk_ids.tolist() == [[0, 1, 2, 3, 4], [3, 9, 0, 1, 2], [3, 7, 11, 15, 2]]
    if renormalize:
        torch.testing.assert_close(out.topk_weights[0], torch.full((k,), 1 / k), rtol=RTOL, atol=0)
    else:
        torch.testing.assert_close(out.topk_weights[0], torch.full((k,), 1 / E), rtol=RTOL, atol=0)
    assert out.topk_weights[1, 0] == out.topk_weights[1, 1]


# ----------------------------------------------------------------------------------------------
# DeepSeek-V3

DEEPSEEK_CASES = [  # (M, E, n_group, topk_group, k)
    (1, 8, 1, 1, 3),       # one group: plain sigmoid top-k
    (1, 256, 8, 8, 8),     # every group kept
    (7, 8, 4, 2, 2),       # groups of 2: the group score is the whole group
    (7, 16, 4, 2, 8),      # k = every expert of the kept groups
    (7, 60, 4, 2, 6),      # G = 15: padded tile 4 x 16
    (7, 60, 6, 3, 5),      # n_group = 6, G = 10: padded tile 8 x 16
    (7, 128, 8, 3, 8),
    (7, 256, 8, 4, 8),     # DeepSeek-V3's own layout
]
DEEPSEEK_CASES_M100 = [  # (M, E, n_group, topk_group, k, with_bias, norm, scale): ~2 s each in the interpreter
    (100, 60, 4, 2, 6, False, False, 2.5), (100, 256, 8, 4, 8, True, True, 2.5)]
FLAGS = [(True, True, 2.5), (True, False, 1.75), (False, True, 1.0), (False, False, 2.5)]  # bias, norm, scale


def _deepseek_case(M, E, n_group, topk_group, k, with_bias, norm, scale, bias_dtype=torch.float32):
    g = gen_for("ds", M, E, n_group, topk_group, k, with_bias, norm, scale)
    x = rand_logits(M, E, g)
    bias = (torch.randn(E, generator=g) * 0.3).to(bias_dtype) if with_bias else None
    kw = dict(n_group=n_group, topk_group=topk_group, e_score_correction_bias=bias,
              routed_scaling_factor=scale, norm_topk_prob=norm)
    return x, bias, kw


def _check_deepseek(M, E, n_group, topk_group, k, with_bias, norm, scale):
    x, bias, kw = _deepseek_case(M, E, n_group, topk_group, k, with_bias, norm, scale)
    out = deepseek_v3_topk(x, k, **kw, impl="triton")
    check_layout(out, M, E, k)
    amb = deepseek_ambiguous(x, k, n_group, topk_group, bias)
    # torch.topk(sorted=False) has its own slot order; the loop twin sorts by choice, as we do
    assert_same_routing(out, deepseek_v3_topk(x, k, **kw, impl="torch"), amb, same_order=False)
    assert_same_routing(out, deepseek_v3_topk_ref(x, k, **kw), amb, same_order=True)
    groups_hit = torch.zeros(M, n_group).scatter(1, out.topk_ids // (E // n_group), 1.0).sum(dim=1)
    assert (groups_hit <= topk_group).all()
    if norm:
        torch.testing.assert_close(out.alpha.sum(dim=1), torch.full((M,), scale), rtol=2e-6, atol=0)


@needs_interpreter
@pytest.mark.parametrize("with_bias,norm,scale", FLAGS)
@pytest.mark.parametrize("M,E,n_group,topk_group,k", DEEPSEEK_CASES)
def test_deepseek_kernel_matches_torch_and_ref(M, E, n_group, topk_group, k, with_bias, norm, scale):
    _check_deepseek(M, E, n_group, topk_group, k, with_bias, norm, scale)


@needs_interpreter
@pytest.mark.parametrize("M,E,n_group,topk_group,k,with_bias,norm,scale", DEEPSEEK_CASES_M100)
def test_deepseek_kernel_matches_torch_and_ref_m100(M, E, n_group, topk_group, k, with_bias, norm, scale):
    _check_deepseek(M, E, n_group, topk_group, k, with_bias, norm, scale)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
def test_deepseek_kernel_low_precision_logits_and_bias(dtype):
    E, n_group, topk_group, k = 64, 8, 4, 6
    g = gen_for("ds_dtype", dtype)
    x = exact_logits(7, E, g)
    bias = (torch.randn(E, generator=g) * 0.3).to(dtype)
    kw = dict(n_group=n_group, topk_group=topk_group, e_score_correction_bias=bias,
              routed_scaling_factor=2.5, norm_topk_prob=True)
    xd = x.to(dtype)
    out = deepseek_v3_topk(xd, k, **kw, impl="triton")
    check_layout(out, 7, E, k)
    amb = deepseek_ambiguous(x, k, n_group, topk_group, bias.float())
    assert_same_routing(out, deepseek_v3_topk(xd, k, **kw, impl="torch"), amb, same_order=False)
    o32 = deepseek_v3_topk(xd.float(), k, **{**kw, "e_score_correction_bias": bias.float()}, impl="triton")
    assert torch.equal(out.topk_ids, o32.topk_ids) and torch.equal(out.alpha, o32.alpha)


@needs_interpreter
def test_deepseek_kernel_ties_pick_lowest_index():
    kw = dict(n_group=4, topk_group=2, e_score_correction_bias=None, routed_scaling_factor=1.0,
              norm_topk_prob=True)
    x = torch.full((2, 16), -0.5)
    x[1, 13] = x[1, 6] = 1.0                 # groups 1 and 3 tie: both kept; 6 before 13
    out = deepseek_v3_topk(x, 6, **kw, impl="triton")
    check_layout(out, 2, 16, 6)
    assert out.topk_ids[0].tolist() == [0, 1, 2, 3, 4, 5]       # groups 0 and 1, lowest ids first
    assert out.topk_ids[1].tolist() == [6, 13, 4, 5, 7, 12]
    torch.testing.assert_close(out.topk_weights[0], torch.full((6,), 1 / 6), rtol=RTOL, atol=0)


@needs_interpreter
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_deepseek_group_score_counts_a_repeated_max_twice(impl):
    """Group 1 holds its maximum twice: top-2 sum 2 s(2.0) = 1.76 beats group 0's s(3.0) + s(-5.0)
    = 0.96 (were the repeat counted once, group 1 would score 0.89 and lose)."""
    x = torch.full((1, 16), -5.0)
    x[0, 0] = 3.0
    x[0, 4] = x[0, 5] = 2.0
    out = deepseek_v3_topk(x, 2, n_group=4, topk_group=1, e_score_correction_bias=None,
                           routed_scaling_factor=1.0, norm_topk_prob=False, impl=impl)
    assert sorted(out.topk_ids[0].tolist()) == [4, 5]
    ref = deepseek_v3_topk_ref(x, 2, n_group=4, topk_group=1, e_score_correction_bias=None,
                               routed_scaling_factor=1.0, norm_topk_prob=False)
    assert ref.topk_ids[0].tolist() == [4, 5]


@needs_interpreter
# the interpreter computes with numpy, which warns about the NaN and inf this test feeds on purpose
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_kernels_survive_nan_and_inf():
    """Non-finite logits: every row still gets k distinct in-range ids (a NaN ranks first, as in
    torch.topk)."""
    x = rand_logits(4, 16, gen_for("nonfinite"))
    x[0, 3] = float("nan")
    x[1, :] = float("nan")
    x[2, 5] = float("inf")
    x[3, :] = float("-inf")
    for out in (softmax_topk(x, 4, renormalize=True, impl="triton"),
                deepseek_v3_topk(x, 4, n_group=4, topk_group=2, e_score_correction_bias=None,
                                 routed_scaling_factor=1.0, norm_topk_prob=True, impl="triton")):
        ids = out.topk_ids
        assert ((ids >= 0) & (ids < 16)).all()
        assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()
    assert softmax_topk(x, 4, renormalize=False, impl="triton").topk_ids[1].tolist() == [0, 1, 2, 3]
    assert deepseek_v3_topk(x, 2, n_group=4, topk_group=2, e_score_correction_bias=None, routed_scaling_factor=1.0,
                            norm_topk_prob=False, impl="triton").topk_ids[0, 0] == 3


# ----------------------------------------------------------------------------------------------
# strides, empty inputs, dispatch


@needs_interpreter
def test_kernels_take_strided_logits():
    g = gen_for("strided")
    wide = rand_logits(9, 80, g)
    bias = torch.randn(128, generator=g)[::2] * 0.3                # stride 2
    views = [wide[:, 10:74], wide.t().contiguous().t()[:, :64], wide[::2, :64]]
    for x in views:
        assert not x.is_contiguous()
        for impl_out, torch_out in (
                (softmax_topk(x, 6, renormalize=True, impl="triton"),
                 softmax_topk(x.contiguous(), 6, renormalize=True, impl="torch")),
                (deepseek_v3_topk(x, 6, n_group=8, topk_group=3, e_score_correction_bias=bias,
                                  routed_scaling_factor=2.5, norm_topk_prob=True, impl="triton"),
                 deepseek_v3_topk(x.contiguous(), 6, n_group=8, topk_group=3, e_score_correction_bias=bias,
                                  routed_scaling_factor=2.5, norm_topk_prob=True, impl="torch"))):
            check_layout(impl_out, x.shape[0], 64, 6)
            assert_same_routing(impl_out, torch_out, torch.zeros(x.shape[0], dtype=torch.bool), same_order=False)


@needs_interpreter
def test_kernels_take_zero_tokens():
    x = torch.randn(0, 16)
    for out in (softmax_topk(x, 4, renormalize=True, impl="triton"),
                deepseek_v3_topk(x, 4, n_group=4, topk_group=2, e_score_correction_bias=None,
                                 routed_scaling_factor=2.5, norm_topk_prob=True, impl="triton")):
        check_layout(out, 0, 16, 4)


@needs_interpreter
def test_auto_picks_the_kernel_under_the_interpreter():
    x = rand_logits(5, 32, gen_for("auto"))
    a, t = (softmax_topk(x, 4, renormalize=True, impl=i) for i in ("auto", "triton"))
    assert all(torch.equal(u, v) for u, v in zip(a, t))
    kw = dict(n_group=4, topk_group=2, e_score_correction_bias=None, routed_scaling_factor=2.5, norm_topk_prob=True)
    a, t = (deepseek_v3_topk(x, 4, **kw, impl=i) for i in ("auto", "triton"))
    assert all(torch.equal(u, v) for u, v in zip(a, t))


def test_without_gpu_or_interpreter_auto_is_torch_and_triton_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = rand_logits(5, 32, gen_for("no_kernel"))
    kw = dict(n_group=4, topk_group=2, e_score_correction_bias=None, routed_scaling_factor=2.5, norm_topk_prob=True)
    a, t = (softmax_topk(x, 4, renormalize=True, impl=i) for i in ("auto", "torch"))
    assert all(torch.equal(u, v) for u, v in zip(a, t))
    a, t = (deepseek_v3_topk(x, 4, **kw, impl=i) for i in ("auto", "torch"))
    assert all(torch.equal(u, v) for u, v in zip(a, t))
    with pytest.raises(ValueError, match=r"impl='triton' cannot run here: router_logits is on cpu"):
        softmax_topk(x, 4, renormalize=True, impl="triton")
    with pytest.raises(ValueError, match=r"impl='triton' cannot run here: router_logits is on cpu"):
        deepseek_v3_topk(x, 4, **kw, impl="triton")


@needs_interpreter
def test_kernel_limits_fall_back_or_raise():
    g = gen_for("limits")
    big = rand_logits(2, 1040, g)
    ref = softmax_topk(big, 4, renormalize=True, impl="torch")
    assert all(torch.equal(u, v) for u, v in zip(softmax_topk(big, 4, renormalize=True), ref))
    with pytest.raises(ValueError, match=r"E=1040"):
        softmax_topk(big, 4, renormalize=True, impl="triton")
    x = big[:, :1020]
    for n_group in (3, 5, 17, 255):   # padded tiles 4 x 512, 8 x 256, 32 x 64, 256 x 4: all fit
        check_layout(deepseek_v3_topk(x, 4, n_group=n_group, topk_group=2, e_score_correction_bias=None,
                                      routed_scaling_factor=1.0, norm_topk_prob=True, impl="triton"), 2, 1020, 4)
    with pytest.raises(ValueError, match=r"top_k=129"):
        softmax_topk(x, 129, renormalize=True, impl="triton")
    with pytest.raises(ValueError, match=r"float8_e4m3fn"):
        softmax_topk(x.to(torch.float8_e4m3fn), 4, renormalize=True, impl="triton")
    xg = x[:, :64].clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"requires grad"):
        softmax_topk(xg, 4, renormalize=True, impl="triton")
    out = softmax_topk(xg, 4, renormalize=True)                 # auto: torch, with its backward
    out.topk_weights.sum().backward()
    assert xg.grad is not None
    with torch.no_grad():
        check_layout(softmax_topk(xg, 4, renormalize=True, impl="triton"), 2, 64, 4)
    bias = torch.zeros(1020, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"e_score_correction_bias"):
        deepseek_v3_topk(x, 4, n_group=4, topk_group=2, e_score_correction_bias=bias, routed_scaling_factor=1.0,
                         norm_topk_prob=True, impl="triton")


def test_kernel_limits_mirror_the_kernel_module():
    kr = pytest.importorskip("densemoe.kernels.triton.routing")
    assert routing._KERNEL_MAX_EXPERTS == kr.MAX_EXPERTS
    assert routing._KERNEL_MAX_TOP_K == kr.MAX_TOP_K
    assert routing._KERNEL_DTYPES == kr.DTYPES


@pytest.mark.parametrize("bad", ["cuda", "", None, 1])
def test_impl_is_checked(bad):
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match=r"\bimpl\b"):
        softmax_topk(x, 2, renormalize=True, impl=bad)
    with pytest.raises(ValueError, match=r"\bimpl\b"):
        deepseek_v3_topk(x, 2, n_group=4, topk_group=2, e_score_correction_bias=None, routed_scaling_factor=1.0,
                         norm_topk_prob=True, impl=bad)


def test_validation_runs_before_impl():
    """Argument errors are the same whatever impl: the checks run first."""
    for impl in ("auto", "triton", "torch"):
        with pytest.raises(ValueError, match=r"\btop_k\b"):
            softmax_topk(torch.randn(3, 16), 17, renormalize=True, impl=impl)
        with pytest.raises(ValueError, match=r"\bn_group\b"):
            deepseek_v3_topk(torch.randn(3, 16), 2, n_group=3, topk_group=1, e_score_correction_bias=None,
                             routed_scaling_factor=1.0, norm_topk_prob=True, impl=impl)


@needs_interpreter
def test_kernels_compile_fullgraph():
    torch._dynamo.reset()
    g = gen_for("compile")
    x = rand_logits(7, 60, g)
    bias = torch.randn(60, generator=g) * 0.3

    @torch.compile(fullgraph=True)
    def route(x, bias):
        return (softmax_topk(x, 4, renormalize=False, impl="triton"),
                deepseek_v3_topk(x, 5, n_group=6, topk_group=3, e_score_correction_bias=bias,
                                 routed_scaling_factor=2.5, norm_topk_prob=False, impl="triton"))

    for c, e in zip(route(x, bias), (softmax_topk(x, 4, renormalize=False, impl="triton"),
                                     deepseek_v3_topk(x, 5, n_group=6, topk_group=3, e_score_correction_bias=bias,
                                                      routed_scaling_factor=2.5, norm_topk_prob=False,
                                                      impl="triton"))):
        assert all(torch.equal(u, v) for u, v in zip(c, e))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# GPU: the model shapes

GPU_M = [1, 100, 1000]


@pytest.mark.gpu
@pytest.mark.parametrize("M", GPU_M)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_softmax_model_shape(M, renormalize, dtype):
    """Qwen3-30B-A3B: E = 128, k = 8."""
    E, k = 128, 8
    x = (exact_logits(M, E, gen_for("gpu_sm", M)) if dtype == torch.bfloat16
         else rand_logits(M, E, gen_for("gpu_sm", M)))
    xd = x.to(dtype).cuda()
    out = softmax_topk(xd, k, renormalize=renormalize, impl="triton")
    check_layout(out, M, E, k)
    amb = softmax_ambiguous(x, k)
    assert_same_routing(out, softmax_topk(xd, k, renormalize=renormalize, impl="torch"), amb, same_order=True)
    assert_same_routing(out, softmax_topk_ref(xd, k, renormalize=renormalize), amb, same_order=True)
    auto = softmax_topk(xd, k, renormalize=renormalize)
    assert all(torch.equal(u, v) for u, v in zip(auto, out))


@pytest.mark.gpu
@pytest.mark.parametrize("M", GPU_M)
@pytest.mark.parametrize("norm", [True, False])
def test_gpu_deepseek_model_shape(M, norm):
    """DeepSeek-V3: E = 256, k = 8, n_group = 8, topk_group = 4, scale 2.5, with the bias."""
    E, k, n_group, topk_group = 256, 8, 8, 4
    x, bias, kw = _deepseek_case(M, E, n_group, topk_group, k, True, norm, 2.5)
    x, kw["e_score_correction_bias"] = x.cuda(), bias.cuda()
    out = deepseek_v3_topk(x, k, **kw, impl="triton")
    check_layout(out, M, E, k)
    amb = deepseek_ambiguous(x, k, n_group, topk_group, bias)
    assert_same_routing(out, deepseek_v3_topk(x, k, **kw, impl="torch"), amb, same_order=False)
    assert_same_routing(out, deepseek_v3_topk_ref(x, k, **kw), amb, same_order=True)
    auto = deepseek_v3_topk(x, k, **kw)
    assert all(torch.equal(u, v) for u, v in zip(auto, out))


@pytest.mark.gpu
def test_gpu_routers_capture_in_a_cuda_graph():
    E, k, M = 256, 8, 64
    bias = torch.randn(E, generator=gen_for("graph_bias")).cuda() * 0.3
    kw = dict(n_group=8, topk_group=4, e_score_correction_bias=bias, routed_scaling_factor=2.5, norm_topk_prob=True)
    static = rand_logits(M, E, gen_for("graph", 0)).cuda()

    def step():
        return (softmax_topk(static[:, :128], k, renormalize=True, impl="triton"),
                deepseek_v3_topk(static, k, **kw, impl="triton"))

    graph, outs = capture(step)  # warm-up on a side stream, then the capture
    for i in (1, 2):
        static.copy_(rand_logits(M, E, gen_for("graph", i)).cuda())
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step()):
            assert all(torch.equal(u, v) for u, v in zip(got, want))
