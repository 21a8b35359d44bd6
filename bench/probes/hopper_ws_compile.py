"""Does Triton's Hopper warp specialisation (``tl.range(..., warp_specialize=True)``, the
``nvgpu-warp-specialization`` pass on sm_90) fire? Compiles for sm_90a without a GPU and reports,
per kernel, whether the TTGIR holds a ``ttg.warp_specialize`` op with its partitions (the loop's
``tt.warp_specialize`` attribute alone is only the request) (eighth session, docs/routed-journal.md):

- a minimal TMA-descriptor GEMM loop (fp16 and fp8; one and two dots a k-step, as FC1's gate and
  up; alone and inside a persistent loop), at 4 and 8 warps;
- with ``--routed``, the routed FC1 (``kernels.triton.routed._fc1_kernel``) on the sorted copy
  of x (``X_SORTED``, from ``patches/issue19-fc1-sorted-x.mbox.gz``: every load of its k-loop a
  descriptor load), its k-loop asked to warp-specialise (``WS_K=1`` in the environment of a tree
  where the patch's loop passes ``warp_specialize``; without it the report says so).

    python bench/probes/hopper_ws_compile.py [--routed]          (CPU; the installed Triton)

Run 2026-12-05 (Triton 3.9.0 on this CPU machine): at 4 warps the pass fails ("PassManager::run
failed": a descriptor block of 8192 elements against a tensor of 4096), at 8 warps it leaves every
loop as it was. With Triton 3.6.0 (the device's version, in a virtual environment here; ninth
session) the minimal loops are warp-specialised at 4 warps, every form, and left as they were at
8; what the specialised loop does with fp8's per-k-tile promotion is in ``fc1_loop_sass.py``
(``--forms --ws``: it waits after every wgmma).
"""

from __future__ import annotations

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def _mm(a_desc, b_desc, c_ptr, M, N, K, NP, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        TWO: tl.constexpr, OUTER: tl.constexpr):
    n_units = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for u in tl.range(tl.program_id(0), n_units if OUTER else tl.program_id(0) + 1, NP):
        pid_m = u // tl.cdiv(N, BN)
        pid_n = u % tl.cdiv(N, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc2 = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(0, K, BK, warp_specialize=True):
            a = a_desc.load([pid_m * BM, k])
            b = b_desc.load([pid_n * BN, k])
            acc = tl.dot(a, b.T, acc)
            if TWO:
                acc2 = tl.dot(a, b_desc.load([pid_n * BN + N, k]).T, acc2)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], (acc + acc2).to(tl.bfloat16))


def _report(name, compile_fn):
    try:
        k = compile_fn()
        print(f"{name}: {'warp-specialised' if 'ttg.warp_specialize' in k.asm['ttgir'] else 'not warp-specialised'}")
    except Exception as exc:  # noqa: BLE001 - a pass that fails is a finding
        print(f"{name}: compile failed ({str(exc).splitlines()[0][:120]})")


def minimal():
    target = GPUTarget("cuda", 90, 32)
    for dt in ("fp16", "fp8e4nv"):
        for warps in (4, 8):
            for two, outer in ((False, False), (True, False), (True, True)):
                sig = dict(a_desc=f"tensordesc<{dt}[128, 64]>", b_desc=f"tensordesc<{dt}[128, 64]>", c_ptr="*bf16",
                           M="i32", N="i32", K="i32", NP="i32", BM="constexpr", BN="constexpr", BK="constexpr",
                           TWO="constexpr", OUTER="constexpr")
                const = dict(BM=128, BN=128, BK=64, TWO=two, OUTER=outer)
                _report(f"minimal {dt} {warps} warps{' two dots' if two else ''}{' persistent' if outer else ''}",
                        lambda sig=sig, const=const, warps=warps: triton.compile(
                            ASTSource(_mm, sig, const), target=target, options=dict(num_warps=warps, num_stages=3)))


def routed():
    from densemoe.kernels.triton.routed import _fc1_kernel

    names = [p.name for p in _fc1_kernel.params]
    if "X_SORTED" not in names:
        print("routed FC1: this tree has no fc1_sorted_x (apply patches/issue19-fc1-sorted-x.mbox.gz)")
        return
    fp8 = "fp8e4nv"
    ptrs = dict(x_ptr="*" + fp8, w_ptr="*" + fp8, w_desc=f"tensordesc<{fp8}[128, 128]>",
                x_desc=f"tensordesc<{fp8}[128, 128]>", alpha1_ptr="*fp32", xs_ptr="*fp32", ws_ptr="*fp32",
                sorted_ptr="*i32", offsets_ptr="*i32", y_ptr="*" + fp8, ys_ptr="*fp32")
    const = dict(HAS_XS=True, OUT_FP8=True, E_PAD=128, BLOCK_M=128, BLOCK_I=128, BLOCK_K=128, SWAP_AB=False,
                 NUM_STAGES=3, USE_TMA=True, X_SORTED=True)
    const = {**{p.name: p.default for p in _fc1_kernel.params if p.is_constexpr and p.has_default}, **const}
    sig = {n: ptrs.get(n, "constexpr" if n in const else "i32") for n in _fc1_kernel.arg_names}
    _report("routed FC1, sorted x, 8 warps", lambda: triton.compile(
        ASTSource(_fc1_kernel, sig, const), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3)))


if __name__ == "__main__":
    print(f"# triton {triton.__version__}, sm_90a, compile only", flush=True)
    minimal()
    if "--routed" in sys.argv:
        routed()
