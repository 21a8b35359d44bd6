"""The Triton kernels compile for Hopper (sm_90a) on a machine without a GPU.

The interpreter runs the kernels' Python semantics; it does not run Triton's compiler, which is
where type and layout errors show (a loop-carried value that changes type, a layout the
pipeliner cannot take). This compiles the FC1 and FC2 kernels, dense and with expert skipping,
to a cubin for sm_90 with the installed Triton (ptxas ships with it), in a subprocess without
TRITON_INTERPRET."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r'''
    import re
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from densemoe.kernels.triton.fc1 import _fc1_kernel, _fc1_persistent_kernel
    from densemoe.kernels.triton.fc2 import _fc2_kernel
    from densemoe.kernels.triton.gate import _gate_kernel

    FP8 = "fp8e4nv"

    def compile_(kernel, ptrs, descs, const, warps=4, stages=4, mma=True):
        # constexprs not given take their defaults, as at a launch
        const = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}, **const}
        sig = {}
        for name in kernel.arg_names:
            if name in ptrs:
                sig[name] = ptrs[name]
            elif name in descs:
                sig[name] = descs[name]
            elif name in const:
                sig[name] = "constexpr"
            else:
                sig[name] = "i32"
        k = triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=stages))
        assert not mma or "wgmma" in k.asm["ptx"] or "mma" in k.asm["ptx"]
        # fp8: no dot that carries an accumulator is left to Hopper's reduced-precision
        # accumulation over the k-loop (kernels/triton/gate_up.py); one from zero (%cst) is one k-tile's
        assert not re.findall(r"warp_group_dot \S+, \S+, %(?!cst)\S+ {[^}]*maxNumImpreciseAcc = 1073741824",
                              k.asm["ttgir"]), kernel
        return k

    fc1_ptrs = dict(x_ptr="*" + FP8, w_ptr="*" + FP8, alpha1_ptr="*fp32", xs_ptr="*fp32", post_ptr="*fp32",
                    route_ptr="*fp32", y_ptr="*bf16", oscale_ptr="*fp32", ys_ptr="*fp32", sel_ptr="*fp32",
                    lists_ptr="*i32", counts_ptr="*i32", ws_ptr="*fp32", cnt_ptr="*i32", xg_ptr="*fp32", wb_ptr="*fp32")
    flags = dict(HAS_XS=True, HAS_POST=False, HAS_ROUTE=True, OUT_FP8=False, DYN_SCALE=False, USE_TMA=True)
    n = 0
    for bm, bi, swap in ((16, 64, True), (128, 64, True), (128, 128, False)):
        descs = dict(x_desc=f"tensordesc<{FP8}[{bm}, 256]>", w_desc=f"tensordesc<{FP8}[{bi}, 256]>")
        c = dict(flags, BLOCK_M=bm, BLOCK_I=bi, BLOCK_K=256, SWAP_AB=swap, NUM_STAGES=3)
        compile_(_fc1_kernel, fc1_ptrs, descs, c, warps=8 if bi == 128 else 4, stages=3)
        n += 1
    for bm, bi, swap, skip, one, sk in ((16, 64, True, True, True, 1), (16, 32, False, True, True, 1),
                                        (32, 64, True, True, False, 1), (128, 128, False, False, False, 1),
                                        (16, 64, True, True, True, 4)):
        descs = dict(x_desc=f"tensordesc<{FP8}[{bm}, 256]>", w_desc=f"tensordesc<{FP8}[{bi}, 256]>")
        c = dict(flags, BLOCK_M=bm, BLOCK_I=bi, BLOCK_K=256, SWAP_AB=swap, SKIP=skip, NUM_STAGES=3,
                 BLOCK_E=256, LIST_ROWS=16, FILL=True, ONE_TILE=one, LISTS_GIVEN=False, SPREAD=skip, SPLIT_K=sk)
        compile_(_fc1_persistent_kernel, fc1_ptrs, descs, c, warps=8 if bi == 128 else 4, stages=3)
        n += 1
    fc2_ptrs = dict(a_ptr="*" + FP8, w_ptr="*" + FP8, alpha_ptr="*fp32", out_ptr="*bf16", ws_ptr="*fp32",
                    cnt_ptr="*i32", lists_ptr="*i32", counts_ptr="*i32", wblk_ptr="*fp32")
    for bm, bn, swap, skip in ((16, 64, True, True), (64, 128, False, True), (16, 64, True, False)):
        descs = dict(a_desc=f"tensordesc<{FP8}[{bm}, 256]>", w_desc=f"tensordesc<{FP8}[{bn}, 256]>")
        c = dict(I=256, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=256, SWAP_AB=swap, USE_TMA=True, NUM_STAGES=4, SKIP=skip,
                 BLOCK_E=256, LIST_ROWS=16)
        compile_(_fc2_kernel, fc2_ptrs, descs, c)
        n += 1
    for bm, bk, quant, one in ((1, 8192, True, True), (16, 8192, True, True), (4, 1024, True, False)):
        gate_ptrs = dict(x_ptr="*bf16", g_ptr="*bf16", out_ptr="*bf16", q_ptr="*" + FP8, s_ptr="*fp32")
        compile_(_gate_kernel, gate_ptrs, {}, dict(BLOCK_M=bm, BLOCK_K=bk, QUANT=quant, ONE_PASS=one), warps=8,
                 mma=False)
        n += 1
    # programmatic dependent launch (kernels.triton.pdl): the griddepcontrol instructions are there
    descs = dict(x_desc=f"tensordesc<{FP8}[16, 256]>", w_desc=f"tensordesc<{FP8}[64, 256]>")
    c = dict(flags, BLOCK_M=16, BLOCK_I=64, BLOCK_K=256, SWAP_AB=True, SKIP=True, NUM_STAGES=4,
             BLOCK_E=256, LIST_ROWS=16, FILL=False, ONE_TILE=True, LISTS_GIVEN=False, PDL=True)
    k = compile_(_fc1_persistent_kernel, fc1_ptrs, descs, c, stages=4)
    assert "griddepcontrol.wait" in k.asm["ptx"] and "griddepcontrol.launch_dependents" in k.asm["ptx"]
    n += 1
    # 128 x 128 block-scaled weights (issue 20): FC1 persistent with skipping and split-k, FC2 split
    descs = dict(x_desc=f"tensordesc<{FP8}[16, 128]>", w_desc=f"tensordesc<{FP8}[64, 128]>")
    c = dict(flags, HAS_XS=False, BLOCK_M=16, BLOCK_I=64, BLOCK_K=128, SWAP_AB=True, SKIP=True, NUM_STAGES=3,
             BLOCK_E=256, LIST_ROWS=16, FILL=False, ONE_TILE=False, LISTS_GIVEN=False, SPLIT_K=2, W_BLOCK=True)
    compile_(_fc1_persistent_kernel, fc1_ptrs, descs, c, stages=3)
    descs = dict(a_desc=f"tensordesc<{FP8}[16, 128]>", w_desc=f"tensordesc<{FP8}[64, 128]>")
    c = dict(I=256, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SWAP_AB=True, USE_TMA=True, NUM_STAGES=4, SKIP=True,
             BLOCK_E=256, LIST_ROWS=16, W_BLOCK=True)
    compile_(_fc2_kernel, fc2_ptrs, descs, c)
    n += 2
    print("compiled", n)
''')


def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "compiled 17" in r.stdout, r.stdout + r.stderr[-2000:]
