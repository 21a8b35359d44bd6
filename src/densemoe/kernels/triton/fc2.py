"""FC2 (dense-MoE down projection) as one Triton kernel.

Semantics (the contract; ``densemoe.reference.fc2_ref`` is its executable twin)::

    # a:       [M, E*I]  fp8 e4m3 or bf16, K-major    (FC1's output, token rows)
    # w:       [N, E*I]  same dtype as a, K-major     (each expert's [N, I] block side by side)
    # alpha:   [M, E]    float32                      (routing weight x dequant scales, 0 = not routed)
    # w_scale: [E]       float32, optional (HAS_WSCALE; 1 when absent)
    # out:     [M, N]    bf16 / fp16 / fp32
    for m, n:
        acc = 0.0                                      # fp32
        for e in range(E):
            part = sum(a[m, e*I + i] * w[n, e*I + i] for i in range(I))   # tensor cores
            acc += (alpha[m, e] * w_scale[e]) * part   # fp32, once per expert, per token row
        out[m, n] = acc.to(out.dtype)

Schedule. The work is a list of *units*: one unit is one (token tile, column tile, expert)
triple, i.e. ``I // BLOCK_K`` k-tiles of MMA followed by one fp32 scale-and-add. Units are
ordered expert-fastest inside a column tile. Programs are persistent: the token tiles each
get ``G`` programs and every program takes one contiguous slice of the ``n_tiles * E`` units
of its token tile (stream-K over experts). A program that owns every expert of a column
tile stores the result directly; otherwise it adds its partial sum into an fp32 workspace
with atomics and bumps a per-tile counter by the number of experts it covered; the program
that brings the counter to ``E`` reads the finished sum back and writes ``out``. So one launch
fills every SM whatever ``M`` is, and alpha is applied per token row once per expert.

Swap-AB (``SWAP_AB``): for small M the weight tile is the MMA's M operand (64/128 rows, the
wgmma minimum is 64) and the token tile is its N operand (16..256), so M=1 does not pay for
a 64-row token tile.

``USE_TMA`` loads both operands with tensor descriptors (Hopper TMA); without it the loads
are plain masked pointer loads, which work for any strides and alignment.
"""

from __future__ import annotations

import triton
import triton.language as tl

from densemoe.kernels.triton.pdl import launch_kwargs, pdl_enter
from densemoe.kernels.triton.skip import _tile_list, list_blocks, lists_scratch


@triton.jit
def _scale_add(acc, a, w, al, SWAP_AB: tl.constexpr, SKIP: tl.constexpr):
    """acc + one k-tile's product scaled per token row by al (rows with al = 0 add nothing under
    SKIP, whatever a holds there)."""
    if SWAP_AB:
        prod = tl.dot(w, tl.trans(a)) * al[None, :]
        if SKIP:
            prod = tl.where(al[None, :] != 0, prod, 0.0)
    else:
        prod = tl.dot(a, tl.trans(w)) * al[:, None]
        if SKIP:
            prod = tl.where(al[:, None] != 0, prod, 0.0)
    return acc + prod


