"""MoE routers as one Triton kernel each: router logits -> (alpha, topk_ids, topk_weights).

One program per token (a row of logits, held in registers as one block). ``densemoe.routing``
holds the torch versions these are tested against and the wrappers that pick between them.

Semantics (all arithmetic in float32; the logits and the bias are cast to float32 on load)::

    # softmax top-k (Mixtral, Qwen3-MoE)
    #   logits [M, E] fp32/bf16/fp16/fp64  ->  alpha [M, E] f32, ids [M, k] i64, w [M, k] f32
    for m:
        p = softmax(float32(logits[m, :]))          # exp(x - max) / sum(exp(x - max))
        for j in 0..k-1:                            # k rounds of argmax, ties: lowest index
            ids[m, j] = argmax over the experts not yet picked of p
            w[m, j] = p[ids[m, j]]
        if renormalize:
            w[m, :] = w[m, :] / sum(w[m, :])
        alpha[m, :] = 0;  alpha[m, ids[m, j]] = w[m, j]

    # DeepSeek-V3 noaux_tc
    #   logits [M, E], bias [E] (or none = zeros), E = n_group * G
    #   -> alpha [M, E] f32, ids [M, k] i64, w [M, k] f32
    for m:
        scores = sigmoid(float32(logits[m, :]))     # 1 / (1 + exp(-x))
        choice = scores + float32(bias)             # [n_group, G] tile (padded to powers of 2)
        group_score[g] = top1 + top2 of choice[g, :]   # two argmax rounds: a repeated max counts twice
        keep = topk_group rounds of argmax over group_score (ties: lowest group)
        choice[g, :] = -inf  for every group g not in keep   (as torch's masked_fill)
        for j in 0..k-1:                            # k rounds of argmax, ties: lowest index
            ids[m, j] = argmax over the experts not yet picked of choice
            w[m, j] = scores[ids[m, j]]             # the unbiased score
        if norm_topk_prob:
            w[m, :] = w[m, :] / (sum(w[m, :]) + 1e-20)
        w[m, :] = w[m, :] * routed_scaling_factor
        alpha[m, :] = 0;  alpha[m, ids[m, j]] = w[m, j]

Where the results can differ from the torch routers (``densemoe.routing``, transformers):

- Slot order. softmax: the same (descending weight). DeepSeek-V3: ours is descending by
  ``choice``; torch's ``topk(sorted=False)`` order is whatever the device gives. alpha does not
  depend on it; the normalising sum is over the k weights in slot order, so it may differ in the
  last ulp.
- Ties. Ours picks the lowest expert (and group) index among equal values; torch.topk's choice
  among ties is device-defined. A NaN counts as larger than every number (as in torch.topk).
- Rounding. exp is ``exp2`` with the rounding error of ``x * log2(e)`` compensated (one fma), a
  few ulps from torch's ``exp``; divisions are IEEE (``div_rn``); the sums run in a different
  order. Weights and alpha agree with torch within ~1e-6 relative; an expert whose value is
  within those ulps of the k-th one (a near-tie) may be picked by one and not the other.

Every row gets k distinct ids in [0, E), whatever the values (NaN and inf included), so the
outputs can always be used for indexing. alpha is written whole (zeros included): the outputs
need no initialisation. No host synchronisation: shapes and flags only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from densemoe.kernels.triton.pdl import launch_kwargs, pdl_enter

MAX_EXPERTS = 1024   # E above this: the torch router (the row is one register block). DeepSeek-V3's
                     # [n_group, G] tile padded to powers of two is then at most 2 x 1024 elements.
MAX_TOP_K = 128      # k rounds of argmax; above this torch's sort is the better tool
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# The argmax key: a float's order-preserving int32 in the high half of an int64, (2^31 - 1 -
# index) in the low half, so one integer max gives the largest value and, among equal values,
# the lowest index. Lanes out of the running (padding, already picked) hold _TAKEN, below the
# key of every value, -inf and NaN included. (-2139095041 below is _ord(-inf): 0xFF800000 ^
# 0x7FFFFFFF as an int32.)
_TAKEN = tl.constexpr(-9223372036854775807)


@triton.jit
def _exp(x):
    """exp(x) in float32 for x in any range: exp2(x * log2 e), with the rounding error of that
    product (and the tail of log2 e) put back by one fma, so a few ulps at most; x is clamped to
    +-200 (exp over- or underflows there anyway), NaN stays NaN."""
    x = tl.where(x < -200.0, -200.0, x)
    x = tl.where(x > 200.0, 200.0, x)
    t = x * 1.4426950408889634
    err = tl.fma(x, 1.4426950408889634, -t) + x * 1.925963033500011e-08
    return tl.exp2(t) * (1.0 + err * 0.6931471805599453)


@triton.jit
def _ord(v):
    """float32 -> int32 with the same order (-0.0 and +0.0 the same key; every NaN, whatever its
    sign bit, the largest key)."""
    b = v.to(tl.int32, bitcast=True)
    o = b ^ ((b >> 31) & 0x7FFFFFFF)
    o = tl.where(v == 0.0, 0, o)
    return tl.where(v != v, 2147483647, o)


@triton.jit
def _unord(o):
    """Inverse of _ord: int32 key -> float32."""
    return (o ^ ((o >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _key(o, idx):
    """(order key int32, index int32) -> int64 argmax key."""
    return (o.to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)


@triton.jit
def _key_index(key):
    return 2147483647 - key.to(tl.int32)


@triton.jit
def _softmax_topk_kernel(x_ptr, alpha_ptr, ids_ptr, w_ptr, E,
                         stride_xm, stride_xe, stride_am, stride_im, stride_wm,
                         TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                         RENORMALIZE: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    m = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    ok = offs < E
    x = tl.load(x_ptr + m * stride_xm + offs * stride_xe, mask=ok, other=float("-inf")).to(tl.float32)
    mx = tl.max(x, axis=0)
    e = tl.where(ok, _exp(x - mx), 0.0)
    p = tl.math.div_rn(e, tl.sum(e, axis=0))
    # p >= 0 (or NaN): its bits, sign cleared, order it as an int; a NaN sorts above 1.0
    key = _key(p.to(tl.int32, bitcast=True) & 0x7FFFFFFF, offs)
    key = tl.where(ok, key, _TAKEN)
    picked = offs < 0
    offs_k = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int32)
    w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for j in range(TOP_K):
        best = tl.max(key, axis=0)
        idx = 2147483647 - best.to(tl.int32)      # _key_index, inlined (interpreter speed)
        wj = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        hit = offs == idx
        picked = picked | hit
        key = tl.where(hit, _TAKEN, key)
        ids = tl.where(offs_k == j, idx, ids)
        w = tl.where(offs_k == j, wj, w)
    if RENORMALIZE:
        s = tl.sum(w, axis=0)
        w = tl.math.div_rn(w, s)
        p = tl.math.div_rn(p, s)
    k_ok = offs_k < TOP_K
    tl.store(ids_ptr + m * stride_im + offs_k, ids.to(tl.int64), mask=k_ok)
    tl.store(w_ptr + m * stride_wm + offs_k, w, mask=k_ok)
    tl.store(alpha_ptr + m * stride_am + offs, tl.where(picked, p, 0.0), mask=ok)


@triton.jit
def _deepseek_v3_topk_kernel(x_ptr, bias_ptr, alpha_ptr, ids_ptr, w_ptr, n_group, G,
                             stride_xm, stride_xe, stride_b, stride_am, stride_im, stride_wm,
                             scale,
                             TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr,
                             BLOCK_NG: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
                             HAS_BIAS: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    m = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_NG)
    offs_i = tl.arange(0, BLOCK_G)
    g_ok = offs_g < n_group
    ok = g_ok[:, None] & (offs_i[None, :] < G)
    col = offs_g[:, None] * G + offs_i[None, :]                     # [BLOCK_NG, BLOCK_G] expert ids
    x = tl.load(x_ptr + m * stride_xm + col * stride_xe, mask=ok, other=0.0).to(tl.float32)
    den = 1.0 + _exp(-x)
    scores = tl.math.div_rn(tl.zeros_like(den) + 1.0, den)     # sigmoid, IEEE division as torch's
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + col * stride_b, mask=ok, other=0.0).to(tl.float32)
    ckey = tl.where(ok, _key(_ord(choice), col), _TAKEN)

    # group score: the sum of each group's top-2 choice values (two argmax rounds)
    top1 = tl.max(ckey, axis=1)
    second = tl.max(tl.where(col == _key_index(top1)[:, None], _TAKEN, ckey), axis=1)
    gscore = _unord((top1 >> 32).to(tl.int32)) + _unord((second >> 32).to(tl.int32))
    gkey = tl.where(g_ok, _key(_ord(gscore), offs_g), _TAKEN)
    keep = offs_g < 0
    for _j in range(TOPK_GROUP):
        gbest = tl.max(gkey, axis=0)
        ghit = offs_g == 2147483647 - gbest.to(tl.int32)
        keep = keep | ghit
        gkey = tl.where(ghit, _TAKEN, gkey)

    # experts outside the kept groups: choice = -inf (still eligible, below every finite value)
    key = tl.where(keep[:, None], ckey, _key(tl.zeros_like(col) - 2139095041, col))
    key = tl.where(ok, key, _TAKEN)
    # the k rounds run on the tile flattened to one dimension (one reduction per argmax)
    key = tl.reshape(key, (BLOCK_NG * BLOCK_G,))
    col1 = tl.reshape(col, (BLOCK_NG * BLOCK_G,))
    ok1 = tl.reshape(ok, (BLOCK_NG * BLOCK_G,))
    s1 = tl.reshape(scores, (BLOCK_NG * BLOCK_G,))
    picked = col1 < 0
    offs_k = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int32)
    w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for j in range(TOP_K):
        best = tl.max(key, axis=0)
        idx = 2147483647 - best.to(tl.int32)      # _key_index, inlined (interpreter speed)
        hit = (col1 == idx) & ok1
        picked = picked | hit
        key = tl.where(hit, _TAKEN, key)
        wj = tl.sum(tl.where(hit, s1, 0.0), axis=0)   # exact: one term
        ids = tl.where(offs_k == j, idx, ids)
        w = tl.where(offs_k == j, wj, w)
    a = s1
    if NORM:
        d = tl.sum(w, axis=0) + 1e-20
        w = tl.math.div_rn(w, d)
        a = tl.math.div_rn(a, d)
    w = w * scale
    a = a * scale
    k_ok = offs_k < TOP_K
    tl.store(ids_ptr + m * stride_im + offs_k, ids.to(tl.int64), mask=k_ok)
    tl.store(w_ptr + m * stride_wm + offs_k, w, mask=k_ok)
    tl.store(alpha_ptr + m * stride_am + col1, tl.where(picked, a, 0.0), mask=ok1)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (max(n, 1) - 1).bit_length())


def _num_warps(block: int) -> int:
    return 1 if block <= 256 else (2 if block <= 1024 else 4)


def softmax_topk_triton(logits: torch.Tensor, top_k: int, renormalize: bool,
                        alpha: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """alpha [M, E] f32, topk_ids [M, k] i64, topk_weights [M, k] f32 (unit column strides)
    <- logits [M, E] (any strides); arguments checked by the caller (``densemoe.routing``)."""
    M, E = logits.shape
    if M == 0:
        return
    block = _pow2_at_least(E)
    _softmax_topk_kernel[(M,)](
        logits, alpha, topk_ids, topk_weights, E,
        logits.stride(0), logits.stride(1), alpha.stride(0), topk_ids.stride(0), topk_weights.stride(0),
        TOP_K=top_k, BLOCK_E=block, BLOCK_K=_pow2_at_least(top_k), RENORMALIZE=renormalize,
        num_warps=_num_warps(block), **launch_kwargs(logits.device))


def deepseek_v3_topk_triton(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int,
                            topk_group: int, routed_scaling_factor: float, norm_topk_prob: bool,
                            alpha: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    """alpha [M, E] f32, topk_ids [M, k] i64, topk_weights [M, k] f32 (unit column strides)
    <- logits [M, E], bias [E] or None (any strides); arguments checked by the caller."""
    M, E = logits.shape
    if M == 0:
        return
    G = E // n_group
    block_ng, block_g = _pow2_at_least(n_group), _pow2_at_least(G)
    _deepseek_v3_topk_kernel[(M,)](
        logits, bias if bias is not None else logits, alpha, topk_ids, topk_weights, n_group, G,
        logits.stride(0), logits.stride(1), bias.stride(0) if bias is not None else 0,
        alpha.stride(0), topk_ids.stride(0), topk_weights.stride(0), float(routed_scaling_factor),
        TOP_K=top_k, TOPK_GROUP=topk_group, BLOCK_NG=block_ng, BLOCK_G=block_g,
        BLOCK_K=_pow2_at_least(top_k), HAS_BIAS=bias is not None, NORM=norm_topk_prob,
        num_warps=_num_warps(block_ng * block_g), **launch_kwargs(logits.device))
