"""The gate/up MMA step that FC1's kernels share (the dense one, ``fc1.py``, and the routed one,
``routed.py``): one k-tile's two products added into the gate and up accumulators.

    plain:     acc_g += x . wg^T;  acc_u += x . wu^T                     (fp32 accumulate)
    W_BLOCK:   acc_g += (x . wg^T) * scale_g;  acc_u += (x . wu^T) * scale_u
               with scale_* [rows] fp32: the rows' x group scale times the weight block's scale
               (128 x 128 block-scaled fp8: DeepGEMM's per-k-step promotion)
    SWAP_AB:   the weight tile is the MMA's M operand, the token rows its N: acc [BLOCK_I, rows]

fp8 and the accumulator (PRECISE_K): Hopper's fp8 wgmma adds its products into the accumulator at
reduced precision, and Triton by default lets it run so over the whole k-loop
(max_num_imprecise_acc 2**30 on sm_90). Over FC1's k = H (2048-7168) that moved v enough to flip
the fp8 rounding of ~1% of y's elements (docs/routed.md, "fp8 accumulation"). Every fp8 dot here
passes max_num_imprecise_acc = its k-tile: each k-tile's sum is added into the fp32 accumulator,
as cuBLAS does by default (DeepGEMM's promotion), and the wgmma stays asynchronous. bf16 ignores it.
"""

import triton
import triton.language as tl


@triton.jit
def gate_up_step(xt, wg, wu, acc_g, acc_u, scale_g, scale_u, SWAP_AB: tl.constexpr, W_BLOCK: tl.constexpr):
    if W_BLOCK:
        if SWAP_AB:
            acc_g += tl.dot(wg, tl.trans(xt)) * scale_g[None, :]
            acc_u += tl.dot(wu, tl.trans(xt)) * scale_u[None, :]
        else:
            acc_g += tl.dot(xt, tl.trans(wg)) * scale_g[:, None]
            acc_u += tl.dot(xt, tl.trans(wu)) * scale_u[:, None]
    elif SWAP_AB:  # fp8: the k-tile's sum added to acc in fp32 (see PRECISE_K)
        acc_g = tl.dot(wg, tl.trans(xt), acc_g, max_num_imprecise_acc=xt.shape[1])
        acc_u = tl.dot(wu, tl.trans(xt), acc_u, max_num_imprecise_acc=xt.shape[1])
    else:
        acc_g = tl.dot(xt, tl.trans(wg), acc_g, max_num_imprecise_acc=xt.shape[1])
        acc_u = tl.dot(xt, tl.trans(wu), acc_u, max_num_imprecise_acc=xt.shape[1])
    return acc_g, acc_u
