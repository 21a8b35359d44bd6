"""FC2's per-expert ``w_scale`` (w's dequantisation scale, multiplied into alpha in the kernel):

    out[m, n] = sum_e (alpha[m, e] * w_scale[e]) * sum_i a[m, e*I + i] * w[n, e*I + i]

CPU: the real Triton kernel through the interpreter, every schedule (swap-AB or not, split or
stream-K, skipping or not), NaN-poisoned outputs, NaN where skipping must never read; the op's
checks. GPU: the DeepSeek-V3 TP8 shape on both backends (the CuTe kernel gets alpha * w_scale).
"""

from __future__ import annotations

import os

import pytest
import torch

import densemoe
from densemoe.kernels.triton.fc2 import Fc2TritonConfig, fc2_triton
from densemoe.reference import fc2_ref
from _helpers import FP8, gpu_big_test as gpu_test, seed_of

BF16 = torch.bfloat16
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = "cpu" if INTERPRET else "cuda"
needs_kernel = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                  reason="needs TRITON_INTERPRET=1 or a CUDA GPU")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _case(M, E, I, N, gen, dtype, device=DEV, k=2):
    a = torch.randn(M, E * I, generator=gen).to(dtype)
    w = (torch.randn(N, E * I, generator=gen) * 0.1).to(dtype)
    top = torch.rand(M, E, generator=gen).topk(k, dim=1).indices
    alpha = torch.zeros(M, E).scatter_(1, top, torch.rand(M, k, generator=gen) + 0.1)
    alpha[M // 2] = 0  # a token that picked nothing
    w_scale = torch.rand(E, generator=gen) + 0.5
    return a.to(device), w.to(device), alpha.to(device), w_scale.to(device)


def _ref(a, w, alpha, w_scale):
    return fc2_ref(a, w, alpha * w_scale[None, :], out_dtype=torch.float64)


CONFIGS = [Fc2TritonConfig(16, 64, 32, 4, 2, True, True, 1, 1),
           Fc2TritonConfig(16, 32, 64, 4, 2, False, False, 0, 1),
           Fc2TritonConfig(32, 64, 64, 4, 2, True, True, 2, 1)]


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.to_str())
@pytest.mark.parametrize("skip", [True, False], ids=["skip", "dense"])
@pytest.mark.parametrize("dtype", [FP8, BF16], ids=["fp8", "bf16"])
@pytest.mark.parametrize("M", [1, 7, 40])
def test_fc2_kernel_w_scale(cfg, skip, dtype, M, request):
    E, I, N = 6, 64, 64
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    a, w, alpha, w_scale = _case(M, E, I, N, g, dtype)
    a_in = a.clone()
    if skip:  # what nobody picked is never read (or weighted out): NaN there must not leak
        a_in.view(torch.uint8 if dtype == FP8 else torch.int16)[(alpha == 0).repeat_interleave(I, dim=1)] = (
            0x7F if dtype == FP8 else 0x7FC0)  # NaN in e4m3fn / bf16
    out = torch.full((M, N), float("nan"), dtype=torch.float32, device=DEV)
    fc2_triton(a_in, w, alpha, out, cfg, skip=skip, num_programs=5, w_scale=w_scale)
    assert not torch.isnan(out).any()
    assert (out[M // 2] == 0).all()
    assert rel(out, _ref(a, w, alpha, w_scale)) <= 1e-5  # exact products, fp32 sums


@needs_kernel
@pytest.mark.interpreter
def test_fc2_op_w_scale_and_checks(request):
    M, E, I, N = 5, 4, 32, 48
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    a, w, alpha, w_scale = _case(M, E, I, N, g, BF16)
    ref = _ref(a, w, alpha, w_scale)
    for skip in (True, False):
        out = densemoe.fc2(a, w, alpha, skip=skip, w_scale=w_scale, out_dtype=torch.float32)
        assert rel(out, ref) <= 1e-5
        # the same bits as folding it into alpha first
        assert torch.equal(out, densemoe.fc2(a, w, alpha * w_scale[None, :], skip=skip, out_dtype=torch.float32))
    with pytest.raises(ValueError, match=r"w_scale must be \[E=4\]"):
        densemoe.fc2(a, w, alpha, w_scale=w_scale[:-1])
    with pytest.raises(TypeError, match="w_scale"):
        densemoe.fc2(a, w, alpha, w_scale=w_scale.double())
    with pytest.raises(TypeError, match="w_scale"):
        densemoe.fc2(a, w, alpha, w_scale=[1.0] * E)


@gpu_test
@pytest.mark.parametrize("M", [1, 16, 256])
def test_fc2_w_scale_model_shape(M):
    """DeepSeek-V3 TP8 (N = 7168, E = 256, I = 256), fp8, top-8 routing: on every backend and
    skipping setting, w_scale gives what folding it into alpha beforehand gives (the same
    fp32 product; tiles split over programs add their partial sums in any order, hence a
    tolerance of a few fp32 ulps rather than equality)."""
    from densemoe.routing import softmax_topk

    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed (pip install -e '.[dev]')")
    E, I, N = 256, 256, 7168
    g = torch.Generator(device="cuda").manual_seed(M)
    a = torch.randn(M, E * I, device="cuda", generator=g).to(FP8)
    w = (torch.randn(N, E * I, device="cuda", generator=g) * (8 * I) ** -0.5).to(FP8)
    alpha = softmax_topk(torch.randn(M, E, device="cuda", generator=g), 8, renormalize=True).alpha
    w_scale = torch.rand(E, device="cuda", generator=g) + 0.5
    for backend, skip in (("triton", True), ("triton", False), ("cute", False), ("auto", None)):
        out = torch.full((M, N), float("nan"), dtype=torch.float32, device="cuda")
        densemoe.fc2(a, w, alpha, skip=skip, w_scale=w_scale, out=out, backend=backend)
        folded = densemoe.fc2(a, w, alpha * w_scale[None, :], skip=skip, backend=backend, out_dtype=torch.float32)
        assert not torch.isnan(out).any() and rel(out, folded) <= 1e-6, (backend, skip, rel(out, folded))
