"""FP8 activation quantisers: the Triton kernels against their torch twins, bit for bit.

CPU (CI): the kernels through Triton's interpreter. GPU: the same tests on the device, plus the
model shapes."""

from __future__ import annotations

import os

import pytest
import torch

from densemoe.quant import quantize_per_expert, quantize_per_token, quantize_y_fold_alpha
from densemoe.reference import quantize_per_token_ref, quantize_y_fold_alpha_ref
from densemoe.shapes import SHAPES
from _helpers import make_alpha, seed_of

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = "cpu" if INTERPRET else "cuda"
needs_kernel = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                  reason="needs TRITON_INTERPRET=1 or a CUDA GPU")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,H", [(1, 64), (7, 200), (100, 96), (3, 5000)])  # 5000: two passes
def test_quantize_per_token_matches_torch(M, H, dtype, request):
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    x = (torch.randn(M, H, generator=g) * torch.rand(M, 1, generator=g) * 30).to(dtype)
    x[M // 2] = 0  # an all-zero row: scale 1, zeros
    q, s = quantize_per_token(x.to(DEV))
    q_ref, s_ref = quantize_per_token_ref(x)
    assert torch.equal(s.cpu(), s_ref)
    assert _bits_equal(q.cpu(), q_ref)
    assert s[M // 2].item() == 1.0 and not q.float()[M // 2].any()
    # dequantised within e4m3's half-ulp (2^-4 relative) of x
    err = (q.float().cpu() * s_ref[:, None] - x.float()).abs()
    assert (err <= x.float().abs() * 2 ** -4 + s_ref[:, None] * 2 ** -9).all()


@needs_kernel
@pytest.mark.parametrize("M,E,I", [(M, E, I) for M in (1, 7, 100) for E, I in ((4, 64), (3, 96), (8, 16))]
                         + [(1, 2, 5000), (7, 2, 5000)])  # I = 5000: two passes (kept to M <= 7: interpreter time)
@pytest.mark.parametrize("alpha_kind", ["sparse", "dense", "zero_row", "zero_col"])
def test_quantize_y_fold_alpha_matches_torch(M, E, I, alpha_kind, request):
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    y = (torch.randn(M, E * I, generator=g) * torch.rand(M, E * I, generator=g) * 10).to(torch.bfloat16)
    alpha = make_alpha(M, E, g, alpha_kind)
    w2s = torch.rand(E, generator=g) + 0.5
    y[0, :I] = 0  # an all-zero segment: scale 1
    for ws in (w2s, None):
        q, a2 = quantize_y_fold_alpha(y.to(DEV), alpha.to(DEV), ws.to(DEV) if ws is not None else None)
        q_ref, a2_ref = quantize_y_fold_alpha_ref(y, alpha, ws)
        assert _bits_equal(q.cpu(), q_ref)
        assert torch.equal(a2.cpu(), a2_ref)
    dead = (alpha == 0).repeat_interleave(I, dim=1)
    assert not q.float().cpu()[dead].any() and not a2.cpu()[alpha == 0].any()


def test_quantize_y_fold_alpha_ref_against_per_token_expert():
    """The twin's semantics: per-(token, expert) fp8 with alpha * s * w2_scale folded, y times
    that alpha reconstructs alpha * y * w2_scale within e4m3's rounding."""
    g = torch.Generator().manual_seed(3)
    M, E, I = 5, 6, 32
    y = torch.randn(M, E * I, generator=g)
    alpha = make_alpha(M, E, g, "sparse")
    ws = torch.rand(E, generator=g) + 0.5
    q, a2 = quantize_y_fold_alpha_ref(y, alpha, ws)
    deq = q.float().reshape(M, E, I) * a2[:, :, None]
    want = y.reshape(M, E, I) * (alpha * ws)[:, :, None]
    assert ((deq - want).abs() <= want.abs() * 2 ** -4 + 1e-6 + (a2.abs()[:, :, None] * 2 ** -9)).all()


def test_quantize_y_fold_alpha_validation():
    y = torch.randn(4, 12)
    with pytest.raises(ValueError, match="not a multiple of alpha's E=5"):
        quantize_y_fold_alpha(y, torch.ones(4, 5))
    with pytest.raises(ValueError, match="alpha must be float32"):
        quantize_y_fold_alpha(y, torch.ones(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"w2_scale must be \[E=3\]"):
        quantize_y_fold_alpha(y, torch.ones(4, 3), torch.ones(4))
    with pytest.raises(ValueError, match="y must be"):
        quantize_y_fold_alpha(y[0], torch.ones(4, 3))
    with pytest.raises(ValueError, match="one device"):
        quantize_y_fold_alpha(y, torch.ones(4, 3, device="meta"))
    with pytest.raises(ValueError, match="x must be"):
        quantize_per_token(y[0])


def test_quantize_per_expert_chunks_match_one_pass():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(11, 6, 5, generator=g) * (torch.arange(11) + 1.0)[:, None, None]
    q, s = quantize_per_expert(w, experts_per_chunk=4)
    q1, s1 = quantize_per_expert(w, experts_per_chunk=64)
    assert torch.equal(s, s1) and _bits_equal(q, q1)
    assert torch.allclose(s, w.abs().amax(dim=(1, 2)) / 448)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and TRITON_INTERPRET unset")
@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("M", [1, 100, 1000])
def test_quantizers_model_shapes_gpu(shape, M):
    s = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, s.hidden, device="cuda", generator=g).to(torch.bfloat16)
    q, sx = quantize_per_token(x)
    q_ref, sx_ref = quantize_per_token_ref(x)
    assert torch.equal(sx, sx_ref) and _bits_equal(q, q_ref)
    y = torch.randn(M, s.experts * s.inter, device="cuda", generator=g).to(torch.bfloat16)
    logits = torch.randn(M, s.experts, device="cuda", generator=g)
    top = logits.topk(s.topk, dim=1)
    alpha = torch.zeros_like(logits).scatter_(1, top.indices, top.values.softmax(dim=1))
    ws = torch.rand(s.experts, device="cuda", generator=g) + 0.5
    q, a2 = quantize_y_fold_alpha(y, alpha, ws)
    q_ref, a2_ref = quantize_y_fold_alpha_ref(y, alpha, ws)
    assert _bits_equal(q, q_ref) and torch.equal(a2, a2_ref)
