"""NaN and Inf (issue 21): a non-finite value in a token's x makes exactly that token's output row
non-finite, and one in an expert's weights exactly the rows of the tokens that picked it, on every
path (skip, dense, routed; fp8, bf16 and block-scaled fp8), as torch's own pipeline does; the fp8
quantisers keep NaN (scale and values) where they used to drop it (``kernels/triton/fp8.py``)."""

from __future__ import annotations

import pytest
import torch

import densemoe
from densemoe import experts_forward, prepare_weights
from densemoe.quant import FP8, quantize_per_expert, quantize_per_token, quantize_per_token_group, quantize_y_fold_alpha
from densemoe.reference import quantize_per_token_group_ref, quantize_per_token_ref, quantize_y_fold_alpha_ref

BF16 = torch.bfloat16
NAN, INF = float("nan"), float("inf")
interp = pytest.mark.interpreter


def same_bits(a, b):
    """Equal, NaN where the other is NaN (fp8 NaN compared through float32)."""
    a, b = a.float(), b.float()
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])


@interp
@pytest.mark.parametrize("H", [64, 3000])  # one pass, and two (H above the block a program holds)
def test_quantize_per_token_keeps_nan_and_inf(H):
    x = torch.randn(5, H).to(BF16)
    x[1, 7], x[3, H - 1] = NAN, INF
    q, s = quantize_per_token(x)
    rq, rs = quantize_per_token_ref(x)
    assert same_bits(s, rs) and same_bits(q, rq)
    assert s[1].isnan() and s[3].isinf() and torch.isfinite(s[[0, 2, 4]]).all()
    assert q[1].float().isnan().all()


@interp
def test_quantize_per_token_group_keeps_nan_in_its_group_only():
    x = torch.randn(3, 512).to(BF16)
    x[1, 130] = NAN  # group 1 of row 1
    q, s = quantize_per_token_group(x, 128)
    rq, rs = quantize_per_token_group_ref(x, 128)
    assert same_bits(s, rs) and same_bits(q, rq)
    assert s.isnan().nonzero().tolist() == [[1, 1]]


@interp
def test_quantize_y_keeps_nan_of_picked_experts_and_drops_unpicked_ones():
    M, E, I = 4, 6, 32
    y = torch.randn(M, E * I).to(BF16)
    alpha = torch.zeros(M, E)
    alpha[:, 1] = 0.5
    alpha[2, 4] = 0.25
    y[2, 4 * I + 3] = NAN  # picked: its (token, expert) scale and values NaN
    y[0, 5 * I + 1] = NAN  # not picked: never read
    q, a2 = quantize_y_fold_alpha(y, alpha)
    rq, ra2 = quantize_y_fold_alpha_ref(y, alpha)
    assert same_bits(a2, ra2) and same_bits(q, rq)
    assert a2.isnan().nonzero().tolist() == [[2, 4]]
    assert (q.float().reshape(M, E, I)[0, 5] == 0).all()


def test_quantize_per_expert_marks_a_nan_expert():
    w = torch.randn(4, 8, 16)
    w[2, 3, 3] = NAN
    q, s = quantize_per_expert(w)
    assert s.isnan().tolist() == [False, False, True, False]


# ------------------------------------------------------------------------------------ the layer

E, I, H, K, M = 8, 128, 256, 2, 9  # H = 256: block scales of w2 are 2 x 1 blocks


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g) * H ** -0.5, torch.randn(E, H, I, generator=g) * I ** -0.5


def _prepared(w13, w2, dtype):
    if dtype != "fp8block":
        return prepare_weights(w13, w2, dtype=dtype)
    w13_8, s13 = _block_quant(w13)
    w2_8, s2 = _block_quant(w2)
    return prepare_weights(w13_8, w2_8, dtype="fp8", w13_scale=s13, w2_scale=s2)


