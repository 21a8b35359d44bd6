"""The fp8 (e4m3) quantisation steps every Triton kernel of the layer shares, NaN kept:

    amax_abs(v, axis)  = max |v| along axis, NaN if any element is NaN
    e4m3_scale(amax)   = amax / 448; 1 where amax == 0; NaN where amax is NaN
    clamp_e4m3(v)      = min(max(v, -448), 448), NaN kept

``tl.max``, ``tl.maximum`` and ``tl.minimum`` drop a NaN operand by default (PTX max/min), so a
NaN in one token's x (or in one (token, expert) segment of y) used to come out finite: scaled by
the other elements' amax and clamped to +-448, while torch's fp8 pipeline (``amax`` and
``torch.clamp`` keep NaN) returns NaN for that row (issue 21). With a NaN scale the epilogue
that applies it makes the row NaN whatever the MMA does with an fp8 NaN (Triton's interpreter
reads e4m3 0x7F as 480, Hopper as NaN). ``densemoe.quant``'s torch twins do the same.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def amax_abs(v, axis: tl.constexpr):
    return tl.reduce(tl.abs(v), axis, max_nan)


@triton.jit
def e4m3_scale(amax):
    return tl.where(amax > 0, amax / 448.0, tl.where(amax == amax, 1.0, amax))


@triton.jit
def clamp_e4m3(v):
    v = tl.maximum(v, -448.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(v, 448.0, propagate_nan=tl.PropagateNan.ALL)
