"""How many wgmma the routed GEMMs keep in flight: compiles the routed FC2 (fp8 with y's group
scales, and bf16) and FC1 (fp8) for sm_90a with the installed Triton, no GPU needed, at the
H200-tuned tiles (16-row swapped tiles, FC2 256 x 128, 3 stages), and prints the `pendings` of
each `warp_group_dot_wait` in the TTGIR (0: each k-step waits for its MMA) and the shared memory
a program takes. The TTGIR's pendings are Triton's intent; what the SASS does is ptxas's: each
kernel's PTX also goes through the ptxas that Triton ships (the newest of its binaries), which
says where it had to insert a `warpgroup.wait` itself because a register the wgmma writes is read
before Triton's wait (info C7517), and how many registers a thread takes. FC1 is compiled at the
small-M tile and at the large-M tiles the H200 tuning picked (64 x 128, 4 warps, 2 stages) or
had in its space (128 x 128, 8 warps). Run: `python bench/probes/routed_mma_waits.py` (CPU; two
minutes)."""

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from densemoe.kernels.triton.routed import _fc1_kernel, _fc2_kernel

FP8 = "fp8e4nv"


def compile_(kernel, ptrs, const, warps=4, stages=3, divisible=("H", "I")):
    """``kernel`` compiled for sm_90a with the given pointer types and constexprs; the pointers,
    strides and the ``divisible`` integer arguments marked 16-divisible, as a launch on the model
    shapes specialises them (also ``fc1_loop_sass.py``'s)."""
    const = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}, **const}
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        sig[name] = ptrs.get(name) or ("constexpr" if name in const else "i32")
        if (name in ptrs and not ptrs[name].startswith("tensordesc")) or name.startswith("stride") \
                or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]  # what a launch on the model shapes specialises
    return triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def waits(k):
    return re.findall(r"warp_group_dot_wait[^{]*\{pendings = (\d+)", k.asm["ttgir"]), k.metadata.shared


def ptxas(k):
    """(waits ptxas inserted, registers a thread) from Triton's own ptxas on the kernel's PTX."""
    bins = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    exe = next((os.path.join(bins, b) for b in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bins, b))), None)
    if exe is None:
        return "no ptxas in Triton's wheel"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(k.asm["ptx"])
        f.flush()
        log = subprocess.run([exe, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True).stderr
    regs = re.findall(r"Used (\d+) registers", log)
    return f"ptxas inserted {log.count('C7517')} warpgroup.wait, {regs[-1] if regs else '?'} registers"


def main():
    for fp8 in (True, False):
        dt, bk = (FP8, 128) if fp8 else ("bf16", 64)
        k = compile_(_fc2_kernel, dict(y_ptr="*" + dt, ys_ptr="*fp32", w_ptr="*" + dt, w_desc=f"tensordesc<{dt}[256, {bk}]>",
                                       w2s_ptr="*fp32", ws_ptr="*fp32", sorted_ptr="*i32", offsets_ptr="*i32",
                                       tw_ptr="*fp32", out_ptr="*bf16"),
                     dict(HAS_YS=fp8, E_PAD=256, BLOCK_M=16, BLOCK_N=256, BLOCK_K=bk, SWAP_AB=True, NUM_STAGES=3,
                          ATOMIC=False, FLATTEN=False, USE_TMA=True, W_BLOCK=False, PDL=True))
        print(f"FC2 {dt}: pendings {waits(k)[0]}, shared memory {waits(k)[1]} B; {ptxas(k)}")
    for bm, swap, warps, stages in ((16, True, 4, 3), (64, False, 4, 2), (128, False, 8, 4)):
        k = compile_(_fc1_kernel, dict(x_ptr="*" + FP8, w_ptr="*" + FP8, w_desc=f"tensordesc<{FP8}[128, 128]>",
                                       alpha1_ptr="*fp32", xs_ptr="*fp32", ws_ptr="*fp32", sorted_ptr="*i32",
                                       offsets_ptr="*i32", y_ptr="*" + FP8, ys_ptr="*fp32"),
                     dict(HAS_XS=True, OUT_FP8=True, E_PAD=256, BLOCK_M=bm, BLOCK_I=128, BLOCK_K=128, SWAP_AB=swap,
                          NUM_STAGES=stages, FLATTEN=False, USE_TMA=True, W_BLOCK=False, PDL=True), warps=warps, stages=stages)
        print(f"FC1 {FP8} {bm} rows, {warps} warps, {stages} stages: pendings {waits(k)[0]}, shared memory {waits(k)[1]} B; "
              f"{ptxas(k)}")


if __name__ == "__main__":
    main()
