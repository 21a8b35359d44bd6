"""FC2 with a bf16 input against fp8 weights (W8A16) and the per-expert ``w_scale``.

    out[m, n] = sum_e (alpha[m, e] * w_scale[e]) * sum_i a[m, e*I + i] * bf16(w[n, e*I + i])

The weight tiles are converted in registers (e4m3 -> bf16 is exact), so against a float64
reference the only error is the fp32 accumulation's. CPU: the real kernel through Triton's
interpreter, every schedule (swap-AB or not, split or stream-K, skipping or not), NaN-poisoned
outputs and NaN in the segments skipping must never read. GPU: the DeepSeek-V3 TP8 shape.
"""

from __future__ import annotations

import os

import pytest
import torch

import densemoe
from densemoe.kernels.triton.fc2 import Fc2TritonConfig, fc2_triton
from densemoe.reference import fc2_ref
from _helpers import FP8, seed_of

BF16 = torch.bfloat16
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = "cpu" if INTERPRET else "cuda"
needs_kernel = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                  reason="needs TRITON_INTERPRET=1 or a CUDA GPU")


def gpu_test(fn):
    """GPU tests: model-shape weights take GBs, so they share one pytest-xdist worker."""
    for mark in (pytest.mark.gpu, pytest.mark.xdist_group("gpu_big"),
                 pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                                    reason="needs a CUDA GPU and TRITON_INTERPRET unset")):
        fn = mark(fn)
    return fn


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _case(M, E, I, N, gen, device=DEV, k=2):
    a = torch.randn(M, E * I, generator=gen).to(BF16)
    w = (torch.randn(N, E * I, generator=gen) * 0.1).to(FP8)
    top = torch.rand(M, E, generator=gen).topk(k, dim=1).indices
    alpha = torch.zeros(M, E).scatter_(1, top, torch.rand(M, k, generator=gen) + 0.1)
    alpha[M // 2] = 0  # a token that picked nothing
    w_scale = torch.rand(E, generator=gen) + 0.5
    return a.to(device), w.to(device), alpha.to(device), w_scale.to(device)


def _ref(a, w, alpha, w_scale):
    return fc2_ref(a, w.to(BF16), alpha * w_scale[None, :], out_dtype=torch.float64)


CONFIGS = [Fc2TritonConfig(16, 64, 32, 4, 2, True, True, 1, 1),
           Fc2TritonConfig(16, 32, 64, 4, 2, False, False, 0, 1),
           Fc2TritonConfig(32, 64, 64, 4, 2, True, True, 2, 1)]


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.to_str())
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "dense"])
@pytest.mark.parametrize("M", [1, 7, 40])
def test_fc2_w8a16_kernel(cfg, skip, M, request):
    E, I, N = 6, 64, 64
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    a, w, alpha, w_scale = _case(M, E, I, N, g)
    a_in = a.clone()
    if skip:  # what nobody picked is never read (or weighted out): NaN there must not leak
        a_in[(alpha == 0).repeat_interleave(I, dim=1)] = float("nan")
    out = torch.full((M, N), float("nan"), dtype=torch.float32, device=DEV)
    fc2_triton(a_in, w, alpha, out, cfg, skip=skip, num_programs=5, w_scale=w_scale)
    ref = _ref(a, w, alpha, w_scale)
    assert not torch.isnan(out).any()
    assert (out[M // 2] == 0).all()
    assert rel(out, ref) <= 1e-5  # exact products, fp32 sums


@needs_kernel
@pytest.mark.interpreter
def test_fc2_op_w8a16_and_w_scale_checks(request):
    M, E, I, N = 5, 4, 32, 48
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    a, w, alpha, w_scale = _case(M, E, I, N, g)
    ref = _ref(a, w, alpha, w_scale)
    for skip in (True, False):
        out = densemoe.fc2(a, w, alpha, skip=skip, w_scale=w_scale, out_dtype=torch.float32)
        assert rel(out, ref) <= 1e-5
    # w_scale on same-dtype inputs: the same as folding it into alpha
    w16 = w.to(BF16)
    assert rel(densemoe.fc2(a, w16, alpha, w_scale=w_scale, out_dtype=torch.float32), ref) <= 1e-5
    with pytest.raises(TypeError, match="W8A16"):
        densemoe.fc2(a.to(FP8), w16, alpha)  # fp8 a with bf16 w: not a supported pair
    with pytest.raises(ValueError, match="Triton kernel only"):
        densemoe.fc2(a, w, alpha, backend="cute")
    with pytest.raises(ValueError, match="w_scale must be"):
        densemoe.fc2(a, w, alpha, w_scale=w_scale[:-1])
    with pytest.raises(TypeError, match="w_scale"):
        densemoe.fc2(a, w, alpha, w_scale=w_scale.double())


@gpu_test
@pytest.mark.parametrize("M", [1, 4, 16])
def test_fc2_w8a16_model_shape(M):
    """DeepSeek-V3 TP8 (N = 7168, E = 256, I = 256) with top-8 routing, skipping on (the
    layer's small-M path) and off, against a float32 reference with the weights upcast."""
    from densemoe.routing import softmax_topk

    E, I, N = 256, 256, 7168
    g = torch.Generator(device="cuda").manual_seed(M)
    a = torch.randn(M, E * I, device="cuda", generator=g).to(BF16)
    w = (torch.randn(N, E * I, device="cuda", generator=g) * (8 * I) ** -0.5).to(FP8)
    alpha = softmax_topk(torch.randn(M, E, device="cuda", generator=g), 8, renormalize=True).alpha
    w_scale = torch.rand(E, device="cuda", generator=g) + 0.5
    ref = fc2_ref(a, w.to(BF16), alpha * w_scale[None, :], out_dtype=torch.float32, compute_dtype=torch.float32)
    for skip in (True, False):
        out = torch.full((M, N), float("nan"), dtype=torch.float32, device="cuda")
        densemoe.fc2(a, w, alpha, skip=skip, w_scale=w_scale, out=out)
        assert not torch.isnan(out).any() and rel(out, ref) <= 1e-4, (skip, rel(out, ref))
