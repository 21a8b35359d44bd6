"""Test set-up.

Without a GPU the kernels run on the CPU through Triton's interpreter, which must be switched on
before any @triton.jit function is defined, hence here, before densemoe is imported. GPU tests
(marker ``gpu``) run in a separate process without the interpreter (see README).
"""

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# CuTe DSL reads these when it is imported: without a GPU, compile for Hopper (sm_90a); keep the
# PTX of every compile in a scratch directory so the compile tests can inspect it.
if not torch.cuda.is_available():
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
os.environ.setdefault("CUTE_DSL_KEEP", "ptx,ir")
os.environ.setdefault("CUTE_DSL_DUMP_DIR", tempfile.mkdtemp(prefix="densemoe_cute_"))

# Hermetic tuning lookups: an empty cache of our own, never the developer's ~/.cache/densemoe
# (tests that need entries write them into their own directory).
os.environ["DENSEMOE_CACHE_DIR"] = tempfile.mkdtemp(prefix="densemoe_cache_")
atexit.register(shutil.rmtree, os.environ["DENSEMOE_CACHE_DIR"], True)


def _patch_interpreter_bf16_dot():
    """Triton's interpreter (3.9 and earlier) stores bf16 as uint16 and multiplies the bit patterns
    as integers in tl.dot. Widen bf16 operands to float32 (exact) before its matmul; fp8 and
    other dtypes go through unchanged. Also make its fp32 -> bf16 cast round to nearest even
    (it truncates). The GPU compiles the same kernel code untouched."""
    from triton.runtime import interpreter as interp
    import triton.language as tl

    builder_cls = interp.InterpreterBuilder
    if getattr(builder_cls, "_densemoe_bf16_fix", False):
        return
    orig = builder_cls.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            f32 = (h.data.astype(np.uint32) << 16).view(np.float32)
            return interp.TensorHandle(f32, tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot

    # The interpreter's fp32 -> bf16 cast (``x.to(tl.bfloat16)``, create_fp_trunc -> cast_impl)
    # passes no rounding mode and so truncates the mantissa; the GPU rounds to nearest even.
    # Round to nearest even here (NaN stays NaN, overflow goes to inf as on the GPU).
    orig_cast = builder_cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            f32 = np.ascontiguousarray(src.data).view(np.float32)
            bits = f32.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(f32)
            if nan.any():
                rounded[nan] = ((f32.view(np.uint32)[nan] >> 16) | 0x0040).astype(np.uint16)
            return interp.TensorHandle(rounded.reshape(np.shape(src.data)), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    builder_cls.cast_impl = cast_impl

    # The interpreter's fp32 -> fp8 e4m3 conversion (create_fp_to_fp -> _convert_float) shifts
    # the mantissa without rounding and gets values below 1 wrong (e.g. -0.4947 -> -0.25);
    # the GPU converts with cvt.rn.satfinite (round to nearest even). Convert through torch,
    # which rounds to nearest even; callers clamp to +-448 first (satfinite).
    orig_fp_to_fp = builder_cls.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            f32 = torch.from_numpy(np.ascontiguousarray(src.data).astype(np.float32))
            u8 = f32.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            return interp.TensorHandle(u8.reshape(np.shape(src.data)), tl.float8e4nv)
        return orig_fp_to_fp(self, src, dst_type, rounding_mode)

    builder_cls.create_fp_to_fp = create_fp_to_fp
    builder_cls._densemoe_bf16_fix = True


if INTERPRET:
    _patch_interpreter_bf16_dot()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter: runs the Triton kernels on the CPU (needs TRITON_INTERPRET=1)")


def pytest_collection_modifyitems(config, items):
    """GPU tests need CUDA and no interpreter; CPU-kernel tests need the interpreter."""
    has_gpu = torch.cuda.is_available() and not INTERPRET
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU and TRITON_INTERPRET unset"))
        if "interpreter" in item.keywords and not INTERPRET:
            item.add_marker(pytest.mark.skip(reason="runs the kernels on the CPU: set TRITON_INTERPRET=1"))