@triton.jit(do_not_specialize=["M"])
def _fc2_kernel(
    a_ptr, w_ptr, a_desc, w_desc,  # pointer pair (USE_TMA=False) or descriptor pair (True)
    alpha_ptr, out_ptr, ws_ptr, cnt_ptr, lists_ptr, counts_ptr, wscale_ptr, wblk_ptr,
    M, N, E, N_IDS,
    stride_am, stride_ak, stride_wn, stride_wk,
    stride_alm, stride_ale, stride_om, stride_on, stride_wbr,
    I: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr, USE_TMA: tl.constexpr, NUM_STAGES: tl.constexpr, SKIP: tl.constexpr,
    BLOCK_E: tl.constexpr = 16, LIST_ROWS: tl.constexpr = 16, PDL: tl.constexpr = False,
    HAS_WSCALE: tl.constexpr = False, IDS: tl.constexpr = False, W_BLOCK: tl.constexpr = False,
):
    pdl_enter(PDL)
    KT: tl.constexpr = I // BLOCK_K  # k-tiles per expert
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    n_tiles = tl.cdiv(N, BLOCK_N)
    groups = tl.num_programs(0) // m_tiles  # host launches groups * m_tiles programs
    m_tile = pid % m_tiles
    g = pid // m_tiles
    off_m = m_tile * BLOCK_M
    offs_m = off_m + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    if SKIP and IDS:  # one token (M = 1): lists holds its N_IDS distinct picked experts (top-k ids)
        n_act = N_IDS
    elif SKIP:  # only the experts some token of this tile picked: lists[m_tile, :n_act]
        n_act = _tile_list(alpha_ptr, m_tile, M, E, stride_alm, stride_ale, lists_ptr, counts_ptr,
                           BLOCK_M, LIST_ROWS, BLOCK_E)
        tl.debug_barrier()  # the list this program just wrote is read back below
        if n_act == 0:  # no expert picked in this token tile: its rows of out are zeros
            rows0 = offs_m.to(tl.int64)
            for n_tile in range(g, n_tiles, groups):
                offs_n0 = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
                tl.store(out_ptr + rows0[:, None] * stride_om + offs_n0[None, :] * stride_on,
                         tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty),
                         mask=mask_m[:, None] & (offs_n0 < N)[None, :])
    else:
        n_act = E
    num_units = n_tiles * n_act
    u_begin = (g.to(tl.int64) * num_units // groups).to(tl.int32)
    u_end = ((g.to(tl.int64) + 1) * num_units // groups).to(tl.int32)

    # Column tiles this program touches: [n_first, n_last]; experts [e_lo, e_hi) of each
    # (positions in the tile's expert list when SKIP). A program with no unit touches none.
    n_div = tl.maximum(n_act, 1)
    n_first = u_begin // n_div
    n_last = (u_end - 1) // n_div
    if u_end <= u_begin:
        n_last = n_first - 1
    for n_tile in range(n_first, n_last + 1):
        e_lo = tl.maximum(u_begin - n_tile * n_act, 0)
        e_hi = tl.minimum(u_end - n_tile * n_act, n_act)
        off_n = n_tile * BLOCK_N
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # One flat, software-pipelined loop over the k-tiles of experts [e_lo, e_hi): the
        # pipeline depth is num_stages k-tiles whatever I is. Expert e = kt // KT.
        for kt in tl.range(e_lo * KT, e_hi * KT, num_stages=NUM_STAGES):
            if SKIP:
                if IDS:  # the caller's ids, unchecked: one outside [0, E) (at its own width) adds
                    # nothing (expert 0's weights read, its alpha taken as 0)
                    e = tl.load(lists_ptr + kt // KT)
                    e_ok = (e >= 0) & (e < E)
                    e = tl.where(e_ok, e, 0).to(tl.int32)
                else:
                    e = tl.load(lists_ptr + m_tile * E + kt // KT)
                k0 = e * I + (kt % KT) * BLOCK_K
            else:
                e = kt // KT
                k0 = kt * BLOCK_K
            if USE_TMA:
                w = w_desc.load([off_n, k0])
                a = a_desc.load([off_m, k0])
            else:
                offs_n = off_n + tl.arange(0, BLOCK_N)
                w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
                            + (k0 + offs_k)[None, :] * stride_wk,
                            mask=(offs_n < N)[:, None], other=0.0)
                a = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
                            + (k0 + offs_k)[None, :] * stride_ak,
                            mask=mask_m[:, None], other=0.0)
            al = tl.load(alpha_ptr + offs_m * stride_alm + e * stride_ale, mask=mask_m, other=0.0)
            if SKIP and IDS:
                al = tl.where(e_ok, al, 0.0)
            if HAS_WSCALE:
                al = al * tl.load(wscale_ptr + e)
            if W_BLOCK:  # 128 x 128 block-scaled w: every k-tile's product scaled in fp32 (DeepGEMM's
                # promotion) by alpha and the scale of w's block (BLOCK_N and BLOCK_K divide 128)
                al = al * tl.load(wblk_ptr + (off_n // 128) * stride_wbr + k0 // 128)
                acc = _scale_add(acc, a, w, al, SWAP_AB, SKIP)
            elif KT == 1:  # a k-tile is a whole expert: scale its product and add
                acc = _scale_add(acc, a, w, al, SWAP_AB, SKIP)
            else:  # accumulate the expert's KT k-tiles in `part`, then one scale-and-add
                if SWAP_AB:
                    part = tl.dot(w, tl.trans(a), part, max_num_imprecise_acc=a.shape[1])  # fp8: gate_up.py
                    add = part * al[None, :]
                    if SKIP:
                        add = tl.where(al[None, :] != 0, add, 0.0)
                else:
                    part = tl.dot(a, tl.trans(w), part, max_num_imprecise_acc=a.shape[1])
                    add = part * al[:, None]
                    if SKIP:
                        add = tl.where(al[:, None] != 0, add, 0.0)
                scaled = acc + add
                last = (kt % KT) == KT - 1
                acc = tl.where(last, scaled, acc)
                part = tl.where(last, 0.0, part)

        # Flush the column tile: direct store if we own all E experts, else reduce.
        offs_n = off_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows = offs_m.to(tl.int64)
        if SWAP_AB:
            o_offs = rows[None, :] * stride_om + offs_n[:, None] * stride_on
            ws_offs = rows[None, :] * N + offs_n[:, None]
            o_mask = mask_m[None, :] & mask_n[:, None]
        else:
            o_offs = rows[:, None] * stride_om + offs_n[None, :] * stride_on
            ws_offs = rows[:, None] * N + offs_n[None, :]
            o_mask = mask_m[:, None] & mask_n[None, :]
        if (e_lo == 0) & (e_hi == n_act):
            tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            tl.atomic_add(ws_ptr + ws_offs, acc, mask=o_mask, sem="relaxed")
            tl.debug_barrier()  # every thread's partial is issued before the release below
            covered = e_hi - e_lo
            done = tl.atomic_add(cnt_ptr + m_tile * n_tiles + n_tile, covered, sem="acq_rel")
            if done + covered == n_act:  # last contributor: the sum is complete
                total = tl.load(ws_ptr + ws_offs, mask=o_mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + o_offs, total.to(out_ptr.dtype.element_ty), mask=o_mask)
                # leave the tile's workspace and counter at zero: the next launch reuses them. (The
                # barrier first: without it the H100 wrote zeros into out's rows 2-3 of a tile now
                # and then with a bf16 out, the two stores' shared-memory staging overlapping.)
                tl.debug_barrier()
                tl.store(ws_ptr + ws_offs, tl.zeros_like(total), mask=o_mask)
                tl.store(cnt_ptr + m_tile * n_tiles + n_tile, 0)


# --------------------------------------------------------------------------------------------
# Host side: config, validity, launch.
# --------------------------------------------------------------------------------------------

import dataclasses  # noqa: E402
import functools  # noqa: E402

import torch  # noqa: E402

from densemoe._runtime import sm_count, supports_tma  # noqa: E402
from densemoe.kernels.common import (SMEM_BYTES, Fc2Problem, split_workspace, tiles_cut,  # noqa: E402
                                     tma_compatible)

_SMEM_RESERVE = 1024  # barriers, alpha ring
_MAX_ACC_REGS = 192  # fp32 registers per thread for the two accumulators (acc + per-expert part)


@dataclasses.dataclass(frozen=True)
class Fc2TritonConfig:
    """One tactic of the Triton FC2 kernel. Every field is a compile-time or launch choice.

    block_m:     token tile (MMA N operand when swap_ab, else MMA M operand)
    block_n:     output-column tile (MMA M operand when swap_ab)
    block_k:     k-tile; must divide I (an expert is I // block_k k-tiles, then one alpha FMA)
    num_warps, num_stages: Triton's; num_stages is the depth of the load pipeline
    swap_ab:     compute out^T = w @ a^T (small M) instead of out = a @ w^T
    use_tma:     tensor-descriptor (TMA) loads; needs sm_90+, K-major operands, 16-byte alignment
    split:       how a column tile's E experts are shared among programs.
                 0: stream-K, one wave of ``ctas_per_sm * SMs`` programs shares all
                 (column tile, expert) units evenly (tiles may be cut anywhere);
                 s >= 1: each column tile is cut into s equal expert ranges, one program
                 each (s = 1: no split, no workspace, no atomics). Cut tiles are reduced in
                 an fp32 workspace with atomics; the last program to finish a tile writes it.
    ctas_per_sm: programs meant to share an SM: the shared-memory ring must fit 1/ctas_per_sm of
                 it (so the MMA of one overlaps the epilogue math of another); for split=0
                 it also sets the wave size
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    swap_ab: bool = True
    use_tma: bool = True
    split: int = 0
    ctas_per_sm: int = 1

    backend = "triton"  # class attribute, not a field

    def to_str(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_str(s: str) -> "Fc2TritonConfig":
        kw = {}
        types = {f.name: f.type for f in dataclasses.fields(Fc2TritonConfig)}
        for item in s.split(","):
            k, v = item.split("=")
            t = types[k]
            kw[k] = (v == "True") if t in (bool, "bool") else int(v)
        return Fc2TritonConfig(**kw)

    def smem_bytes(self, dtype: torch.dtype) -> int:
        """The load ring: num_stages x (a tile + w tile)."""
        return self.num_stages * (self.block_m + self.block_n) * self.block_k * dtype.itemsize


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def can_implement(problem: Fc2Problem, config: Fc2TritonConfig) -> tuple[bool, str]:
    """Whether ``config`` can run ``problem``; the reason when it cannot.

    The single validity rule: the heuristic, the tests and the tuner all go through it.
    """
    c, p = config, problem
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(c, name)
        if not _pow2(v) or not 16 <= v <= 256:
            return False, f"{name}={v} must be a power of two in [16, 256] (TMA box limit)"
    min_k = 32 if p.dtype == torch.float8_e4m3fn else 16
    if c.block_k < min_k:
        return False, f"block_k={c.block_k} below the MMA's k ({min_k}) for {p.dtype}"
    if p.i % c.block_k:
        return False, f"block_k={c.block_k} does not divide I={p.i}"
    if c.num_warps not in (4, 8):
        return False, f"num_warps={c.num_warps} not in (4, 8)"
    if c.num_stages < 1:
        return False, "num_stages must be >= 1"
    if c.split < 0:
        return False, f"split={c.split} must be >= 0"
    if c.ctas_per_sm not in (1, 2, 3, 4):
        return False, f"ctas_per_sm={c.ctas_per_sm} not in 1..4"
    smem = c.smem_bytes(p.dtype) + _SMEM_RESERVE
    if smem * c.ctas_per_sm > SMEM_BYTES:
        return False, (f"needs {smem} B of shared memory per program "
                       f"(limit {SMEM_BYTES} / ctas_per_sm={c.ctas_per_sm})")
    regs = 2 * c.block_m * c.block_n // (32 * c.num_warps)
    if regs > _MAX_ACC_REGS:
        return False, f"accumulators need {regs} registers per thread (limit {_MAX_ACC_REGS})"
    return True, ""


def _grid_groups(problem: Fc2Problem, config: Fc2TritonConfig, wave: int) -> tuple[int, int]:
    """(token tiles, programs per token tile) for a wave of ``wave`` programs."""
    m_tiles = triton.cdiv(problem.m, config.block_m)
    n_tiles = triton.cdiv(problem.n, config.block_n)
    if config.split == 0:
        groups = max(1, wave // m_tiles)
    else:
        groups = config.split * n_tiles
    return m_tiles, min(groups, n_tiles * problem.e)


def fc2_triton(a: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor,
               config: Fc2TritonConfig, *, num_programs: int | None = None, skip: bool = False,
               w_scale: torch.Tensor | None = None, expert_ids: torch.Tensor | None = None,
               w_block_scale: torch.Tensor | None = None) -> None:
    """Launch the kernel: out[M, N] <- FC2(a [M, K], w [N, K], alpha [M, E]).

    Inputs are assumed validated (``densemoe.ops.fc2`` does that). ``num_programs`` overrides
    the wave size of split=0 (tests use it to force splits on the CPU interpreter).
    ``skip``: expert skipping, each token tile walks only the experts its tokens picked
    (listed by the kernel itself from alpha, ``kernels/triton/skip.py``).
    ``w_scale`` [E] float32: a per-expert factor multiplied into alpha in the kernel.
    ``expert_ids`` [k] or [1, k] (skip, M = 1; checked by the op): the token's distinct picked
    experts (its top-k ids), walked instead of a list built from alpha.
    ``w_block_scale`` [N/128, K/128] float32: w's 128 x 128 block scales, applied to every
    k-tile's product (the config's block_n and block_k must divide 128).
    """
    M, K = a.shape
    N = w.shape[0]
    E = alpha.shape[1]
    problem = Fc2Problem(M, N, E, K // E, a.dtype, out.dtype)
    ok, why = can_implement(problem, config)
    if not ok:
        raise ValueError(f"config {config} cannot run {problem}: {why}")
    if w_block_scale is not None and (128 % config.block_n or 128 % config.block_k):
        raise ValueError(f"config {config}: with block-scaled w, block_n and block_k must divide 128")
    if M == 0 or N == 0:
        return
    wave = num_programs if num_programs is not None else sm_count(a.device) * config.ctas_per_sm
    m_tiles, groups = _grid_groups(problem, config, wave)
    n_tiles = triton.cdiv(N, config.block_n)
    # with skipping a tile's unit count is only known on the GPU: any split may cut a tile,
    # except one program per column tile (split=1), which always holds all of its experts
    cut = (config.split != 1 and groups > 1) if skip else tiles_cut(n_tiles, E, groups)
    # The reused workspace (no memset) with skipping only: on the dense path (large M) its lines
    # are cold in L2 when the atomics come, where a fresh memset leaves them hot (docs/skipping.md).
    ws, cnt = split_workspace(M, N, m_tiles, n_tiles, cut, a.device, reuse=skip)
    ids = skip and expert_ids is not None
    if ids and M != 1:
        raise ValueError("expert_ids: one token (M = 1) only")
    lists, counts = lists_scratch(m_tiles, E, a.device) if skip and not ids else (cnt, cnt)
    if ids:
        lists = expert_ids.reshape(-1)
    block_e, list_rows = list_blocks(E, config.block_m)
    use_tma = config.use_tma and supports_tma(a.device) and tma_compatible(a, w)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor.from_tensor(a, [config.block_m, config.block_k])
        w_desc = TensorDescriptor.from_tensor(w, [config.block_n, config.block_k])
    else:
        a_desc, w_desc = a, w
    _fc2_kernel[(m_tiles * groups,)](
        a, w, a_desc, w_desc, alpha, out, ws, cnt, lists, counts, w_scale if w_scale is not None else alpha,
        w_block_scale if w_block_scale is not None else alpha,
        M, N, E, expert_ids.numel() if ids else 0,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1),
        alpha.stride(0), alpha.stride(1), out.stride(0), out.stride(1),
        w_block_scale.stride(0) if w_block_scale is not None else 0,
        I=K // E,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SWAP_AB=config.swap_ab, USE_TMA=use_tma, NUM_STAGES=config.num_stages, SKIP=skip,
        BLOCK_E=block_e, LIST_ROWS=list_rows, HAS_WSCALE=w_scale is not None, IDS=ids,
        W_BLOCK=w_block_scale is not None,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_kwargs(a.device),
    )
