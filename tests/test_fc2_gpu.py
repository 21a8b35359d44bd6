"""FC2 on a real GPU (marker ``gpu``): the shapes that matter, ragged M, all output dtypes,
errors bounded by what PyTorch's own GEMMs get at the same precision."""

from __future__ import annotations

import pytest
import torch

import densemoe
from densemoe import Fc2TritonConfig
from densemoe.reference import fc2_ref
from _helpers import FP8, OUT_DTYPES, assert_close_to_torch, dtype_id, make_alpha, seed_of

pytestmark = pytest.mark.gpu

SHAPES = {"deepseek-v3-tp8": (7168, 256, 256), "qwen3-30b-a3b": (2048, 128, 768)}
MS = (1, 7, 100, 256, 1000)


def gpu_inputs(M, N, E, I, dtype, seed, alpha_kind="sparse"):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    K = E * I
    a = torch.randn(M, K, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(N, K, generator=gen, device="cuda") * 0.5).to(dtype)
    alpha = make_alpha(M, E, torch.Generator().manual_seed(seed), alpha_kind).cuda()
    return a, w, alpha


def torch_same_precision(a, w, alpha, fast: bool = True) -> torch.Tensor:
    """What PyTorch's GEMMs get at the kernel's precision, in fp32 before the final cast: per
    expert, cuBLAS FP8 (torch._scaled_mm, fp32 out, the tensor cores' fast accumulation, as the
    kernel uses; ``fast`` False: without it, as the CuTe FC2's ``promote=1`` adds each k-tile
    into fp32) or an fp32 GEMM of the upcast bf16 inputs (exact products, fp32 sums, as bf16
    tensor-core GEMMs do); then alpha times each partial sum, summed in fp32."""
    M, K = a.shape
    E = alpha.shape[1]
    I = K // E
    N = w.shape[0]
    Mp, Np = -(-M // 16) * 16, -(-N // 16) * 16  # cuBLAS FP8 wants multiples of 16: zero rows
    ap = torch.zeros(Mp, K, device=a.device, dtype=a.dtype)
    ap[:M] = a
    wp = torch.zeros(Np, K, device=a.device, dtype=a.dtype)
    wp[:N] = w
    one = torch.ones((), device=a.device)
    acc = torch.zeros(M, w.shape[0], device=a.device)
    for e in range(E):
        sl = slice(e * I, (e + 1) * I)
        if a.dtype == FP8:
            part = torch._scaled_mm(ap[:, sl].contiguous(), wp[:, sl].contiguous().T, scale_a=one, scale_b=one,
                                    out_dtype=torch.float32, use_fast_accum=fast)[:M, :N]
        else:
            part = a[:, sl].float() @ w[:, sl].float().T
        acc += alpha[:, e:e + 1] * part
    return acc


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", (FP8, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_model_shapes(shape, M, dtype, request):
    check_model_shape(SHAPES[shape], M, dtype, seed_of(request.node.nodeid), backend="auto")


def check_model_shape(nei, M, dtype, seed, backend):
    """Every out dtype into a strided, NaN-poisoned buffer: result within PyTorch's error at the
    same precision, and nothing written outside ``out``."""
    N, E, I = nei
    a, w, alpha = gpu_inputs(M, N, E, I, dtype, seed)
    ref = fc2_ref(a, w, alpha, torch.float64)
    base = torch_same_precision(a, w, alpha)
    for out_dtype in OUT_DTYPES:
        buf = torch.full((M + 2, N + 8), float("nan"), dtype=out_dtype, device="cuda")
        out = buf[1:M + 1, 4:N + 4]
        got = densemoe.fc2(a, w, alpha, out=out, backend=backend)
        assert got is out
        assert_close_to_torch(out.cpu(), ref.cpu(), base.to(out_dtype).cpu())
        outside = buf.clone()
        outside[1:M + 1, 4:N + 4] = 0
        assert torch.isnan(outside).sum() == outside.numel() - M * N, "kernel wrote outside out"


CONFIGS = [
    Fc2TritonConfig(16, 64, 256, 4, 6, True, True, 0, 1),
    Fc2TritonConfig(16, 64, 256, 4, 4, True, True, 0, 2),
    Fc2TritonConfig(16, 128, 128, 4, 8, True, True, 3, 1),
    Fc2TritonConfig(64, 128, 256, 4, 3, True, True, 2, 1),
    Fc2TritonConfig(128, 64, 256, 4, 4, True, False, 1, 1),
    Fc2TritonConfig(128, 128, 256, 8, 3, False, True, 1, 1),
    Fc2TritonConfig(64, 128, 128, 4, 4, False, True, 0, 1),
    Fc2TritonConfig(128, 128, 128, 8, 3, False, False, 5, 1),
]


@pytest.mark.parametrize("dtype", (FP8, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.to_str().replace(",", "|"))
@pytest.mark.parametrize("M", (7, 100, 300))
def test_pinned_configs(cfg, M, dtype, request):
    N, E, I = 1000, 24, 256  # ragged N; 24 experts so splits cut tiles unevenly
    bk = cfg.block_k if dtype == FP8 else cfg.block_k // 2
    stages = cfg.num_stages if dtype == FP8 else max(2, cfg.num_stages // 2)
    cfg = Fc2TritonConfig(cfg.block_m, cfg.block_n, bk, cfg.num_warps, stages, cfg.swap_ab, cfg.use_tma,
                          cfg.split, cfg.ctas_per_sm)
    a, w, alpha = gpu_inputs(M, N, E, I, dtype, seed_of(request.node.nodeid), "zero_col")
    ref = fc2_ref(a, w, alpha, torch.float64)
    base = torch_same_precision(a, w, alpha).to(torch.bfloat16)
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    densemoe.fc2(a, w, alpha, out=out, config=cfg)
    assert_close_to_torch(out.cpu(), ref.cpu(), base.cpu())


@pytest.mark.parametrize("dtype", (FP8, torch.bfloat16), ids=dtype_id)
def test_unaligned_and_strided_inputs(dtype, request):
    """a at an odd address (no TMA: pointer path), w a column slice of a wider matrix."""
    M, N, E, I = 37, 512, 8, 256
    a0, w0, alpha = gpu_inputs(M, N + 0, E, I, dtype, seed_of(request.node.nodeid))
    K = E * I
    buf = torch.empty(M * K + 1, dtype=dtype, device="cuda")
    a = buf[1:].view(M, K)
    a.copy_(a0)
    wide = torch.empty(N, K + 64, dtype=dtype, device="cuda")
    wide[:, :K] = w0
    w = wide[:, :K]
    ref = fc2_ref(a, w, alpha, torch.float64)
    base = torch_same_precision(a0, w0, alpha).to(torch.bfloat16)
    assert_close_to_torch(densemoe.fc2(a, w, alpha).cpu(), ref.cpu(), base.cpu())


def check_graph_replay(M, N, E, I, node_id, config=None):
    """Capture one fc2 call in a CUDA graph, replay it with new a and alpha copied in: each
    replay matches the reference (shared by the Triton and CuTe suites)."""
    a, w, alpha = gpu_inputs(M, N, E, I, FP8, seed_of(node_id))
    out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    densemoe.fc2(a, w, alpha, out=out, config=config)  # compile outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        densemoe.fc2(a, w, alpha, out=out, config=config)
    for i in range(3):
        a2, _, alpha2 = gpu_inputs(M, N, E, I, FP8, seed_of(node_id, i))
        a.copy_(a2)
        alpha.copy_(alpha2)
        out.fill_(float("nan"))
        g.replay()
        ref = fc2_ref(a, w, alpha, torch.float64)
        assert_close_to_torch(out.cpu(), ref.cpu(), torch_same_precision(a, w, alpha).to(torch.bfloat16).cpu())


def test_cuda_graph_replay_with_new_inputs(request):
    check_graph_replay(64, 1024, 32, 256, request.node.nodeid)


def test_device_mismatch_rejected():
    a, w, alpha = gpu_inputs(4, 64, 2, 32, torch.bfloat16, 0)
    with pytest.raises(ValueError, match=r"w is on cpu but a is on cuda"):
        densemoe.fc2(a, w.cpu(), alpha)
    with pytest.raises(ValueError, match=r"alpha is on cpu but a is on cuda"):
        densemoe.fc2(a, w, alpha.cpu())
    with pytest.raises(ValueError, match=r"out is on cpu but a is on cuda"):
        densemoe.fc2(a, w, alpha, out=torch.empty(4, 64, dtype=torch.bfloat16))
