"""FP8 (e4m3) quantisation kernels for the fp8 layer: one pass over the data each.

Semantics (``densemoe.quant`` holds the torch twins)::

    # per token:  x [M, H] (bf16 / fp16 / fp32)  ->  x8 [M, H] fp8, sx [M] fp32
    for m:
        sx[m] = amax(|x[m, :]|) / 448          (1 where the row is all zero)
        x8[m, :] = clamp(x[m, :] / sx[m], +-448).to(fp8)

    # per (token, expert), FC2's alpha folded in:
    #   y [M, E*I] (bf16 / fp16 / fp32), alpha [M, E] fp32, w2_scale [E] fp32
    #   -> y8 [M, E*I] fp8, alpha2 [M, E] fp32
    for m, e:
        if alpha[m, e] == 0:                   # expert not picked: y is not read
            y8[m, e*I:(e+1)*I] = 0;  alpha2[m, e] = 0
        else:
            s = amax(|y[m, e*I:(e+1)*I]|) / 448   (1 where all zero)
            y8[m, e*I:(e+1)*I] = clamp(y[...] / s, +-448).to(fp8)
            alpha2[m, e] = alpha[m, e] * s * w2_scale[e]

    # per token and group of G columns (block-scaled fp8: DeepSeek-V3's 1 x 128 activations)
    #   x [M, H] (H a multiple of G)  ->  x8 [M, H] fp8, sx [M, H / G] fp32
    for m, g:
        sx[m, g] = amax(|x[m, g*G:(g+1)*G]|) / 448   (1 where the group is all zero)
        x8[m, g*G:(g+1)*G] = clamp(x[...] / sx[m, g], +-448).to(fp8)

Schedule: one program per (token, block of experts). A block none of whose experts the token
picked (most of them: top-8 of 256) only stores zeros. Otherwise a segment of I columns that
fits one block is loaded once and kept in registers, a longer one is read twice (amax, then
scale); the division is IEEE round-to-nearest (``div_rn``) so the bits match torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from densemoe.kernels.triton.fp8 import amax_abs, clamp_e4m3, e4m3_scale, max_nan
from densemoe.kernels.triton.pdl import launch_kwargs, pdl_enter

_MAX_BLOCK = 4096  # elements one program holds in registers per pass


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, H, stride_x, stride_q,
                       BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    quant_row(tl.program_id(0).to(tl.int64), x_ptr, q_ptr, s_ptr, H, stride_x, stride_q, BLOCK, ONE_PASS)


@triton.jit
def quant_row(m, x_ptr, q_ptr, s_ptr, H, stride_x, stride_q, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    """Row m of the per-token quantisation (module docstring); ``quant_rows_meta`` gives BLOCK,
    ONE_PASS and the warps for H. Also run by the routed schedule's launch
    (``routed.quant_schedule_launch``)."""
    offs = tl.arange(0, BLOCK)
    if ONE_PASS:
        ok = offs < H
        v = tl.load(x_ptr + m * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        amax = amax_abs(v, 0)
        s = e4m3_scale(amax)
        q = clamp_e4m3(tl.math.div_rn(v, s))
        tl.store(q_ptr + m * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=ok)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK):
            ok = h0 + offs < H
            v = tl.load(x_ptr + m * stride_x + h0 + offs, mask=ok, other=0.0).to(tl.float32)
            amax = max_nan(amax, tl.abs(v))
        a = amax_abs(amax, 0)
        s = e4m3_scale(a)
        for h0 in range(0, H, BLOCK):
            ok = h0 + offs < H
            v = tl.load(x_ptr + m * stride_x + h0 + offs, mask=ok, other=0.0).to(tl.float32)
            q = clamp_e4m3(tl.math.div_rn(v, s))
            tl.store(q_ptr + m * stride_q + h0 + offs, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + m, s)


@triton.jit
def _quant_y_kernel(y_ptr, alpha_ptr, ws_ptr, q_ptr, a2_ptr, E, I,
                    stride_ym, stride_am, stride_qm, stride_a2m,
                    BLOCK_E: tl.constexpr, BLOCK_I: tl.constexpr, ONE_PASS: tl.constexpr,
                    HAS_WS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    m = tl.program_id(0).to(tl.int64)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_i = tl.arange(0, BLOCK_I)
    e_ok = offs_e < E
    a = tl.load(alpha_ptr + m * stride_am + offs_e, mask=e_ok, other=0.0)
    live = e_ok & (a != 0.0)
    cols = offs_e.to(tl.int64)[:, None] * I + offs_i[None, :]
    if tl.sum(live.to(tl.int32), axis=0) == 0:  # no expert of the block picked (most blocks): zeros
        zero = tl.zeros((BLOCK_E, BLOCK_I), dtype=q_ptr.dtype.element_ty)
        for i0 in range(0, I, BLOCK_I):
            tl.store(q_ptr + m * stride_qm + cols + i0, zero, mask=e_ok[:, None] & (i0 + offs_i[None, :] < I))
        tl.store(a2_ptr + m * stride_a2m + offs_e, tl.zeros((BLOCK_E,), dtype=tl.float32), mask=e_ok)
    else:
        _quant_y_live(y_ptr, ws_ptr, q_ptr, a2_ptr, I, m, offs_e, offs_i, e_ok, a, live, cols,
                      stride_ym, stride_qm, stride_a2m, BLOCK_E, BLOCK_I, ONE_PASS, HAS_WS)


@triton.jit
def _quant_y_live(y_ptr, ws_ptr, q_ptr, a2_ptr, I, m, offs_e, offs_i, e_ok, a, live, cols,
                  stride_ym, stride_qm, stride_a2m,
                  BLOCK_E: tl.constexpr, BLOCK_I: tl.constexpr, ONE_PASS: tl.constexpr, HAS_WS: tl.constexpr):
    if ONE_PASS:
        ok = live[:, None] & (offs_i[None, :] < I)
        v = tl.load(y_ptr + m * stride_ym + cols, mask=ok, other=0.0).to(tl.float32)
        amax = amax_abs(v, 1)
        s = e4m3_scale(amax)
        q = clamp_e4m3(tl.math.div_rn(v, s[:, None]))
        tl.store(q_ptr + m * stride_qm + cols, q.to(q_ptr.dtype.element_ty),
                 mask=e_ok[:, None] & (offs_i[None, :] < I))
    else:
        amax = tl.zeros((BLOCK_E, BLOCK_I), dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            ok = live[:, None] & (i0 + offs_i[None, :] < I)
            v = tl.load(y_ptr + m * stride_ym + cols + i0, mask=ok, other=0.0).to(tl.float32)
            amax = max_nan(amax, tl.abs(v))
        am = amax_abs(amax, 1)
        s = e4m3_scale(am)
        for i0 in range(0, I, BLOCK_I):
            ok = live[:, None] & (i0 + offs_i[None, :] < I)
            v = tl.load(y_ptr + m * stride_ym + cols + i0, mask=ok, other=0.0).to(tl.float32)
            q = clamp_e4m3(tl.math.div_rn(v, s[:, None]))
            tl.store(q_ptr + m * stride_qm + cols + i0, q.to(q_ptr.dtype.element_ty),
                     mask=e_ok[:, None] & (i0 + offs_i[None, :] < I))
    a2 = a * s
    if HAS_WS:
        a2 = a2 * tl.load(ws_ptr + offs_e, mask=e_ok, other=0.0)
    tl.store(a2_ptr + m * stride_a2m + offs_e, tl.where(live, a2, 0.0), mask=e_ok)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


def quant_rows_meta(H: int) -> dict:
    """``quant_row``'s BLOCK and ONE_PASS and the launch's warps for rows of H elements."""
    block = min(_pow2_at_least(H), _MAX_BLOCK)
    return dict(BLOCK=block, ONE_PASS=H <= block, num_warps=4 if block <= 2048 else 8)


def quant_rows_triton(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
    """q [M, H] fp8, s [M] fp32 <- x [M, H] (unit stride along H; checked by the caller)."""
    M, H = x.shape
    if M == 0:
        return
    _quant_rows_kernel[(M,)](x, q, s, H, x.stride(0), q.stride(0), **quant_rows_meta(H), **launch_kwargs(x.device))


def quant_y_triton(y: torch.Tensor, alpha: torch.Tensor, w2_scale: torch.Tensor | None,
                   q: torch.Tensor, alpha2: torch.Tensor, *, elems: int = 2048, num_warps: int = 4) -> None:
    """q [M, E*I] fp8, alpha2 [M, E] fp32 <- y [M, E*I], alpha [M, E], w2_scale [E] (see the
    module docstring; unit strides along the last dimension, checked by the caller).
    ``elems``: elements per program and pass (a power of two); ``num_warps``: warps per program."""
    M, EI = y.shape
    E = alpha.shape[1]
    if M == 0 or E == 0:
        return
    I = EI // E
    block_i = min(_pow2_at_least(I), _MAX_BLOCK)
    block_e = max(1, min(_pow2_at_least(E), elems // block_i))
    grid = (M, triton.cdiv(E, block_e))
    _quant_y_kernel[grid](y, alpha, w2_scale if w2_scale is not None else alpha, q, alpha2, E, I,
                          y.stride(0), alpha.stride(0), q.stride(0), alpha2.stride(0),
                          BLOCK_E=block_e, BLOCK_I=block_i, ONE_PASS=I <= block_i,
                          HAS_WS=w2_scale is not None, num_warps=num_warps, **launch_kwargs(y.device))


@triton.jit
def _quant_groups_kernel(x_ptr, q_ptr, s_ptr, H, stride_x, stride_q, stride_s,
                         G: tl.constexpr, GROUPS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    quant_groups(tl.program_id(0).to(tl.int64), tl.program_id(1), x_ptr, q_ptr, s_ptr, H, stride_x, stride_q,
                 stride_s, G, GROUPS)


@triton.jit
def quant_groups(m, b, x_ptr, q_ptr, s_ptr, H, stride_x, stride_q, stride_s, G: tl.constexpr, GROUPS: tl.constexpr):
    """Part b of row m: the row's groups b*GROUPS .. b*GROUPS + GROUPS - 1, each G columns
    (``quant_groups_meta`` gives GROUPS and the parts a row has). Also run by the routed
    schedule's launch (``routed.quant_schedule_launch``)."""
    g = b * GROUPS + tl.arange(0, GROUPS)
    cols = g[:, None] * G + tl.arange(0, G)[None, :]
    ok = cols < H
    v = tl.load(x_ptr + m * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    amax = amax_abs(v, 1)
    sc = e4m3_scale(amax)
    q = clamp_e4m3(tl.math.div_rn(v, sc[:, None]))
    tl.store(q_ptr + m * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + m * stride_s + g, sc, mask=g * G < H)


def quant_groups_triton(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, group: int) -> None:
    """q [M, H] fp8, s [M, H / group] fp32 <- x [M, H] (unit stride along H, H % group == 0)."""
    M, H = x.shape
    if M == 0:
        return
    meta = quant_groups_meta(H, group)
    _quant_groups_kernel[(M, meta.pop("parts"))](x, q, s, H, x.stride(0), q.stride(0), s.stride(0), **meta,
                                                 **launch_kwargs(x.device))


def quant_groups_meta(H: int, group: int) -> dict:
    """``quant_groups``' G and GROUPS, the parts a row of H elements takes, and the launch's warps."""
    n_groups = H // group
    per_prog = max(1, min(_pow2_at_least(n_groups), 2048 // group))
    return dict(G=group, GROUPS=per_prog, parts=triton.cdiv(n_groups, per_prog), num_warps=4)
