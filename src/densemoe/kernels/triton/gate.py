"""The router's gate GEMV for small M, with the per-token fp8 quantisation of x fused in.

Semantics (``densemoe.reference.router_logits_ref`` is the torch twin)::

    # x [M, H] bf16 / fp16 / fp32, weight [E, H] bf16 / fp16 / fp32 (unit stride along H)
    w = weight.to(x.dtype) if CAST_W else weight      # F.linear(x, weight.to(x.dtype)): CAST_W
    for m, e:
        logits[m, e] = out_dtype(sum_h float32(x[m, h]) * float32(w[e, h]))        # fp32 accumulate
    if QUANT:   # exactly densemoe.quant.quantize_per_token(x)
        for m:
            sx[m] = amax(|x[m, :]|) / 448          (1 where the row is all zero)
            x8[m, :] = clamp(x[m, :] / sx[m], +-448).to(fp8)

Schedule: one program per expert: it loads the expert's gate row whole (H <= 8192: one round
trip to HBM, the latency being what costs at small M) and dots it with each token row (M is
small; the rows come from L2). Every program holds whole token rows, so each knows every row's
amax; program p quantises slice p of each row (``quant_slice`` elements, reloaded from L1/L2), so
the divisions are spread over the grid instead of waiting on one program. One launch instead of
cuBLAS's split-K GEMV, its reduction and the quantisation kernel. Each token row costs a
block-wide reduction, so above a few tokens cuBLAS's GEMM is faster: ``MAX_M = 4``. A gate row
is loaded whole rather than in steps over H (a round trip per step). The measurements:
``docs/skipping.md``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from densemoe.kernels.triton.fp8 import amax_abs, clamp_e4m3, e4m3_scale, max_nan
from densemoe.kernels.triton.pdl import launch_kwargs, pdl_enter

MAX_M = 4  # token rows the kernel takes (one gate row, M token rows); above, cuBLAS's GEMM


@triton.jit
def _gate_kernel(x_ptr, g_ptr, out_ptr, q_ptr, s_ptr, M, E, H,
                 stride_xm, stride_ge, stride_om, stride_qm,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, QUANT: tl.constexpr, ONE_PASS: tl.constexpr,
                 SLICE: tl.constexpr = 16, CAST_W: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    e = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):  # one step when ONE_PASS (H <= BLOCK_K): one round trip to HBM
        kk = k0 + offs_k
        k_ok = kk < H
        g = tl.load(g_ptr + e.to(tl.int64) * stride_ge + kk, mask=k_ok, other=0.0)
        if CAST_W:  # the weight rounded to x's dtype first, as F.linear(x, weight.to(x.dtype))
            g = g.to(x_ptr.dtype.element_ty)
        g = g.to(tl.float32)
        for m in tl.static_range(BLOCK_M):  # the token rows (L2), each dotted with the gate row
            row_ok = tl.full((BLOCK_K,), m, tl.int32) < M
            xv = tl.load(x_ptr + m * stride_xm + kk, mask=k_ok & row_ok, other=0.0).to(tl.float32)
            acc = tl.where(offs_m == m, acc + tl.sum(xv * g, axis=0), acc)
            if QUANT:
                a_m = amax_abs(xv, 0)
                amax = tl.where(offs_m == m, max_nan(amax, a_m), amax)
                if ONE_PASS:  # every program has the row's amax: each quantises its own slice of it
                    if m < M:
                        sm = e4m3_scale(a_m)  # as densemoe.kernels.triton.quant
                        ss = e * SLICE + tl.arange(0, SLICE)
                        s_ok = ss < H
                        xs = tl.load(x_ptr + m * stride_xm + ss, mask=s_ok, other=0.0).to(tl.float32)
                        qv = clamp_e4m3(tl.math.div_rn(xs, sm))
                        tl.store(q_ptr + m * stride_qm + ss, qv.to(q_ptr.dtype.element_ty), mask=s_ok)
                        if e == 0:
                            tl.store(s_ptr + m, sm)
    tl.store(out_ptr + offs_m * stride_om + e, acc.to(out_ptr.dtype.element_ty), mask=offs_m < M)
    if QUANT and not ONE_PASS:  # H > BLOCK_K: a second pass over this program's rows (L2)
        s = e4m3_scale(amax)
        for m in range(e, M, nprog):
            sm = tl.sum(tl.where(offs_m == m, s, 0.0), axis=0)  # exact: one term
            for k0 in range(0, H, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < H
                xv = tl.load(x_ptr + m * stride_xm + kk, mask=k_ok, other=0.0).to(tl.float32)
                qv = clamp_e4m3(tl.math.div_rn(xv, sm))
                tl.store(q_ptr + m * stride_qm + kk, qv.to(q_ptr.dtype.element_ty), mask=k_ok)
            tl.store(s_ptr + m, sm)


MAX_BLOCK_K = 8192  # elements of a row a program holds (8 warps: 32 fp32 registers a thread)


def gate_blocks(m: int, h: int) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_K, ONE_PASS): every token row and, up to 8192 elements, the whole of H
    in one step."""
    bk = min(triton.next_power_of_2(max(h, 1)), MAX_BLOCK_K)
    return triton.next_power_of_2(max(m, 1)), bk, h <= bk


def quant_slice(h: int, e: int) -> int:
    """Elements of each token row that one of the ``e`` programs quantises (ONE_PASS): a power of
    two >= 16 with e slices covering h."""
    return max(16, triton.next_power_of_2(triton.cdiv(h, max(e, 1))))


def gate_triton(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                q: torch.Tensor | None = None, s: torch.Tensor | None = None, *, cast_weight: bool = False) -> None:
    """out [M, E] <- x [M, H] @ w [E, H]^T with w = weight.to(x.dtype) if ``cast_weight`` else
    weight (products and sums in float32), and (q [M, H] fp8, s [M] f32) <- x's per-token
    quantisation when given. Unit strides along H and E, M <= MAX_M: checked by the caller."""
    M, H = x.shape
    E = weight.shape[0]
    if M == 0 or E == 0:
        return
    bm, bk, one = gate_blocks(M, H)
    quant = q is not None
    _gate_kernel[(E,)](
        x, weight, out, q if quant else out, s if quant else out, M, E, H,
        x.stride(0), weight.stride(0), out.stride(0), q.stride(0) if quant else 0,
        BLOCK_M=bm, BLOCK_K=bk, QUANT=quant, ONE_PASS=one, SLICE=quant_slice(H, E), CAST_W=cast_weight and weight.dtype != x.dtype,
        num_warps=8 if bk >= 4096 else 4,
        **launch_kwargs(x.device))