def _block_quant(w):
    """128 x 128 block scales (weight_scale_inv: w ~= w8 * scale), NaN blocks kept NaN."""
    e, r, c = w.shape
    blocks = w.reshape(e, r // 128, 128, c // 128, 128)
    s = blocks.abs().amax(dim=(2, 4)) / 448
    w8 = (blocks / s[:, :, None, :, None]).clamp(-448, 448).to(FP8).reshape(e, r, c)
    return w8, s


def _routing(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(M, E, generator=g).topk(K, dim=1).indices
    wts = torch.softmax(torch.randn(M, K, generator=g), dim=1)  # never exactly 0
    return ids, wts


def _bad_rows(out):
    return sorted((~torch.isfinite(out.float())).any(dim=1).nonzero().flatten().tolist())


@interp
@pytest.mark.parametrize("dtype", ["fp8", "bf16", "fp8block"])
@pytest.mark.parametrize("strategy", ["skip", "dense", "routed"])
def test_nan_and_inf_in_x_reach_exactly_their_rows(dtype, strategy):
    w13, w2 = _weights()
    pw = _prepared(w13, w2, dtype)
    ids, wts = _routing()
    x = torch.randn(M, H).to(BF16)
    x[2, 5], x[6, 0], x[7, 100] = NAN, INF, -INF
    alpha = torch.zeros(M, E).scatter_(1, ids, wts)
    out = experts_forward(x, pw, alpha, expert_ids=ids, topk_weights=wts, strategy=strategy)
    assert _bad_rows(out) == [2, 6, 7]
    assert out[2].float().isnan().all()


@interp
@pytest.mark.parametrize("dtype", ["fp8", "bf16", "fp8block"])
@pytest.mark.parametrize("strategy", ["skip", "dense", "routed"])
def test_nan_in_an_experts_weights_reaches_exactly_the_tokens_that_picked_it(dtype, strategy):
    w13, w2 = _weights()
    w13[3, 7, 11] = NAN  # expert 3's gate row 7: its y is NaN for every token it sees
    pw = _prepared(w13, w2, dtype)
    ids, wts = _routing()
    ids[0, 0], ids[0, 1] = 3, 5  # token 0 picks expert 3 at least
    picked = sorted({m for m in range(M) if 3 in ids[m].tolist()})
    x = torch.randn(M, H).to(BF16)
    alpha = torch.zeros(M, E).scatter_(1, ids, wts)
    out = experts_forward(x, pw, alpha, expert_ids=ids, topk_weights=wts, strategy=strategy)
    assert _bad_rows(out) == picked and 0 < len(picked) < M


@interp
@pytest.mark.parametrize("m,h", [(1, 64), (3, 64), (4, 9000)])  # the gate's one-pass and two-pass forms
def test_the_routers_fused_quantisation_keeps_nan(m, h):
    """``router_logits(..., quantize=True)`` quantises x in the gate's kernel: the same bits as
    ``quantize_per_token``'s twin, NaN included."""
    from densemoe.routing import router_logits

    x = torch.randn(m, h).to(BF16)
    x[m - 1, h // 2] = NAN
    _, (q, s) = router_logits(x, torch.randn(8, h).to(BF16), quantize=True, impl="triton")
    rq, rs = quantize_per_token_ref(x)
    assert same_bits(s, rs) and same_bits(q, rq) and s[m - 1].isnan()


@interp
def test_the_whole_layer_with_its_fused_router_and_quantisation():
    """``DenseMoE`` end to end (the router sees the NaN too: its logits and weights for that token
    are NaN): exactly that token's row."""
    w13, w2 = _weights()
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(E, H, generator=g) * H ** -0.5
    moe = densemoe.DenseMoE(prepare_weights(w13, w2, dtype="fp8"), gate, K)
    for m in (1, M):  # M = 1: the gate's one-pass form
        x = torch.randn(m, H).to(BF16)
        x[m // 2, 9] = NAN
        assert _bad_rows(moe(x)) == [m // 2]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
def test_nonfinite_rows_on_the_gpu(shape):
    """The same two properties on the model shapes, every strategy, fp8, bf16 and block fp8, M =
    1, 7 and 100 (Hopper's MMA reads e4m3 0x7F as NaN; the interpreter reads 480)."""
    from densemoe.shapes import SHAPES

    s = SHAPES[shape]
    Es, Is, Hs, k = s.experts, s.inter, s.hidden, s.topk
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(Es, 2 * Is, Hs, device="cuda", generator=g) * Hs ** -0.5
    w2 = torch.randn(Es, Hs, Is, device="cuda", generator=g) * Is ** -0.5
    w13[5, 3, 17] = NAN
    b13, b2 = _block_quant(w13), _block_quant(w2)
    pws = {"fp8": prepare_weights(w13, w2, dtype="fp8"), "bf16": prepare_weights(w13, w2, dtype="bf16"),
           "fp8block": prepare_weights(b13[0], b2[0], dtype="fp8", w13_scale=b13[1], w2_scale=b2[1])}
    for m in (1, 7, 100):
        ids = torch.rand(m, Es, device="cuda", generator=g).topk(k, dim=1).indices
        wts = torch.softmax(torch.randn(m, k, device="cuda", generator=g), dim=1)
        x = torch.randn(m, Hs, device="cuda", generator=g).to(BF16)
        x[m // 2, 9] = NAN
        want = sorted({m // 2} | {t for t in range(m) if 5 in ids[t].tolist()})
        alpha = torch.zeros(m, Es, device="cuda").scatter_(1, ids, wts)
        for dtype, pw in pws.items():
            for strategy in ("skip", "dense", "routed"):
                out = experts_forward(x, pw, alpha, expert_ids=ids, topk_weights=wts, strategy=strategy)
                assert _bad_rows(out) == want, (dtype, strategy, m, _bad_rows(out), want)
