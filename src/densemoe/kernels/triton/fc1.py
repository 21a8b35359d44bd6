"""FC1 (dense-MoE gate/up projection with SwiGLU fused) as one Triton kernel.

Semantics (the contract; ``densemoe.reference.fc1_ref`` is its executable twin)::

    # x:          [M, H]     fp8 e4m3 or bf16, K-major   (token rows)
    # w1:         [E*2I, H]  same dtype as x, K-major    (expert e: rows e*2I .. e*2I+I-1 gate,
    #                                                      rows e*2I+I .. e*2I+2I-1 up)
    # alpha1:     [E]        float32                     (per-expert dequant scale of w1)
    # x_scale:    [M]        float32, optional           (per-token dequant scale of x)
    # alpha_post: [M, E]     float32, optional           (applied after the activation)
    # y:          [M, E*I]   bf16 / fp16 / fp32, or fp8 e4m3 with a static scale
    for m, e, i:
        s = alpha1[e] * x_scale[m]                        # fp32
        g = s * sum(x[m, k] * w1[e*2I + i, k] for k)      # tensor cores, fp32 accumulate
        u = s * sum(x[m, k] * w1[e*2I + I + i, k] for k)
        v = silu(g) * u * alpha_post[m, e]                # fp32
        y[m, e*I + i] = v.to(y.dtype)                    # fp8: clamp(v / out_scale, +-448)
    # dynamic fp8 (y_scale [M, E] given): y_scale[m, e] = amax_i |v| / 448 (1 if all zero),
    #     y[m, e*I + i] = fp8(clamp(v / y_scale[m, e], +-448))   (one tile holds all of I)

Schedule: one program per (token tile, expert, tile of I): it streams the matching gate and up
row tiles of w1 over K = H into two fp32 accumulators and applies the activation in the
epilogue, so gate and up never leave registers. ``SWAP_AB`` makes the weight tile the MMA's M
operand and the token tile its N (small M); ``USE_TMA`` loads with tensor descriptors (Hopper),
else masked pointer loads (any strides). ``persistent=n`` launches n programs per SM that take
the tiles in turn (``_fc1_persistent_kernel``) instead of one program per tile; there
``split_k`` cuts every tile's k-range in parts and ``stream_k`` cuts only a short last wave of
tiles by k-steps over every program, the parts adding up in fp32 in a reused workspace. Expert
skipping (``skip``) runs on the persistent form: only the (token tile, picked expert) tiles.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from densemoe._runtime import sm_count, supports_tma
from densemoe.kernels.common import SMEM_BYTES, Fc1Problem, reused_zeros, tma_compatible
from densemoe.kernels.triton.gate_up import gate_up_step
from densemoe.kernels.triton.fp8 import amax_abs, clamp_e4m3, e4m3_scale
from densemoe.kernels.triton.pdl import launch_kwargs, pdl_enter
from densemoe.kernels.triton.skip import _expert_at, _tile_list, _tile_positions, list_blocks, lists_scratch

# Skipping: spread the units over the whole grid when there are fewer than programs (a switch
# for probes; docs/skipping.md)
SPREAD_UNITS = True
# stream_k configs: the largest last wave (share of the programs) that is cut by k-steps over
# every program; longer last waves run as whole units (docs/skipping.md has the sweep)
STREAM_K_TAIL = 0.25
_SMEM_RESERVE = 1024  # Triton's barriers and slack


@triton.jit
def _fc1_epilogue(acc_g, acc_u, e, offs_m, offs_i, m_ok, i_ok, alpha1_ptr, xs_ptr, post_ptr, route_ptr, y_ptr,
                  oscale_ptr, ys_ptr, I, stride_pm, stride_pe, stride_rm, stride_re, stride_ym, stride_yn,
                  stride_ysm, stride_yse,
                  HAS_XS: tl.constexpr, HAS_POST: tl.constexpr, HAS_ROUTE: tl.constexpr, OUT_FP8: tl.constexpr,
                  DYN_SCALE: tl.constexpr, SWAP_AB: tl.constexpr):
    """Scales, SwiGLU, alpha_post, the routing mask, the output's fp8 scaling and the masked
    store of one tile."""
    s = tl.load(alpha1_ptr + e)
    g = acc_g * s
    u = acc_u * s
    if HAS_XS:
        xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
        if SWAP_AB:
            g = g * xs[None, :]
            u = u * xs[None, :]
        else:
            g = g * xs[:, None]
            u = u * xs[:, None]
    v = g * tl.sigmoid(g) * u
    if HAS_POST:
        p = tl.load(post_ptr + offs_m.to(tl.int64) * stride_pm + e * stride_pe, mask=m_ok, other=0.0)
        if SWAP_AB:
            v = v * p[None, :]
        else:
            v = v * p[:, None]
    if HAS_ROUTE:  # tokens that did not pick expert e get 0
        r = tl.load(route_ptr + offs_m.to(tl.int64) * stride_rm + e * stride_re, mask=m_ok, other=0)
        if SWAP_AB:
            v = tl.where(r[None, :] != 0, v, 0.0)
        else:
            v = tl.where(r[:, None] != 0, v, 0.0)
    if DYN_SCALE:  # one tile holds all of I: s[m, e] = amax_i |v| / 448, fp8 out = v / s
        if SWAP_AB:
            amax = amax_abs(tl.where(i_ok[:, None], v, 0.0), 0)
            sc = e4m3_scale(amax)
            v = clamp_e4m3(tl.math.div_rn(v, sc[None, :]))
        else:
            amax = amax_abs(tl.where(i_ok[None, :], v, 0.0), 1)
            sc = e4m3_scale(amax)
            v = clamp_e4m3(tl.math.div_rn(v, sc[:, None]))
        tl.store(ys_ptr + offs_m.to(tl.int64) * stride_ysm + e * stride_yse, sc, mask=m_ok)
    elif OUT_FP8:
        inv = 1.0 / tl.load(oscale_ptr)
        v = clamp_e4m3(v * inv)
    cols = (e * I + offs_i).to(tl.int64)
    rows = offs_m.to(tl.int64)
    if SWAP_AB:
        tl.store(y_ptr + rows[None, :] * stride_ym + cols[:, None] * stride_yn,
                 v.to(y_ptr.dtype.element_ty), mask=i_ok[:, None] & m_ok[None, :])
    else:
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
                 v.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & i_ok[None, :])


@triton.jit
def _fc1_k_step(x_ptr, w_ptr, x_desc, w_desc, acc_g, acc_u, k0, off_m, gate_row0, I, H, offs_k, x_rows, gate_rows,
                up_rows, m_ok, i_ok, stride_xk, stride_wn, stride_wk, SWAP_AB: tl.constexpr, USE_TMA: tl.constexpr,
                xg_ptr=None, wb_ptr=None, stride_xgm=0, stride_wbr=0, W_BLOCK: tl.constexpr = False):
    """One k-tile: load the token tile and the gate and up weight tiles, accumulate both.
    ``W_BLOCK`` (128 x 128 block-scaled w1, x in 1 x 128 groups): each k-tile's products are
    scaled in fp32 by the rows' x group scale and the weight block's scale before they are added
    (BLOCK_I and BLOCK_K divide 128)."""
    if USE_TMA:  # out-of-range rows and columns read as 0 (x) or belong to masked outputs (w)
        xt = x_desc.load([off_m, k0])
        wg = w_desc.load([gate_row0, k0])
        wu = w_desc.load([gate_row0 + I, k0])
    else:
        kk = k0 + offs_k
        k_ok = kk < H
        xt = tl.load(x_ptr + x_rows[:, None] + kk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w_ptr + gate_rows[:, None] * stride_wn + kk[None, :] * stride_wk,
                     mask=i_ok[:, None] & k_ok[None, :], other=0.0)
        wu = tl.load(w_ptr + up_rows[:, None] * stride_wn + kk[None, :] * stride_wk,
                     mask=i_ok[:, None] & k_ok[None, :], other=0.0)
    scale_g = 0.0
    scale_u = 0.0
    if W_BLOCK:
        offs_m = off_m + tl.arange(0, xt.shape[0])
        sx = tl.load(xg_ptr + offs_m.to(tl.int64) * stride_xgm + k0 // 128, mask=m_ok, other=0.0)
        scale_g = sx * tl.load(wb_ptr + (gate_row0 // 128) * stride_wbr + k0 // 128)
        scale_u = sx * tl.load(wb_ptr + ((gate_row0 + I) // 128) * stride_wbr + k0 // 128)
    return gate_up_step(xt, wg, wu, acc_g, acc_u, scale_g, scale_u, SWAP_AB, W_BLOCK)


@triton.jit(do_not_specialize=["M"])
def _fc1_kernel(
    x_ptr, w_ptr, x_desc, w_desc, alpha1_ptr, xs_ptr, post_ptr, route_ptr, y_ptr, oscale_ptr, ys_ptr, xg_ptr, wb_ptr,
    M, H, I,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pe, stride_rm, stride_re, stride_ym, stride_yn,
    stride_ysm, stride_yse, stride_xgm, stride_wbr,
    HAS_XS: tl.constexpr, HAS_POST: tl.constexpr, HAS_ROUTE: tl.constexpr, OUT_FP8: tl.constexpr,
    DYN_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr, USE_TMA: tl.constexpr, NUM_STAGES: tl.constexpr, PDL: tl.constexpr = False,
    W_BLOCK: tl.constexpr = False,
):
    pdl_enter(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    i_tiles = tl.cdiv(I, BLOCK_I)
    e = pid_n // i_tiles
    it = pid_n % i_tiles
    off_m = pid_m * BLOCK_M
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_i = it * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    i_ok = offs_i < I
    gate_row0 = e * 2 * I + it * BLOCK_I  # first gate row of the tile; its up rows start I later
    gate_rows = (e * 2 * I + offs_i).to(tl.int64)
    up_rows = gate_rows + I
    x_rows = offs_m.to(tl.int64) * stride_xm
    if SWAP_AB:  # weights are the MMA's M operand, tokens its N: acc [BLOCK_I, BLOCK_M]
        acc_g = tl.zeros((BLOCK_I, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_I, BLOCK_M), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
    for k0 in tl.range(0, H, BLOCK_K, num_stages=NUM_STAGES):
        acc_g, acc_u = _fc1_k_step(x_ptr, w_ptr, x_desc, w_desc, acc_g, acc_u, k0, off_m, gate_row0, I, H, offs_k,
                                   x_rows, gate_rows, up_rows, m_ok, i_ok, stride_xk, stride_wn, stride_wk,
                                   SWAP_AB, USE_TMA, xg_ptr, wb_ptr, stride_xgm, stride_wbr, W_BLOCK)
    _fc1_epilogue(acc_g, acc_u, e, offs_m, offs_i, m_ok, i_ok, alpha1_ptr, xs_ptr, post_ptr, route_ptr, y_ptr,
                  oscale_ptr, ys_ptr, I, stride_pm, stride_pe, stride_rm, stride_re, stride_ym, stride_yn,
                  stride_ysm, stride_yse, HAS_XS, HAS_POST, HAS_ROUTE, OUT_FP8, DYN_SCALE, SWAP_AB)


@triton.jit
def _locate(q, counts_ptr, E, INACTIVE: tl.constexpr):
    """(token tile t, position j) of the q-th (tile, expert) pair: pairs are counted tile by
    tile, ``counts[t]`` picked experts per tile (``E - counts[t]`` if INACTIVE)."""
    t = q * 0
    start = q * 0
    c = tl.load(counts_ptr)
    if INACTIVE:
        c = E - c
    while q >= start + c:
        start += c
        t += 1
        c = tl.load(counts_ptr + t)
        if INACTIVE:
            c = E - c
    return t, q - start


@triton.jit(do_not_specialize=["M"])
def _fc1_persistent_kernel(
    x_ptr, w_ptr, x_desc, w_desc, alpha1_ptr, xs_ptr, post_ptr, route_ptr, y_ptr, oscale_ptr, ys_ptr, xg_ptr, wb_ptr,
    sel_ptr, lists_ptr, counts_ptr, ws_ptr, cnt_ptr,
    M, H, I, E, NUM_PROGS, N_IDS, stride_sm, stride_se,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pe, stride_rm, stride_re, stride_ym, stride_yn,
    stride_ysm, stride_yse, stride_xgm, stride_wbr,
    HAS_XS: tl.constexpr, HAS_POST: tl.constexpr, HAS_ROUTE: tl.constexpr, OUT_FP8: tl.constexpr,
    DYN_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr, USE_TMA: tl.constexpr, SKIP: tl.constexpr, NUM_STAGES: tl.constexpr,
    BLOCK_E: tl.constexpr = 16, LIST_ROWS: tl.constexpr = 16, FILL: tl.constexpr = True,
    ONE_TILE: tl.constexpr = False, LISTS_GIVEN: tl.constexpr = False, PDL: tl.constexpr = False,
    SPREAD: tl.constexpr = False, SPLIT_K: tl.constexpr = 1, IDS: tl.constexpr = False,
    STREAM_K: tl.constexpr = False, SK_TAIL=0, W_BLOCK: tl.constexpr = False,
):
    """The same tiles as ``_fc1_kernel``, taken in turn by ``NUM_PROGS`` persistent programs.
    Dense: tile u = token tile u % m_tiles of weight tile u // m_tiles (the token tiles of one
    weight tile run side by side and share it through L2). ``SKIP``: only the (token tile,
    picked expert, tile of I) units, from ``lists`` / ``counts`` (``kernels/triton/skip.py``),
    then the zero-fill of every (token tile, expert not picked there) output segment. Each
    program lists every tile's experts itself first (``_tile_list`` over ``sel_ptr``: the
    routing, else alpha_post), into scratch ``lists`` / ``counts``; ``IDS`` (M = 1): ``lists`` is
    the token's N_IDS distinct picked experts (its top-k ids, any integer dtype), read directly, no
    list built (no zero-fill: FILL off). ``SPLIT_K`` > 1: each tile's
    k-range is cut into SPLIT_K units (more, shorter units at small M); they add their fp32
    partial sums (the rows that exist) into the tile's slot of the workspace ``ws`` and count
    themselves in ``cnt``; the last to arrive reads the sum back, leaves slot and counter at
    zero (``workspace.reused_zeros``) and applies the epilogue. ``STREAM_K``: when the units are
    q >= 1 full waves of NUM_PROGS plus a last wave of r <= SK_TAIL units, the q waves go round-robin
    as whole units and the r units' k-steps are cut into NUM_PROGS equal contiguous ranges, one more
    per program (a unit cut by a range boundary meets its other parts in the workspace slot of the
    first boundary inside it, as above): a short last wave no longer leaves most SMs idle."""
    pdl_enter(PDL)
    m_tiles = tl.cdiv(M, BLOCK_M)
    i_tiles = tl.cdiv(I, BLOCK_I)
    k_tiles = tl.cdiv(H, BLOCK_K)
    pid = tl.program_id(0)
    pos = pid * 0  # (one token tile: its list in registers, below)
    if SKIP:
        n_pairs = pid * 0
        if IDS:  # one token: ``lists`` holds the N_IDS distinct experts it picked (its top-k ids)
            n_pairs = N_IDS
        elif LISTS_GIVEN:  # built beforehand (``active_experts``): only the counts are read
            for t in range(m_tiles):
                n_pairs += tl.load(counts_ptr + t)
        elif ONE_TILE:  # one token tile: its list stays in registers (no store, barrier, reload)
            pos, n_pairs = _tile_positions(sel_ptr, 0, M, E, stride_sm, stride_se, BLOCK_M, LIST_ROWS, BLOCK_E)
        else:
            for t in range(m_tiles):
                n_pairs += _tile_list(sel_ptr, t, M, E, stride_sm, stride_se, lists_ptr, counts_ptr,
                                      BLOCK_M, LIST_ROWS, BLOCK_E)
            tl.debug_barrier()  # the lists this program just wrote are read back below
        n_units = n_pairs * i_tiles
    else:
        n_pairs = m_tiles * E
        n_units = n_pairs * i_tiles
    # Fewer units than programs (skipping at small M): every step-th program takes one, so
    # the busy programs are spread over the grid (and the SMs) instead of packed at its start.
    n_work = n_units * SPLIT_K
    n_dp = n_work  # units taken whole (or in split_k parts), round-robin
    if STREAM_K:  # a last wave of at most SK_TAIL units is cut by k-steps over every program
        q = n_units // NUM_PROGS
        r = n_units - q * NUM_PROGS
        n_dp = tl.where((q > 0) & (r > 0) & (r <= SK_TAIL), q * NUM_PROGS, n_units)
    step = 1
    if SPREAD:
        step = tl.maximum(NUM_PROGS // tl.maximum(n_dp, 1), 1)
    vprogs = NUM_PROGS // step
    vpid = tl.where((pid % step == 0) & (pid // step < vprogs), pid // step, n_dp)
    for uk in tl.range(vpid, n_dp, vprogs):
        if SPLIT_K == 1:  # whole units (kept apart: constant k bounds for the pipeliner)
            _fc1_unit(uk, 0, k_tiles, 0, False, pos, x_ptr, w_ptr, x_desc, w_desc, alpha1_ptr, xs_ptr, post_ptr,
                      route_ptr, y_ptr, oscale_ptr, ys_ptr, xg_ptr, wb_ptr, lists_ptr, counts_ptr, ws_ptr, cnt_ptr, M,
                      H, I, E, m_tiles, i_tiles, k_tiles, stride_xm, stride_xk, stride_wn, stride_wk, stride_pm,
                      stride_pe, stride_rm, stride_re, stride_ym, stride_yn, stride_ysm, stride_yse, stride_xgm,
                      stride_wbr, HAS_XS, HAS_POST, HAS_ROUTE, OUT_FP8, DYN_SCALE, BLOCK_M, BLOCK_I, BLOCK_K, SWAP_AB,
                      USE_TMA, SKIP, NUM_STAGES, BLOCK_E, ONE_TILE, LISTS_GIVEN, IDS, False, W_BLOCK)
        else:  # the tile (and its workspace slot), and which k-range of it
            u = uk // SPLIT_K
            _fc1_unit(u, (uk % SPLIT_K) * k_tiles // SPLIT_K, (uk % SPLIT_K + 1) * k_tiles // SPLIT_K, u, True, pos,
                      x_ptr, w_ptr, x_desc, w_desc, alpha1_ptr, xs_ptr, post_ptr, route_ptr, y_ptr, oscale_ptr,
                      ys_ptr, xg_ptr, wb_ptr, lists_ptr, counts_ptr, ws_ptr, cnt_ptr, M, H, I, E, m_tiles, i_tiles,
                      k_tiles, stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pe, stride_rm, stride_re,
                      stride_ym, stride_yn, stride_ysm, stride_yse, stride_xgm, stride_wbr, HAS_XS, HAS_POST,
                      HAS_ROUTE, OUT_FP8, DYN_SCALE, BLOCK_M, BLOCK_I, BLOCK_K, SWAP_AB, USE_TMA, SKIP, NUM_STAGES,
                      BLOCK_E, ONE_TILE, LISTS_GIVEN, IDS, True, W_BLOCK)
    if STREAM_K and n_dp < n_units:  # this program's k-steps [w_lo, w_hi) of the last wave's units
        # (int32: at most SK_TAIL <= NUM_PROGS units of k_tiles steps, times NUM_PROGS)
        total = (n_units - n_dp) * k_tiles
        w_lo = pid * total // NUM_PROGS
        w_hi = (pid + 1) * total // NUM_PROGS
        sk_first = w_lo // k_tiles
        n_sk = tl.where(w_hi > w_lo, (w_hi + k_tiles - 1) // k_tiles - sk_first, 0)
        for j in tl.range(0, n_sk):
            rel = (sk_first + j) * k_tiles
            k_lo = tl.maximum(w_lo - rel, 0)
            k_hi = tl.minimum(w_hi - rel, k_tiles)
            # a unit cut by a range boundary: its slot is that of the first boundary inside it
            b = ((rel + 1) * NUM_PROGS + total - 1) // total
            _fc1_unit(n_dp + sk_first + j, k_lo, k_hi, b, (k_lo > 0) | (k_hi < k_tiles), pos, x_ptr, w_ptr, x_desc,
                      w_desc, alpha1_ptr, xs_ptr, post_ptr, route_ptr, y_ptr, oscale_ptr, ys_ptr, xg_ptr, wb_ptr,
                      lists_ptr, counts_ptr, ws_ptr, cnt_ptr, M, H, I, E, m_tiles, i_tiles, k_tiles, stride_xm,
                      stride_xk, stride_wn, stride_wk, stride_pm, stride_pe, stride_rm, stride_re, stride_ym,
                      stride_yn, stride_ysm, stride_yse, stride_xgm, stride_wbr, HAS_XS, HAS_POST, HAS_ROUTE, OUT_FP8,
                      DYN_SCALE, BLOCK_M, BLOCK_I, BLOCK_K, SWAP_AB, USE_TMA, SKIP, NUM_STAGES, BLOCK_E, ONE_TILE,
                      LISTS_GIVEN, IDS, True, W_BLOCK)
    if SKIP and FILL:  # zero-fill: one unit per (token tile, expert not picked there), after the compute
        _fc1_fill(pos, n_pairs, (pid + NUM_PROGS - n_work % NUM_PROGS) % NUM_PROGS, NUM_PROGS, lists_ptr, counts_ptr,
                  y_ptr, ys_ptr, M, E, I, m_tiles, stride_ym, stride_yn, stride_ysm, stride_yse, BLOCK_M, BLOCK_I,
                  BLOCK_E, ONE_TILE, LISTS_GIVEN, DYN_SCALE)


@triton.jit
def _fc1_unit(u, k_lo, k_hi, b, reduce, pos, x_ptr, w_ptr, x_desc, w_desc, alpha1_ptr, xs_ptr, post_ptr, route_ptr,
              y_ptr, oscale_ptr, ys_ptr, xg_ptr, wb_ptr, lists_ptr, counts_ptr, ws_ptr, cnt_ptr, M, H, I, E, m_tiles,
              i_tiles, k_tiles, stride_xm, stride_xk, stride_wn, stride_wk, stride_pm, stride_pe, stride_rm, stride_re,
              stride_ym, stride_yn, stride_ysm, stride_yse, stride_xgm, stride_wbr,
              HAS_XS: tl.constexpr, HAS_POST: tl.constexpr, HAS_ROUTE: tl.constexpr, OUT_FP8: tl.constexpr,
              DYN_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
              SWAP_AB: tl.constexpr, USE_TMA: tl.constexpr, SKIP: tl.constexpr, NUM_STAGES: tl.constexpr,
              BLOCK_E: tl.constexpr, ONE_TILE: tl.constexpr, LISTS_GIVEN: tl.constexpr, IDS: tl.constexpr,
              REDUCE: tl.constexpr, W_BLOCK: tl.constexpr = False):
    """Unit u's k-tiles [k_lo, k_hi) into two fp32 accumulators, then its epilogue. ``REDUCE``
    (and ``reduce`` at run time): the range is a part of the unit's, added into workspace slot b
    (counter b counts the k-steps in); the part that completes it applies the epilogue."""
    offs_k = tl.arange(0, BLOCK_K)
    if SKIP:
        it = u % i_tiles
        if ONE_TILE:  # M <= BLOCK_M: no search over token tiles
            pid_m = 0
            if IDS:  # the caller's ids, unchecked: one outside [0, E) (at its own width) is dropped:
                # its unit reads expert 0's weights and stores nothing
                e = tl.load(lists_ptr + u // i_tiles)
                e_ok = (e >= 0) & (e < E)
                e = tl.where(e_ok, e, 0).to(tl.int32)
            elif LISTS_GIVEN:
                e = tl.load(lists_ptr + u // i_tiles)
            else:
                e = _expert_at(pos, u // i_tiles, BLOCK_E)
        else:
            pid_m, j = _locate(u // i_tiles, counts_ptr, E, False)
            e = tl.load(lists_ptr + pid_m * E + j)
    else:
        pid_m = u % m_tiles
        pid_n = u // m_tiles
        e = pid_n // i_tiles
        it = pid_n % i_tiles
    off_m = pid_m * BLOCK_M
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_i = it * BLOCK_I + tl.arange(0, BLOCK_I)
    m_ok = offs_m < M
    if SKIP and ONE_TILE and IDS:  # a dropped id's unit: no row
        m_ok = offs_m < tl.where(e_ok, M, 0)
    i_ok = offs_i < I
    gate_row0 = e * 2 * I + it * BLOCK_I
    gate_rows = (e * 2 * I + offs_i).to(tl.int64)
    up_rows = gate_rows + I
    x_rows = offs_m.to(tl.int64) * stride_xm
    if SWAP_AB:
        acc_g = tl.zeros((BLOCK_I, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_I, BLOCK_M), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
    for kt in tl.range(k_lo, k_hi, num_stages=NUM_STAGES):
        acc_g, acc_u = _fc1_k_step(x_ptr, w_ptr, x_desc, w_desc, acc_g, acc_u, kt * BLOCK_K, off_m, gate_row0, I,
                                   H, offs_k, x_rows, gate_rows, up_rows, m_ok, i_ok, stride_xk, stride_wn,
                                   stride_wk, SWAP_AB, USE_TMA, xg_ptr, wb_ptr, stride_xgm, stride_wbr, W_BLOCK)
    last = True
    if REDUCE:  # a part of the unit's k-range: meet the other parts in workspace slot b
        last = k_lo <= k_hi  # (true; a tensor, as the branch below makes it)
        if reduce:
            if SWAP_AB:
                offs2 = tl.arange(0, BLOCK_I)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
                ok2 = i_ok[:, None] & m_ok[None, :]
            else:
                offs2 = tl.arange(0, BLOCK_M)[:, None] * BLOCK_I + tl.arange(0, BLOCK_I)[None, :]
                ok2 = m_ok[:, None] & i_ok[None, :]
            slot = ws_ptr + b.to(tl.int64) * (2 * BLOCK_M * BLOCK_I)
            tl.atomic_add(slot + offs2, acc_g, mask=ok2, sem="relaxed")
            tl.atomic_add(slot + BLOCK_M * BLOCK_I + offs2, acc_u, mask=ok2, sem="relaxed")
            tl.debug_barrier()  # every thread's partial sums are issued before the release below
            # the counter adds up k-steps: the part that completes the unit's k_tiles finishes it
            last = tl.atomic_add(cnt_ptr + b, k_hi - k_lo, sem="acq_rel") + (k_hi - k_lo) == k_tiles
            if last:  # the sum is complete: read it, and leave slot and counter at zero
                acc_g = tl.load(slot + offs2, mask=ok2, other=0.0, cache_modifier=".cg")
                acc_u = tl.load(slot + BLOCK_M * BLOCK_I + offs2, mask=ok2, other=0.0, cache_modifier=".cg")
                tl.debug_barrier()  # (as FC2's: keep the zero stores' staging apart from the loads')
                tl.store(slot + offs2, tl.zeros_like(acc_g), mask=ok2)
                tl.store(slot + BLOCK_M * BLOCK_I + offs2, tl.zeros_like(acc_u), mask=ok2)
                tl.store(cnt_ptr + b, 0)
    if last:
        _fc1_epilogue(acc_g, acc_u, e, offs_m, offs_i, m_ok, i_ok, alpha1_ptr, xs_ptr, post_ptr, route_ptr,
                      y_ptr, oscale_ptr, ys_ptr, I, stride_pm, stride_pe, stride_rm, stride_re, stride_ym,
                      stride_yn, stride_ysm, stride_yse, HAS_XS, HAS_POST, HAS_ROUTE, OUT_FP8, DYN_SCALE,
                      SWAP_AB)


@triton.jit
def _fc1_fill(pos, n_pairs, first, NUM_PROGS, lists_ptr, counts_ptr, y_ptr, ys_ptr, M, E, I, m_tiles,
              stride_ym, stride_yn, stride_ysm, stride_yse, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
              BLOCK_E: tl.constexpr, ONE_TILE: tl.constexpr, LISTS_GIVEN: tl.constexpr, DYN_SCALE: tl.constexpr):
    """Zeros into the output segments of every (token tile, expert it did not pick) (and scale 1
    with a dynamic fp8 scale): fills first, first + NUM_PROGS, ..."""
    n_fill = m_tiles * E - n_pairs
    offs_f = tl.arange(0, BLOCK_I)
    for f in tl.range(first, n_fill, NUM_PROGS):
        if ONE_TILE:
            t = 0
            if LISTS_GIVEN:
                e = tl.load(lists_ptr + tl.load(counts_ptr) + f)
            else:
                e = _expert_at(pos, n_pairs + f, BLOCK_E)
        else:
            t, jj = _locate(f, counts_ptr, E, True)
            e = tl.load(lists_ptr + t * E + tl.load(counts_ptr + t) + jj)
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rows < M
        for i0 in range(0, I, BLOCK_I):
            cols = e * I + i0 + offs_f
            tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols.to(tl.int64)[None, :] * stride_yn,
                     tl.zeros((BLOCK_M, BLOCK_I), dtype=y_ptr.dtype.element_ty),
                     mask=r_ok[:, None] & ((i0 + offs_f) < I)[None, :])
        if DYN_SCALE:
            tl.store(ys_ptr + rows.to(tl.int64) * stride_ysm + e * stride_yse,
                     tl.full((BLOCK_M,), 1.0, tl.float32), mask=r_ok)


@dataclasses.dataclass(frozen=True)
class Fc1TritonConfig:
    """One FC1 tactic: token tile x tile of I (gate and up each) x k-tile, warps, pipeline depth."""

    block_m: int = 16
    block_i: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: int = 0   # 1: weights as the MMA's M operand, tokens as N (small M)
    use_tma: int = 1   # TMA tensor descriptors where the device and strides allow (else pointers)
    persistent: int = 0  # 0: one program per tile; n: n persistent programs per SM take the tiles in turn
    split_k: int = 1     # persistent only: each tile's k-range in split_k units, partial sums reduced in fp32
    stream_k: int = 0    # persistent only: 1 = every program takes an equal contiguous share of all k-steps

    backend = "triton"

    def to_str(self) -> str:
        return "fc1-triton:" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    @classmethod
    def from_str(cls, s: str) -> "Fc1TritonConfig":
        body = s.split(":", 1)[1] if ":" in s else s
        return cls(**{k: int(v) for k, v in (kv.split("=") for kv in body.split(",") if kv)})


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def can_implement(problem: Fc1Problem, config: Fc1TritonConfig, dynamic_scale: bool = False) -> tuple[bool, str]:
    """(ok, why not): the one validity check shared by the heuristic, tests and any tuner.
    ``dynamic_scale``: an fp8 output with a per-(token, expert) scale, which needs one tile to
    hold all of I."""
    c = config
    if dynamic_scale and c.block_i < problem.i:
        return False, f"a dynamic per-(token, expert) scale needs block_i >= I={problem.i}, got {c.block_i}"
    if not (_pow2(c.block_m) and 16 <= c.block_m <= 256):
        return False, f"block_m={c.block_m} must be a power of two in [16, 256]"
    if not (_pow2(c.block_i) and 16 <= c.block_i <= 256):
        return False, f"block_i={c.block_i} must be a power of two in [16, 256]"
    if not (_pow2(c.block_k) and 16 <= c.block_k <= 256):
        return False, f"block_k={c.block_k} must be a power of two in [16, 256]"
    if c.num_warps not in (1, 2, 4, 8, 16) or not 1 <= c.num_stages <= 8:
        return False, f"num_warps={c.num_warps} / num_stages={c.num_stages} out of range"
    if c.swap_ab not in (0, 1) or c.use_tma not in (0, 1):
        return False, f"swap_ab={c.swap_ab} / use_tma={c.use_tma} must be 0 or 1"
    if not 0 <= c.persistent <= 4:
        return False, f"persistent={c.persistent} must be in [0, 4]"
    if not 1 <= c.split_k <= 16 or (c.split_k > 1 and not c.persistent):
        return False, f"split_k={c.split_k} must be in [1, 16], and above 1 needs persistent >= 1"
    if c.stream_k not in (0, 1) or (c.stream_k and (not c.persistent or c.split_k > 1)):
        return False, f"stream_k={c.stream_k} must be 0 or 1, and 1 needs persistent >= 1 and split_k = 1"
    if c.split_k > -(-problem.h // c.block_k):
        return False, f"split_k={c.split_k} exceeds the {-(-problem.h // c.block_k)} k-tiles of H={problem.h}"
    if c.swap_ab and c.block_i < 64:
        return False, f"swap_ab needs block_i >= 64 (the MMA's M), got {c.block_i}"
    acc_regs = 2 * c.block_m * c.block_i // (32 * c.num_warps)
    if acc_regs > 128:
        return False, f"two {c.block_m}x{c.block_i} fp32 accumulators need {acc_regs} registers per thread (> 128)"
    smem = c.num_stages * (c.block_m + 2 * c.block_i) * c.block_k * problem.dtype.itemsize
    budget = SMEM_BYTES - _SMEM_RESERVE
    if smem > budget:
        return False, (f"{c.num_stages} stages of a {c.block_m}-token and two {c.block_i}-row k-tiles need {smem} B "
                       f"of shared memory (limit {budget})")
    if c.persistent > 1 and c.persistent * smem > budget:
        return False, f"{c.persistent} persistent programs per SM need {c.persistent} x {smem} B of shared memory"
    return True, ""


def fc1_triton(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, y: torch.Tensor,
               config: Fc1TritonConfig, *, x_scale: torch.Tensor | None = None,
               alpha_post: torch.Tensor | None = None, out_scale: torch.Tensor | None = None,
               y_scale: torch.Tensor | None = None, num_programs: int | None = None,
               routing: torch.Tensor | None = None, skip: bool = False, fill: bool = True,
               active: tuple[torch.Tensor, torch.Tensor] | None = None,
               expert_ids: torch.Tensor | None = None, x_group_scale: torch.Tensor | None = None,
               w_block_scale: torch.Tensor | None = None) -> None:
    """Launch: y [M, E*I] <- FC1(x [M, H], w1 [E*2I, H], alpha1 [E]) (checked by the op).
    ``num_programs`` overrides the persistent configs' program count (tests force several tiles
    per program on small shapes).
    ``routing`` [M, E] (any dtype, != 0: picked): y is 0 where token m did not pick expert e.
    ``skip``: expert skipping over the experts ``routing`` (else ``alpha_post``) picked
    (persistent configs only); ``fill=False`` leaves the segments of experts a token tile did
    not pick unwritten (for consumers that never read them). ``active``: (lists, counts) from
    ``active_experts(routing, block_m)`` instead of the kernel's own (probes and tests).
    ``y_scale`` [M, E] float32: an fp8 ``y`` with a dynamic per-(token, expert) scale, written
    there (the config's ``block_i`` must hold all of I). ``expert_ids`` [k] or [1, k] (M = 1,
    skip, fill=False; checked by the op): the token's distinct picked experts, used as its list.
    ``w_block_scale`` [E*2I/128, H/128] with ``x_group_scale`` [M, H/128] (block-scaled w1, x
    quantised in 1 x 128 groups; ``x_scale`` then None): both applied to every k-tile's products
    (the config's block_i and block_k must divide 128, and I be a multiple of 128)."""
    M, H = x.shape
    E = alpha1.shape[0]
    I = w1.shape[0] // (2 * E)
    if M == 0 or E == 0 or I == 0:
        return
    c = config
    blk = w_block_scale is not None
    if blk and (x_group_scale is None or x_scale is not None or 128 % c.block_i or 128 % c.block_k or I % 128):
        raise ValueError("block-scaled w1: x_group_scale (no x_scale), block_i and block_k dividing 128, I % 128 == 0")
    grid = (triton.cdiv(M, c.block_m), E * triton.cdiv(I, c.block_i))
    post = alpha_post if alpha_post is not None else alpha1
    use_tma = bool(c.use_tma) and supports_tma(x.device) and tma_compatible(x, w1)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor.from_tensor(x, [c.block_m, c.block_k])
        w_desc = TensorDescriptor.from_tensor(w1, [c.block_i, c.block_k])
    else:
        x_desc, w_desc = x, w1
    if skip and (not c.persistent or (routing is None and alpha_post is None)):
        raise ValueError("expert skipping needs a persistent config (persistent >= 1) and routing or alpha_post")
    route = routing.view(torch.uint8) if routing is not None and routing.dtype == torch.bool else routing
    common = (
        x, w1, x_desc, w_desc, alpha1, x_scale if x_scale is not None else alpha1, post,
        route if route is not None else alpha1, y,
        out_scale if out_scale is not None else alpha1, y_scale if y_scale is not None else alpha1,
        x_group_scale if blk else alpha1, w_block_scale if blk else alpha1)
    strides = (
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1),
        post.stride(0) if alpha_post is not None else 0, post.stride(1) if alpha_post is not None else 0,
        route.stride(0) if route is not None else 0, route.stride(1) if route is not None else 0,
        y.stride(0), y.stride(1),
        y_scale.stride(0) if y_scale is not None else 0, y_scale.stride(1) if y_scale is not None else 0,
        x_group_scale.stride(0) if blk else 0, w_block_scale.stride(0) if blk else 0)
    flags = dict(
        HAS_XS=x_scale is not None, HAS_POST=alpha_post is not None, HAS_ROUTE=route is not None,
        OUT_FP8=y.dtype == torch.float8_e4m3fn,
        DYN_SCALE=y_scale is not None, BLOCK_M=c.block_m, BLOCK_I=c.block_i, BLOCK_K=c.block_k,
        SWAP_AB=bool(c.swap_ab), USE_TMA=use_tma, W_BLOCK=blk, num_warps=c.num_warps, num_stages=c.num_stages,
        **launch_kwargs(x.device))
    if c.persistent:
        tiles = grid[0] * grid[1] * c.split_k  # units of work
        if c.stream_k:  # k-steps are the units of work
            tiles = grid[0] * grid[1] * triton.cdiv(H, c.block_k)
        progs = min(tiles, num_programs if num_programs is not None else sm_count(x.device) * c.persistent)
        sel = route if route is not None else alpha_post
        if skip and expert_ids is not None:  # one token: its top-k ids are the list
            if M != 1 or fill:
                raise ValueError("expert_ids: one token (M = 1) and fill=False only")
            lists, counts = expert_ids.reshape(-1), alpha1
        elif skip and active is not None:  # lists built beforehand (probes, tests)
            lists, counts = active
        elif skip:
            lists, counts = lists_scratch(grid[0], E, x.device)
        else:
            sel, lists, counts = alpha1[None, :], alpha1, alpha1
        block_e, list_rows = list_blocks(E, c.block_m)
        if c.split_k > 1 or c.stream_k:  # slots (gate and up sums) and counters, left zeroed: one per
            # tile (split_k), or one per boundary between programs' ranges (stream_k)
            slots, slot = (progs if c.stream_k else grid[0] * grid[1]), 2 * c.block_m * c.block_i
            buf = reused_zeros(slots * slot + slots, x.device)
            ws, cnt = buf[: slots * slot], buf[slots * slot:].view(torch.int32)
        else:
            ws, cnt = alpha1, alpha1
        n_ids = expert_ids.numel() if skip and expert_ids is not None else 0
        sk_tail = int(progs * STREAM_K_TAIL)
        _fc1_persistent_kernel[(progs,)](*common, sel, lists, counts, ws, cnt, M, H, I, E, progs, n_ids, sel.stride(0),
                                         sel.stride(1),
                                         *strides, SKIP=skip, NUM_STAGES=c.num_stages, BLOCK_E=block_e, FILL=fill,
                                         ONE_TILE=grid[0] == 1, LISTS_GIVEN=skip and active is not None,
                                         LIST_ROWS=list_rows, SPREAD=skip and SPREAD_UNITS, SPLIT_K=c.split_k,
                                         IDS=n_ids > 0, STREAM_K=bool(c.stream_k), SK_TAIL=sk_tail, **flags)
    else:
        _fc1_kernel[grid](*common, M, H, I, *strides, NUM_STAGES=c.num_stages, **flags)
