"""Triton's interpreter (``TRITON_INTERPRET=1``): densemoe's kernels on CPU tensors, with the
interpreter's numerics made to match the GPU's.

Triton's interpreter (3.9 and earlier) gets three conversions wrong that the GPU gets right,
which would make bf16 and fp8 results silently wrong on the CPU:

* ``tl.dot`` on bf16 operands multiplies their uint16 bit patterns as integers; the operands are
  widened to float32 here first (exact).
* the fp32 -> bf16 cast truncates the mantissa; the GPU rounds to nearest even, as here.
* the fp32 -> fp8 e4m3 conversion shifts the mantissa without rounding (and gets values below 1
  wrong); the GPU converts with ``cvt.rn.satfinite``; here torch converts (round to nearest even;
  the kernels clamp to +-448 first).

``import densemoe`` applies these fixes when the interpreter is on (``install``). The GPU compiles
the same kernel code untouched. If this Triton's interpreter does not have the internals the
fixes replace, ``install`` warns that bf16 / fp8 results may be wrong instead of failing silently.
"""

from __future__ import annotations

import warnings

from densemoe._runtime import interpreter_enabled

_FIXED = "_densemoe_fixed"


def install() -> bool:
    """Apply the fixes if the interpreter is on (once per process). Returns whether they are in."""
    if not interpreter_enabled():
        return False
    from triton.runtime import interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    names = ("create_dot", "cast_impl", "create_fp_to_fp")
    if builder is None or not all(hasattr(builder, n) for n in names):
        warnings.warn("densemoe: this Triton's interpreter lacks the functions densemoe corrects "
                      f"({', '.join(names)}); bf16 and fp8 results under TRITON_INTERPRET=1 may be wrong",
                      RuntimeWarning, stacklevel=2)
        return False
    if not getattr(builder, _FIXED, False):
        _patch(interp, builder)
        setattr(builder, _FIXED, True)
    return True


def _patch(interp, builder) -> None:
    import numpy as np
    import torch
    import triton.language as tl

    orig_dot = builder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            f32 = (h.data.astype(np.uint32) << 16).view(np.float32)
            return interp.TensorHandle(f32, tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    orig_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            f32 = np.ascontiguousarray(src.data).view(np.float32)
            bits = f32.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(f32)
            if nan.any():  # NaN stays NaN (quiet); overflow goes to inf, as on the GPU
                rounded[nan] = ((f32.view(np.uint32)[nan] >> 16) | 0x0040).astype(np.uint16)
            return interp.TensorHandle(rounded.reshape(np.shape(src.data)), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    orig_fp_to_fp = builder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            f32 = torch.from_numpy(np.ascontiguousarray(src.data).astype(np.float32))
            u8 = f32.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            return interp.TensorHandle(u8.reshape(np.shape(src.data)), tl.float8e4nv)
        return orig_fp_to_fp(self, src, dst_type, rounding_mode)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
