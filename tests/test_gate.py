"""The router's gate kernel (densemoe.kernels.triton.gate through ``routing.router_logits``):
logits against a float64 reference, the fused quantisation bit for bit against
``quantize_per_token``, the fallbacks and errors, and the layer using it.

CPU (CI): through Triton's interpreter. GPU (marker ``gpu``): the model shapes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from _helpers import seed_of
from densemoe import routing
from densemoe.kernels.triton.gate import MAX_M, gate_blocks
from densemoe.quant import quantize_per_token

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs the kernel on the CPU: TRITON_INTERPRET=1")


def _inputs(M, E, H, dtype, wdtype, device, *parts):
    g = torch.Generator().manual_seed(seed_of("gate", M, E, H, str(dtype), str(wdtype), *parts))
    x = (torch.randn(M, H, generator=g) * 3).to(dtype).to(device)
    w = (torch.randn(E, H, generator=g) * H ** -0.5).to(wdtype).to(device)
    return x, w


def _check(x, w, float32: bool, quantize: bool):
    logits, xq = routing.router_logits(x, w, float32=float32, quantize=quantize, impl="triton")
    torch_logits, torch_xq = routing.router_logits(x, w, float32=float32, quantize=quantize, impl="torch")
    assert logits.dtype == torch_logits.dtype == (torch.float32 if float32 else x.dtype)
    assert logits.shape == (x.shape[0], w.shape[0])
    ref = x.double() @ w.double().T
    if not float32:  # what F.linear multiplies: the weight cast to x's dtype
        ref = x.double() @ w.to(x.dtype).double().T
    err = (logits.double() - ref).abs().max().item()
    torch_err = (torch_logits.double() - ref).abs().max().item()
    # both accumulate in float32 and round once to the output dtype: ours within torch's error
    # plus an ulp of the output at the largest logit
    ulp = ref.abs().max().item() * (torch.finfo(logits.dtype).eps)
    assert err <= torch_err + ulp, (err, torch_err, ulp)
    if quantize:
        q, s = xq
        tq, ts = torch_xq
        assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (x.shape[0],)
        assert torch.equal(s.cpu(), ts.cpu())
        assert torch.equal(q.view(torch.uint8).cpu(), tq.view(torch.uint8).cpu())
    else:
        assert xq is None


@needs_interpreter
@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("E,H", [(8, 96), (64, 200), (256, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gate_kernel_cpu(M, E, H, dtype):
    x, w = _inputs(M, E, H, dtype, torch.bfloat16, "cpu")
    _check(x, w, float32=False, quantize=True)
    _check(x, w, float32=True, quantize=False)


@needs_interpreter
def test_gate_kernel_fp16_fp32_weight_and_zero_row():
    x, w = _inputs(4, 16, 48, torch.float16, torch.float32, "cpu")
    x[2] = 0  # an all-zero row: scale 1, codes 0
    _check(x, w, float32=False, quantize=True)
    _check(x, w, float32=True, quantize=True)


def test_gate_blocks():
    assert gate_blocks(1, 7168) == (1, 8192, True)
    assert gate_blocks(16, 2048) == (16, 2048, True)
    assert gate_blocks(3, 9000) == (4, 8192, False)


def test_quant_slices_cover_the_row():
    from densemoe.kernels.triton.gate import quant_slice

    assert quant_slice(7168, 256) == 32 and quant_slice(2048, 128) == 16 and quant_slice(4096, 8) == 512
    for h in (1, 15, 16, 100, 2048, 7168, 8192):
        for e in (1, 2, 8, 60, 128, 256, 1024):
            sl = quant_slice(h, e)
            assert sl >= 16 and sl & (sl - 1) == 0 and e * sl >= h, (h, e, sl)


@needs_interpreter
@pytest.mark.parametrize("M", [1, 4])
def test_gate_kernel_two_passes(M, monkeypatch):
    """H longer than a program's row block: the loop over H and the second quantisation pass."""
    from densemoe.kernels.triton import gate

    monkeypatch.setattr(gate, "MAX_BLOCK_K", 32)
    assert gate.gate_blocks(M, 100)[2] is False
    x, w = _inputs(M, 2, 100, torch.bfloat16, torch.bfloat16, "cpu")  # (E=2 < M=4: a program does two rows)
    _check(x, w, float32=False, quantize=True)


@needs_interpreter
def test_router_logits_fallbacks_and_errors():
    x, w = _inputs(MAX_M + 1, 8, 32, torch.bfloat16, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="up to 4"):
        routing.router_logits(x, w, impl="triton")
    logits, xq = routing.router_logits(x, w, quantize=True)  # auto: torch above MAX_M
    assert torch.equal(logits, F.linear(x, w))
    q, s = quantize_per_token(x)
    assert torch.equal(xq[0].view(torch.uint8), q.view(torch.uint8)) and torch.equal(xq[1], s)
    with pytest.raises(ValueError, match=r"weight must be \[E, H=32\]"):
        routing.router_logits(x, w[:, :16])
    with pytest.raises(TypeError, match="floating"):
        routing.router_logits(x, w.to(torch.int32))
    with pytest.raises(ValueError, match="impl"):
        routing.router_logits(x, w, impl="cuda")
    with pytest.raises(TypeError, match="quantize must be a bool"):
        routing.router_logits(x, w, quantize=1)
    xs = torch.randn(4, 64)[:, ::2]
    with pytest.raises(ValueError, match="unit stride"):
        routing.router_logits(xs, torch.randn(8, 32), impl="triton")


@needs_interpreter
def test_router_logits_opcheck():
    x, w = _inputs(3, 16, 64, torch.bfloat16, torch.bfloat16, "cpu")
    out = torch.empty(3, 16, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.densemoe.router_gate.default, (x, w, out, True))
    q = torch.empty(3, 64, dtype=torch.float8_e4m3fn)
    s = torch.empty(3)
    # (torch's schema check multiplies the fp8 output, which the CPU cannot: the other checks)
    torch.library.opcheck(torch.ops.densemoe.router_gate_quant.default, (x, w, out, q, s, True),
                          test_utils=("test_faketensor", "test_autograd_registration"))


@needs_interpreter
def test_router_logits_compiles():
    x, w = _inputs(2, 16, 64, torch.bfloat16, torch.bfloat16, "cpu")
    fn = torch.compile(lambda a, b: routing.router_logits(a, b, quantize=True), fullgraph=True)
    logits, (q, s) = fn(x, w)
    elogits, (eq, es) = routing.router_logits(x, w, quantize=True)
    assert torch.equal(logits, elogits) and torch.equal(q.view(torch.uint8), eq.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("M", [1, 3, 4])
@pytest.mark.parametrize("E,H", [(256, 7168), (128, 2048)])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_gate_kernel_gpu(M, E, H, wdtype):
    x, w = _inputs(M, E, H, torch.bfloat16, wdtype, "cuda")
    _check(x, w, float32=False, quantize=True)
    _check(x, w, float32=True, quantize=True)
