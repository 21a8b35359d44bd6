"""``fc2_quant_y``: FC2 with skipping on FC1's unquantised output, the y quantisation inside.

    fc2_quant_y(y, w, alpha, w_scale) == fc2(*quantize_y_fold_alpha(y, alpha, w_scale), skip=True)

bit for bit (each program quantises its token tile's picked segments with the quantisation
kernel's arithmetic, then runs the same FC2 loop). CPU: the real kernel through Triton's
interpreter on several schedules, y poisoned with NaN where no token picked the expert,
outputs poisoned before each run; the op's checks and opcheck. GPU: DeepSeek-V3 TP8.
"""

from __future__ import annotations

import os

import pytest
import torch

from densemoe.kernels.triton.fc2 import Fc2TritonConfig, fc2_triton
from densemoe.ops.fc2 import fc2, fc2_quant_y
from densemoe.quant import quantize_y_fold_alpha
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


def _case(M, E, I, N, gen, ydtype=BF16, k=2, device=DEV):
    y = torch.randn(M, E * I, generator=gen).to(ydtype)
    w = (torch.randn(N, E * I, generator=gen) * 0.1).to(FP8)
    top = torch.rand(M, E, generator=gen).topk(k, dim=1).indices
    alpha = torch.zeros(M, E).scatter_(1, top, torch.rand(M, k, generator=gen) + 0.1)
    alpha[M // 2] = 0  # a token that picked nothing
    if M > 3:
        alpha[1, :] = 0
        alpha[1, 0] = 0.5  # a token with a single expert
    w_scale = torch.rand(E, generator=gen) + 0.5
    y_nan = y.clone()
    y_nan[(alpha == 0).repeat_interleave(I, dim=1)] = float("nan")  # never read
    return y.to(device), y_nan.to(device), w.to(device), alpha.to(device), w_scale.to(device)


CONFIGS = [Fc2TritonConfig(16, 64, 64, 4, 2, True, True, 1, 1),
           Fc2TritonConfig(16, 32, 32, 4, 2, False, False, 0, 1),
           Fc2TritonConfig(32, 64, 32, 4, 2, True, True, 2, 1)]


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.to_str())
@pytest.mark.parametrize("M", [1, 7, 40])
@pytest.mark.parametrize("ws", [True, False], ids=["w_scale", ""])
@pytest.mark.parametrize("ydtype", [BF16, torch.float16], ids=["bf16", "fp16"])
def test_fc2_quant_y_kernel_bits(cfg, M, ws, ydtype, request):
    E, I, N = 6, 64, 64
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    y, y_nan, w, alpha, w_scale = _case(M, E, I, N, g, ydtype)
    w_scale = w_scale if ws else None
    y8, a2 = quantize_y_fold_alpha(y, alpha, w_scale)
    want = torch.full((M, N), float("nan"), dtype=torch.float32, device=DEV)
    fc2_triton(y8, w, a2, want, cfg, skip=True, num_programs=5)
    got = torch.full((M, N), float("nan"), dtype=torch.float32, device=DEV)
    q = torch.full((M, E * I), float("nan"), device=DEV).to(FP8)  # scratch, poisoned
    a2s = torch.full((M, E), float("nan"), device=DEV)
    fc2_triton(q, w, a2s, got, cfg, skip=True, num_programs=5, w_scale=w_scale, quant_from=(y_nan, alpha))
    assert not torch.isnan(got).any()
    assert torch.equal(got, want)
    assert (got[M // 2] == 0).all()


@needs_kernel
@pytest.mark.interpreter
def test_fc2_quant_y_op_and_checks(request):
    M, E, I, N = 5, 4, 32, 48
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    y, y_nan, w, alpha, w_scale = _case(M, E, I, N, g)
    y8, a2 = quantize_y_fold_alpha(y, alpha, w_scale)
    assert torch.equal(fc2_quant_y(y_nan, w, alpha, w_scale), fc2(y8, w, a2, skip=True))
    out = torch.full((M, N), float("nan"), dtype=torch.float32, device=DEV)
    fc2_quant_y(y_nan, w, alpha, w_scale, out=out)
    assert torch.equal(out, fc2(y8, w, a2, skip=True, out_dtype=torch.float32))
    for bad, exc, pattern in (
            (dict(y=y.to(FP8)), TypeError, "y must be"),
            (dict(w=w.to(BF16)), TypeError, "w must be"),
            (dict(alpha=alpha[:, :3]), ValueError, "K=128 must be E=3"),
            (dict(alpha=alpha[:4]), ValueError, "alpha has 4 rows"),
            (dict(w_scale=w_scale[:3]), ValueError, r"w_scale must be \[E=4\]"),
            (dict(y=y[:, ::2]), ValueError, "K=64 must be E=4|w has K=128"),
            (dict(alpha=alpha.t().contiguous().t()), ValueError, "unit column strides")):
        args = dict(y=y, w=w, alpha=alpha, w_scale=w_scale)
        args.update(bad)
        with pytest.raises(exc, match=pattern):
            fc2_quant_y(**args)
    with pytest.raises(TypeError, match="config must be a Fc2TritonConfig"):
        fc2_quant_y(y, w, alpha, config="16,64")
    with pytest.raises(ValueError, match="out must be"):
        fc2_quant_y(y, w, alpha, out=torch.empty(M, N + 1, device=DEV))


@needs_kernel
@pytest.mark.interpreter
def test_fc2_quant_y_opcheck(request):
    M, E, I, N = 3, 4, 32, 48
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    y, _, w, alpha, w_scale = _case(M, E, I, N, g)
    out = torch.empty(M, N, dtype=torch.float32, device=DEV)
    # (torch's schema check multiplies fp8 tensors, which the CPU cannot: the other checks)
    torch.library.opcheck(torch.ops.densemoe.fc2_quant_y.default, (y, w, alpha, w_scale, out, ""),
                          test_utils=("test_faketensor", "test_autograd_registration"))


@gpu_test
@pytest.mark.parametrize("M", [1, 2, 4, 9])
def test_fc2_quant_y_model_shape(M):
    """DeepSeek-V3 TP8 (N = 7168, E = 256, I = 256) with top-8 routing: the same bits as the
    quantisation kernel followed by FC2 (default configs: at most two programs per column tile,
    and two fp32 partial sums add the same in either order)."""
    from densemoe.routing import softmax_topk

    E, I, N = 256, 256, 7168
    g = torch.Generator(device="cuda").manual_seed(M)
    y = torch.randn(M, E * I, device="cuda", generator=g).to(BF16)
    w = (torch.randn(N, E * I, device="cuda", generator=g) * (8 * I) ** -0.5).to(FP8)
    alpha = softmax_topk(torch.randn(M, E, device="cuda", generator=g), 8, renormalize=True).alpha
    w_scale = torch.rand(E, device="cuda", generator=g) + 0.5
    y8, a2 = quantize_y_fold_alpha(y, alpha, w_scale)
    want = fc2(y8, w, a2, skip=True)
    y_nan = y.clone()
    y_nan[(alpha == 0).repeat_interleave(I, dim=1)] = float("nan")
    got = torch.full_like(want, float("nan"))
    fc2_quant_y(y_nan, w, alpha, w_scale, out=got)
    assert torch.equal(got, want)
