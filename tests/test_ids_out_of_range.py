"""Top-k ids outside [0, E) (issue 21): the ids' values are not checked (that needs a host sync),
so every path drops such a slot: it adds nothing, and no kernel reads or writes outside its
tensors (the skipping path at M = 1 walks the ids themselves: it used to index the weights
with them; the dense and skipping paths built alpha with a scatter that failed)."""

from __future__ import annotations

import pytest
import torch

from densemoe import experts_forward, fused_experts, prepare_weights
from densemoe.reference import alpha_from_topk_ref
from densemoe.routing import alpha_from_topk

BF16 = torch.bfloat16
E, I, H, K = 8, 32, 64, 3


def _case(M, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g) * I ** -0.5
    x = torch.randn(M, H, generator=g).to(BF16)
    # slots 0 and 1: distinct valid experts from 0..5; slot 2: out of range (E, E + 7, -1, 2**32 + 3)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(M)])
    bad = torch.tensor([E, E + 7, -1, 2**32 + 3])[torch.arange(M) % 4]
    wts = torch.rand(M, K, generator=g) + 0.1
    return w13, w2, x, torch.cat([ids, bad[:, None]], dim=1), wts


def _dropped(ids, wts):
    """The same routing with the bad slot sent to a valid expert no slot uses (6), weight 0."""
    ok = (ids >= 0) & (ids < E)
    return torch.where(ok, ids, 6), torch.where(ok, wts, 0.0)


def test_alpha_from_topk_drops_them():
    _, _, _, ids, wts = _case(9)
    alpha = alpha_from_topk(ids, wts, E)
    assert torch.equal(alpha, alpha_from_topk_ref(ids, wts, E))
    assert torch.equal(alpha, alpha_from_topk(*_dropped(ids, wts), E))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("strategy", ["skip", "dense", "routed"])
@pytest.mark.parametrize("M", [1, 9])  # M = 1: the skipping path walks the ids
def test_every_path_drops_them(dtype, strategy, M):
    w13, w2, x, ids, wts = _case(M, seed=M)
    pw = prepare_weights(w13, w2, dtype=dtype)
    out = experts_forward(x, pw, None, expert_ids=ids, topk_weights=wts, strategy=strategy)
    ids_ok, wts_ok = _dropped(ids, wts)
    want = experts_forward(x, pw, None, expert_ids=ids_ok, topk_weights=wts_ok, strategy=strategy)
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_skip_at_one_token_with_alpha_given(dtype):
    """``experts_forward(x, w, alpha, expert_ids=...)`` at M = 1: the walk over the ids skips the
    bad one (this crashed the interpreter's heap before: the kernels read the weights at id E)."""
    w13, w2, x, ids, wts = _case(1, seed=4)
    pw = prepare_weights(w13, w2, dtype=dtype)
    alpha = alpha_from_topk(ids, wts, E)
    out = experts_forward(x, pw, alpha, expert_ids=ids, strategy="skip")
    want = experts_forward(x, pw, alpha, strategy="skip")
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("M", [1, 9])
def test_fused_experts_drops_them(M):
    w13, w2, x, ids, wts = _case(M, seed=7)
    out = fused_experts(x, w13, w2, wts, ids, dtype="fp8")
    torch.testing.assert_close(out, fused_experts(x, w13, w2, *reversed(_dropped(ids, wts)), dtype="fp8"),
                               rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
def test_every_path_drops_them_on_the_gpu(shape):
    """The model shapes, M = 1 (skip walks the ids: TMA and pointer loads at id 0) and 33, fp8
    and bf16, every strategy: equal to the same call with the bad slots sent to an unused expert
    with weight 0."""
    from densemoe.shapes import SHAPES

    s = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(s.experts, 2 * s.inter, s.hidden, device="cuda", generator=g) * s.hidden ** -0.5
    w2 = torch.randn(s.experts, s.hidden, s.inter, device="cuda", generator=g) * s.inter ** -0.5
    for dtype in ("fp8", "bf16"):
        pw = prepare_weights(w13, w2, dtype=dtype)
        for M in (1, 33):
            ids = torch.rand(M, s.experts - 1, device="cuda", generator=g).topk(s.topk, dim=1).indices
            ids[:, -1] = torch.tensor([s.experts, -1, 2**32 + 3], device="cuda")[torch.arange(M, device="cuda") % 3]
            wts = torch.rand(M, s.topk, device="cuda", generator=g) + 0.1
            ok = (ids >= 0) & (ids < s.experts)
            ids_ok, wts_ok = torch.where(ok, ids, s.experts - 1), torch.where(ok, wts, 0.0)
            x = torch.randn(M, s.hidden, device="cuda", generator=g).to(BF16)
            for strategy in ("skip", "dense", "routed"):
                out = experts_forward(x, pw, None, expert_ids=ids, topk_weights=wts, strategy=strategy)
                want = experts_forward(x, pw, None, expert_ids=ids_ok, topk_weights=wts_ok, strategy=strategy)
                if strategy == "routed":  # no atomics: the same bits
                    torch.testing.assert_close(out, want, rtol=0, atol=0, msg=f"{dtype} {strategy} M={M}")
                else:  # split-K and stream-K add fp32 parts with atomics: the last bit may differ between
                    # runs (the H200, 2026-12-05: Qwen3 fp8 dense M = 33); a leaked pair is far larger
                    err = (out.float() - want.float()).abs().max().item()
                    assert torch.isfinite(out).all() and err <= 2 ** -7 * want.float().abs().max().item(), \
                        (dtype, strategy, M, err)
            torch.cuda.synchronize()
