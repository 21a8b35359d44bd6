"""The routed kernels compile for Hopper (sm_90a) without a GPU, with the installed Triton, and
their main loops are what the design needs: wgmma for the GEMMs, and cp.async loads (the
k-loop pipelined) once the launch specialises pointers and strides as 16-divisible, as a real
launch on these shapes does. Without that specialisation Triton loads fp8 a byte at a time and
does not pipeline (a finding of this test: docs/routed.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r'''
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from densemoe.kernels.triton.routed import (_combine_kernel, _count_kernel, _fc1_kernel, _fc2_kernel,
                                                _place_kernel, _quant_schedule_kernel, _sort_schedule_kernel)

    FP8 = "fp8e4nv"

    def compile_(kernel, ptrs, const, warps=4, stages=3, gemm=True, gathered=True):
        const = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}, **const}
        sig, attrs = {}, {}
        for i, name in enumerate(kernel.arg_names):
            if name in ptrs:
                sig[name] = ptrs[name]
            elif name in const:
                sig[name] = "constexpr"
            else:
                sig[name] = "i32"
            if ((name in ptrs and not ptrs[name].startswith("tensordesc")) or name.startswith("stride")
                    or name in ("H", "I")):
                attrs[(i,)] = [["tt.divisibility", 16]]  # what a launch on the model shapes specialises
        k = triton.compile(ASTSource(kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=stages))
        ptx = k.asm["ptx"]
        if gemm:
            assert "wgmma" in ptx, kernel
            # the gathered rows, pipelined (a sorted copy of x through TMA: none)
            assert bool(re.search(r"cp\.async\.c[ag]", ptx)) == gathered, (kernel, const)
            if const.get("USE_TMA"):
                assert "cp.async.bulk.tensor" in ptx, (kernel, const)
            # fp8: no dot that carries an accumulator is left to Hopper's reduced-precision
            # accumulation over the k-loop (gate_up.py); a dot from zero (%cst) is one k-tile's
            assert not re.findall(r"warp_group_dot \S+, \S+, %(?!cst)\S+ {[^}]*maxNumImpreciseAcc = 1073741824",
                                  k.asm["ttgir"]), (kernel, const)
        return k

    n = 0
    for p_pad in (16, 1024):
        compile_(_sort_schedule_kernel, dict(ids_ptr="*i64", sorted_ptr="*i32", offsets_ptr="*i32"),
                 dict(P_PAD=p_pad, BINS=512), gemm=False)
    compile_(_combine_kernel, dict(rows_ptr="*bf16", ids_ptr="*i64", out_ptr="*bf16"), dict(TOP_K=8, BLOCK_N=1024),
             gemm=False)
    compile_(_count_kernel, dict(ids_ptr="*i64", counts_ptr="*i32"), dict(CHUNK=1024, BINS=512), gemm=False)
    k = compile_(_place_kernel, dict(ids_ptr="*i64", counts_ptr="*i32", cursor_ptr="*i32", sorted_ptr="*i32",
                                     offsets_ptr="*i32"), dict(CHUNK=1024, BINS=512), gemm=False)
    assert "atom" in k.asm["ptx"]
    for sort, block, one_pass, warps, g in ((True, 2048, True, 4, 0), (True, 4096, False, 8, 0),
                                            (False, 4096, False, 8, 0), (True, 16, True, 4, 128),
                                            (False, 16, True, 4, 128)):  # Qwen3's H, TP8's; 1 x 128 groups
        compile_(_quant_schedule_kernel, dict(x_ptr="*bf16", q_ptr="*" + FP8, s_ptr="*fp32", ids_ptr="*i64",
                                              sorted_ptr="*i32", offsets_ptr="*i32", counts_ptr="*i32"),
                 dict(SORT=sort, P_PAD=1024 if sort else 16, CHUNK=1024, BINS=512, BLOCK=block, ONE_PASS=one_pass,
                      G=g, GROUPS=16), warps=warps, gemm=False)
    n += 9
    for dt, swap, flat, atomic, tma in ((FP8, False, False, False, True), (FP8, True, False, True, True),
                                        (FP8, False, True, True, False), ("bf16", True, True, False, True),
                                        ("bf16", False, False, True, False), (FP8, True, True, False, True)):
        bm = 16 if swap else 64
        bk = 128 if dt == FP8 else 64
        w1 = f"tensordesc<{dt}[128, {bk}]>" if tma else "*" + dt
        blk = dt == FP8 and swap and tma  # block-scaled weights (128 x 128 scales, x in 1 x 128 groups)
        compile_(_fc1_kernel, dict(x_ptr="*" + dt, w_ptr="*" + dt, w_desc=w1, alpha1_ptr="*fp32", xs_ptr="*fp32",
                                   ws_ptr="*fp32",
                                   sorted_ptr="*i32", offsets_ptr="*i32", y_ptr="*" + (FP8 if dt == FP8 else "bf16"),
                                   ys_ptr="*fp32"),
                 dict(HAS_XS=dt == FP8, OUT_FP8=dt == FP8, E_PAD=256, BLOCK_M=bm, BLOCK_I=128, BLOCK_K=bk,
                      SWAP_AB=swap, NUM_STAGES=3, FLATTEN=flat, USE_TMA=tma, W_BLOCK=blk, PDL=True))
        compile_(_fc2_kernel, dict(y_ptr="*" + dt, ys_ptr="*fp32", w_ptr="*" + dt, w_desc=w1, w2s_ptr="*fp32",
                                   ws_ptr="*fp32",
                                   sorted_ptr="*i32", offsets_ptr="*i32", tw_ptr="*fp32",
                                   out_ptr="*fp32" if atomic else "*bf16"),
                 dict(HAS_YS=dt == FP8, E_PAD=256, BLOCK_M=bm, BLOCK_N=128, BLOCK_K=bk, SWAP_AB=swap, NUM_STAGES=3,
                      ATOMIC=atomic, FLATTEN=flat, USE_TMA=tma, W_BLOCK=blk, PDL=True))
        n += 2
    for swap in (True, False):  # block-scaled FC2 tiles over two row blocks of w2: a weight scale per column
        compile_(_fc2_kernel, dict(y_ptr="*" + FP8, ys_ptr="*fp32", w_ptr="*" + FP8,
                                   w_desc=f"tensordesc<{FP8}[256, 128]>", w2s_ptr="*fp32", ws_ptr="*fp32",
                                   sorted_ptr="*i32", offsets_ptr="*i32", tw_ptr="*fp32", out_ptr="*bf16"),
                 dict(HAS_YS=True, E_PAD=256, BLOCK_M=16 if swap else 64, BLOCK_N=256, BLOCK_K=128, SWAP_AB=swap,
                      NUM_STAGES=3, USE_TMA=True, W_BLOCK=True, PDL=True))
        n += 1
    for swap, cm in ((True, False), (False, True)):  # FC2 with the combine fused (acq_rel counters, rows read back)
        k = compile_(_fc2_kernel, dict(y_ptr="*" + FP8, ys_ptr="*fp32", w_ptr="*" + FP8,
                                       w_desc=f"tensordesc<{FP8}[256, 128]>", w2s_ptr="*fp32", ws_ptr="*fp32",
                                       sorted_ptr="*i32", offsets_ptr="*i32", tw_ptr="*fp32", out_ptr="*bf16",
                                       ids_ptr="*i64", cnt_ptr="*i32", fin_ptr="*bf16"),
                     dict(HAS_YS=True, E_PAD=256, BLOCK_M=16 if swap else 64, BLOCK_N=256, BLOCK_K=128, SWAP_AB=swap,
                          NUM_STAGES=3, USE_TMA=True, FUSED=True, K_PAD=8, COL_MAJOR=cm, PDL=True))
        ptx = k.asm["ptx"]  # the counter is acq_rel at GPU scope, the rows read back past L1, after a barrier
        assert re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx) and "ld.global.cg" in ptx and "bar.sync" in ptx
        n += 1
    # FC2's column stream (fc2_col_groups): the loop over column tiles is the pipelined one, each
    # of its I_STEPS k-steps with its own ring of NUM_STAGES weight tiles
    for dt, swap, atomic, steps in ((FP8, True, False, 2), (FP8, False, True, 2), ("bf16", True, False, 4),
                                    (FP8, True, False, 6)):
        bm, bk = (16 if swap else 64), (128 if dt == FP8 else 64)
        k = compile_(_fc2_kernel, dict(y_ptr="*" + dt, ys_ptr="*fp32", w_ptr="*" + dt,
                                       w_desc=f"tensordesc<{dt}[128, {bk}]>", w2s_ptr="*fp32", ws_ptr="*fp32",
                                       sorted_ptr="*i32", offsets_ptr="*i32", tw_ptr="*fp32",
                                       out_ptr="*fp32" if atomic else "*bf16"),
                     dict(HAS_YS=dt == FP8, E_PAD=256, BLOCK_M=bm, BLOCK_N=128, BLOCK_K=bk, SWAP_AB=swap,
                          NUM_STAGES=3, ATOMIC=atomic, USE_TMA=True, I_STEPS=steps, PDL=True))
        rings = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<3x128x%dx" % bk, k.asm["ttgir"])
        assert len(rings) == steps, (dt, swap, atomic, steps, len(rings))
        n += 1
    # the stream's y operand loaded once a unit (HOIST_Y, I in one or two k-steps): the loop's ring
    # holds w2's tiles only, y's tiles sit in shared memory once, no cp.async left for y
    for swap in (False, True):
        bm = 16 if swap else 64
        k = compile_(_fc2_kernel, dict(y_ptr="*" + FP8, ys_ptr="*fp32", w_ptr="*" + FP8,
                                       w_desc=f"tensordesc<{FP8}[128, 128]>", w2s_ptr="*fp32", ws_ptr="*fp32",
                                       sorted_ptr="*i32", offsets_ptr="*i32", tw_ptr="*fp32", out_ptr="*bf16"),
                     dict(HAS_YS=True, E_PAD=256, BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, SWAP_AB=swap,
                          NUM_STAGES=3, USE_TMA=True, I_STEPS=2, HOIST_Y=True, PDL=True), gathered=False)
        tt = k.asm["ttgir"]
        assert len(re.findall(r"local_alloc : \(\) -> !ttg.memdesc<3x128x128x", tt)) == 2, swap
        assert len(re.findall(r"local_alloc %%\S+ : \(tensor<%dx128xf8E4M3FN" % bm, tt)) == 2, swap
        n += 1
    # FC1's tails (fc1_tail_m): the tile's MMA and the tail's swapped one on the same weight tiles,
    # whose ring the loop with the tail and the plain loop share (shared memory: the larger ring)
    for dt, tail in ((FP8, 16), ("bf16", 32)):
        bk = 128 if dt == FP8 else 64
        k = compile_(_fc1_kernel, dict(x_ptr="*" + dt, w_ptr="*" + dt, w_desc=f"tensordesc<{dt}[128, {bk}]>",
                                       alpha1_ptr="*fp32", xs_ptr="*fp32", ws_ptr="*fp32", sorted_ptr="*i32",
                                       offsets_ptr="*i32", y_ptr="*" + (FP8 if dt == FP8 else "bf16"), ys_ptr="*fp32"),
                     dict(HAS_XS=dt == FP8, OUT_FP8=dt == FP8, E_PAD=128, BLOCK_M=128, BLOCK_I=128, BLOCK_K=bk,
                          SWAP_AB=False, NUM_STAGES=3, USE_TMA=True, TAIL_M=tail, PDL=True), warps=8)
        mma = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k", k.asm["ptx"]))
        assert {"128", str(tail)} <= mma, mma
        assert k.metadata.shared <= 3 * (128 + tail + 256) * bk * (1 if dt == FP8 else 2) + 4096, k.metadata.shared
        n += 1
    # FC1 on the sorted copy of x (fc1_sorted_x): x and the weights both through TMA, no gather
    for dt, swap in ((FP8, False), ("bf16", True)):
        bk = 128 if dt == FP8 else 64
        bm = 16 if swap else 128
        k = compile_(_fc1_kernel, dict(x_ptr="*" + dt, w_ptr="*" + dt, w_desc=f"tensordesc<{dt}[128, {bk}]>",
                                       x_desc=f"tensordesc<{dt}[{bm}, {bk}]>", alpha1_ptr="*fp32", xs_ptr="*fp32",
                                       ws_ptr="*fp32", sorted_ptr="*i32", offsets_ptr="*i32",
                                       y_ptr="*" + (FP8 if dt == FP8 else "bf16"), ys_ptr="*fp32"),
                     dict(HAS_XS=dt == FP8, OUT_FP8=dt == FP8, E_PAD=128, BLOCK_M=bm, BLOCK_I=128, BLOCK_K=bk,
                          SWAP_AB=swap, NUM_STAGES=3, USE_TMA=True, X_SORTED=True, PDL=True), warps=8, gathered=False)
        assert k.asm["ptx"].count("cp.async.bulk.tensor") >= 3, dt  # x, gate and up
        n += 1
    # FC2 with its y rows through TMA (fc2_y_tma): the y tile a bulk-tensor load, where the plain
    # kernel loads it by cp.async (fp8 y's scales stay pointer loads, which Triton may pipeline too)
    for dt, swap in ((FP8, True), ("bf16", False)):
        bk = 128 if dt == FP8 else 64
        bm = 16 if swap else 64
        ptx = {}
        for y_tma in (False, True):
            ptx[y_tma] = compile_(_fc2_kernel, dict(y_ptr="*" + dt, ys_ptr="*fp32", w_ptr="*" + dt,
                                                    w_desc=f"tensordesc<{dt}[128, {bk}]>",
                                                    y_desc=f"tensordesc<{dt}[{bm}, {bk}]>" if y_tma else "*" + dt,
                                                    w2s_ptr="*fp32", ws_ptr="*fp32", sorted_ptr="*i32",
                                                    offsets_ptr="*i32", tw_ptr="*fp32", out_ptr="*bf16"),
                                  dict(HAS_YS=dt == FP8, E_PAD=256, BLOCK_M=bm, BLOCK_N=128, BLOCK_K=bk, SWAP_AB=swap,
                                       NUM_STAGES=3, USE_TMA=True, Y_TMA=y_tma, PDL=True),
                                  gathered=not y_tma or dt == FP8).asm["ptx"]
        bulk = {t: p.count("cp.async.bulk.tensor") for t, p in ptx.items()}
        cpa = {t: len(re.findall(r"cp\.async\.c[ag]", p)) for t, p in ptx.items()}
        assert bulk[True] > bulk[False] and cpa[True] < cpa[False], (dt, bulk, cpa)
        n += 1
    print("compiled", n)
''')


def test_routed_kernels_compile_for_sm90_pipelined():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "compiled 37" in r.stdout, r.stdout + r.stderr[-2000:]
