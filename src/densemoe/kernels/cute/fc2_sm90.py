"""FC2 (dense-MoE down projection) for Hopper (sm_90a) in NVIDIA's CuTe DSL.

Semantics: the same contract as the Triton kernel (``densemoe.reference.fc2_ref`` is the twin)::

    # a:     [M, E*I]  fp8 e4m3 or bf16, K-major, contiguous
    # w:     [N, E*I]  same dtype, K-major, contiguous
    # alpha: [M, E]    float32, contiguous
    # out:   [M, N]    bf16 / fp16 / fp32, contiguous
    for m, n:
        acc = 0.0                                                         # fp32
        for e in range(E):
            part = sum(a[m, e*I + i] * w[n, e*I + i] for i in range(I))   # wgmma, fp32
            acc += alpha[m, e] * part                                     # fp32, once per expert
        out[m, n] = acc.to(out.dtype)

Kernel. Two orientations (``swap_ab``): swapped, the MMA computes out^T = w @ a^T, so the
weight tile is wgmma's M operand (64 rows per consumer warpgroup atom) and the token tile its
N operand (16..256): M = 1 costs a 16-wide token tile, not a 64-row one. Unswapped, tokens are
wgmma's M (64 rows per consumer warpgroup) and weights its N (up to 256): alpha is then per
accumulator row (2 values per thread, not tile_m / 4), which leaves registers for wide tiles
at large M.

* Work list. One *unit* = (column tile group, token tile group, expert): ``I / tile_k``
  k-tiles of MMA, then one fp32 scale-and-add. Units are ordered expert-fastest, then column
  tile, then token tile, and the ``G`` clusters of the launch (at most one wave) each take
  one contiguous slice of them (stream-K over experts): every SM gets the same number of
  bytes to stream whatever M is. With ``G`` a multiple of the token-tile groups (the
  launcher rounds it down when it can), the clusters working on different token tiles walk
  the same (column tile, expert) sequence in lock step, so each weight tile comes from DRAM
  once and from L2 for the other token tiles. A slice that covers a whole tile stores it; a slice that
  covers part of one adds its partial sum into an fp32 workspace (``red.global.add``) and
  bumps the tile's counter by the number of experts it covered; the CTA that brings the
  counter to E reads the sum back and writes ``out``.
* Warp specialisation. Warpgroup 0 is the producer: one warp issues TMA loads of the w and a
  tiles into a ``stages``-deep shared-memory ring guarded by mbarriers (``PipelineTmaAsync``).
  Warpgroups 1.. are consumers issuing wgmma. The producer gives its registers away
  (``setmaxnreg``) to the consumers. (This skeleton, shared with ``fc1_sm90``, is in ``hopper``.)
* Per expert the consumers accumulate the expert's k-tiles into a temporary accumulator
  (wgmma with ``ACCUMULATE=False`` on the first k-block), then promote it once:
  ``acc += tmp * alpha[m, e]`` per token column. With ``acc_buffers=2`` experts alternate
  between two temporaries and the promotion of expert e runs while expert e+1's wgmmas are
  in flight, so the tensor cores do not wait for the scale-and-add.
* fp8 promotion (``promote=1``): each 128 of k (``hopper.PROMOTE_K``; a k-tile of 256 bytes
  is two) go into the temporary (wgmma's scale-d = 0 on the first k-block), are waited for and
  added, times alpha, into the fp32 accumulator. Hopper's fp8 wgmma keeps a reduced-precision
  sum inside its accumulator, so promoting once per expert sums all of I there (24 k-steps of
  32 at Qwen3-30B-A3B's I = 768; docs/trust.md). With two consumer
  warpgroups (not held in step) one warpgroup's wgmmas run while the other waits and adds.
* Alpha is read straight from global memory (L2-resident, a few KB per tile) into
  registers one expert ahead of its use: no loader warp, no shared-memory staging.
* Clusters (``cluster_n``, ``cluster_m``): CTAs of a cluster work on neighbouring column
  tiles (``cluster_n``) and/or token tiles (``cluster_m``) of the same experts in lock
  step; the token tile they share is TMA-multicast across ``cluster_n`` CTAs and the weight
  tile across ``cluster_m`` CTAs, halving the L2->SM traffic of the shared operand.

Constraints live in ``can_implement``; ``densemoe.ops.fc2`` falls back to Triton for
anything this kernel cannot run (strided inputs, CuTe DSL missing, not sm_90).
"""



import dataclasses
import functools

import torch

from densemoe.kernels.cute import hopper
from densemoe.kernels.cute.hopper import (  # shared with FC1; re-exported, the package and tests use them
    MAX_ACC_REGS,
    SMEM_BYTES,
    SMEM_RESERVE,
    cutlass_dtype,
    cute_available,
    max_active_clusters,
    ptr,
)
from densemoe.kernels.common import Fc2Problem, split_workspace, tiles_cut


@dataclasses.dataclass(frozen=True)
class Fc2CuteConfig:
    """One tactic of the CuTe DSL FC2 kernel (sm_90a). Every field is a compile-time choice
    except ``ctas`` which only sizes the launch.

    tile_n:      output columns per CTA = wgmma M: 64 * consumer warpgroups * atoms (64..256)
    tile_m:      tokens per CTA = wgmma N: a multiple of 16 in [16, 256]
    tile_k:      k-tile: 128 or 256 bytes per row (fp8 128/256, bf16 64/128); must divide I
    stages:      depth of the shared-memory load ring (0 = as deep as shared memory allows)
    consumers:   consumer warpgroups (1 or 2); each owns tile_n / consumers rows
    acc_buffers: per-expert temporaries (1 or 2); 2 overlaps promotion with the next MMA
    cluster_n:   CTAs per cluster along columns (share, and multicast, the token tile)
    cluster_m:   CTAs per cluster along tokens (share, and multicast, the weight tile)
    ctas:        CTAs launched (0 = one per SM, rounded to whole clusters); the work
                 list is split evenly between the clusters
    swap_ab:     1: weights are wgmma's M operand, tokens its N (small M: a token tile can
                 be 16 wide). 0: tokens are wgmma's M (tile_m = 64 * consumers), weights
                 its N (tile_n up to 256): alpha is then per accumulator row, 2 values per
                 thread instead of tile_m / 4, which leaves the registers for wide tiles
    lockstep:    1: each tile visits the experts in a rotated order chosen so that every
                 cluster works on (nearly) the same expert at the same time: the token
                 tile's L2 working set is a few experts wide, not all of ``a`` (large M)
    promote:     fp8 only, with acc_buffers=1. 0: an expert's k-tiles accumulate in one
                 temporary at Hopper's reduced fp8 precision and are promoted once; 1: each
                 128 of k is promoted (acc += tmp * alpha), cuBLAS's precision without
                 fast accumulation
    """

    tile_n: int = 128
    tile_m: int = 16
    tile_k: int = 128
    stages: int = 0
    consumers: int = 1
    acc_buffers: int = 1
    cluster_n: int = 1
    cluster_m: int = 1
    ctas: int = 0
    swap_ab: int = 1
    lockstep: int = 0
    promote: int = 0

    backend = "cute"

    def to_str(self) -> str:
        return "cute:" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_str(s: str) -> "Fc2CuteConfig":
        s = s.removeprefix("cute:")  # fields a string lacks (promote, before it existed): defaults
        return Fc2CuteConfig(**{k: int(v) for k, v in (item.split("=") for item in s.split(","))})

    @property
    def cluster_size(self) -> int:
        return self.cluster_n * self.cluster_m

    def stage_bytes(self, dtype: torch.dtype) -> int:
        return (self.tile_n + self.tile_m) * self.tile_k * dtype.itemsize

    def resolved_stages(self, dtype: torch.dtype) -> int:
        if self.stages:
            return self.stages
        return min(16, (SMEM_BYTES - SMEM_RESERVE) // self.stage_bytes(dtype))


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def can_implement(problem: Fc2Problem, config: Fc2CuteConfig) -> tuple[bool, str]:
    """Whether ``config`` can run ``problem`` on the CuTe sm_90a kernel; the reason if not.

    Shape and config rules only (no device queries): the op adds the runtime rules
    (contiguity, alignment, device, CuTe DSL installed).
    """
    c, p = config, problem
    if p.dtype not in (torch.float8_e4m3fn, torch.bfloat16):
        return False, f"input dtype {p.dtype} not supported (fp8 e4m3 or bf16)"
    if p.out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False, f"out dtype {p.out_dtype} not supported"
    if c.consumers not in (1, 2):
        return False, f"consumers={c.consumers} not in (1, 2)"
    if c.swap_ab not in (0, 1):
        return False, f"swap_ab={c.swap_ab} not in (0, 1)"
    if c.lockstep not in (0, 1):
        return False, f"lockstep={c.lockstep} not in (0, 1)"
    if c.swap_ab:
        if c.tile_n not in (64, 128, 192, 256) or c.tile_n % (64 * c.consumers):
            return False, f"tile_n={c.tile_n} must be 64/128/192/256 and a multiple of 64 * consumers"
        m_mult = 16  # the accumulator's value mode is (2, 2, tile_m / 8) only from 16 up
        if not (m_mult <= c.tile_m <= 256 and c.tile_m % m_mult == 0):
            return False, f"tile_m={c.tile_m} must be a multiple of {m_mult} in [{m_mult}, 256] (wgmma N)"
    else:
        if c.tile_m != 64 * c.consumers:
            return False, f"tile_m={c.tile_m} must be 64 * consumers without swap_ab (one wgmma M atom each)"
        if not (32 <= c.tile_n <= 256 and c.tile_n % 32 == 0):
            return False, f"tile_n={c.tile_n} must be a multiple of 32 in [32, 256] (wgmma N) without swap_ab"
    row_bytes = c.tile_k * p.dtype.itemsize
    if row_bytes not in (128, 256):
        return False, f"tile_k={c.tile_k} must give 128 or 256 bytes per row for {p.dtype} (128B swizzle atoms)"
    if p.i % c.tile_k:
        return False, f"tile_k={c.tile_k} does not divide I={p.i}"
    if (p.k * p.dtype.itemsize) % 16:
        return False, f"K={p.k} rows are not 16-byte aligned (TMA)"
    if c.acc_buffers not in (1, 2):
        return False, f"acc_buffers={c.acc_buffers} not in (1, 2)"
    if c.promote not in (0, 1):
        return False, f"promote={c.promote} not in (0, 1)"
    if c.promote and p.dtype != torch.float8_e4m3fn:
        return False, "promote=1 is for fp8 inputs (bf16 wgmma accumulates in fp32 already)"
    if c.promote and c.acc_buffers != 1:
        return False, "promote=1 needs acc_buffers=1 (the k-tile's temporary is added before the next k-tile)"
    # accumulator + temporaries, plus two alpha vectors (swap_ab: tile_m / 4 token columns per
    # thread; otherwise 2 token rows per thread)
    alpha_regs = 2 * (c.tile_m // 4) if c.swap_ab else 2 * 2
    regs = (1 + c.acc_buffers) * c.tile_n * c.tile_m // (128 * c.consumers) + alpha_regs
    if regs > MAX_ACC_REGS:
        return False, (f"accumulators and alpha need {regs} fp32 registers per thread "
                       f"(limit {MAX_ACC_REGS}; measured: more spills)")
    if c.cluster_n not in (1, 2) or c.cluster_m not in (1, 2, 3, 4):
        return False, f"cluster ({c.cluster_n}, {c.cluster_m}) must be 1 or 2 along columns, 1 to 4 along tokens"
    if c.tile_n % (8 * c.cluster_m):
        return False, (f"cluster_m={c.cluster_m} multicasts tile_n / cluster_m = {c.tile_n / c.cluster_m:g} "
                       f"weight rows per CTA; must be a multiple of 8")
    stages = c.resolved_stages(p.dtype)
    if stages < 2:
        return False, f"stages={stages} must be >= 2"
    kt = p.i // c.tile_k
    if c.acc_buffers == 2 and (kt > 8 or stages < 2 * kt + 1):
        return False, (f"acc_buffers=2 holds two experts' k-tiles ({kt} each, unrolled): needs "
                       f"I / tile_k <= 8 and stages >= {2 * kt + 1} (have {stages})")
    smem = stages * c.stage_bytes(p.dtype) + SMEM_RESERVE
    if smem > SMEM_BYTES:
        return False, f"{stages} stages need {smem} B of shared memory (limit {SMEM_BYTES})"
    if c.ctas < 0 or (c.ctas and c.ctas % c.cluster_size):
        return False, f"ctas={c.ctas} must be 0 or a positive multiple of the cluster size"
    return True, ""


# ----------------------------------------------------------------------------------------
# The kernel. Everything below imports cutlass lazily: the module is importable (and the
# config / can_implement usable) without CuTe DSL installed.
# ----------------------------------------------------------------------------------------


def _build_kernel_class():
    """Define the kernel class (needs cutlass); called once."""
    import cutlass
    import cutlass.cute as cute
    import cutlass.pipeline as pipeline
    import cutlass.memory  # noqa: F401  (cutlass.memory.SmemAllocator)
    from cutlass import Float32, Int32

    class Fc2Sm90:
        def __init__(self, cfg: Fc2CuteConfig, ab_dtype, out_dtype, n: int, e: int, i: int):
            self.cfg = cfg
            self.ab_dtype = ab_dtype
            self.out_dtype = out_dtype
            self.N, self.E, self.I = n, e, i
            self.K = e * i
            self.tile_n, self.tile_m, self.tile_k = cfg.tile_n, cfg.tile_m, cfg.tile_k
            self.kt_per_expert = i // cfg.tile_k
            self.consumers = cfg.consumers
            self.acc_buffers = cfg.acc_buffers
            self.cluster = (cfg.cluster_n, cfg.cluster_m)
            self.swap = bool(cfg.swap_ab)
            self.lockstep = bool(cfg.lockstep)
            self.promote = bool(cfg.promote)
            # fp32 alpha values per consumer thread: one per token column it holds (swap_ab),
            # or one per accumulator row (2)
            self.alpha_n = cfg.tile_m // 4 if self.swap else 2
            self.num_mcast_w = cfg.cluster_m  # w tile shared by CTAs with other token tiles
            self.num_mcast_a = cfg.cluster_n  # a tile shared by CTAs with other column tiles
            self.threads = 128 * (1 + cfg.consumers)
            self.num_consumer_threads = 128 * cfg.consumers
            self.stages = cfg.resolved_stages(
                torch.float8_e4m3fn if ab_dtype.width == 8 else torch.bfloat16)
            self.n_groups = -(-n // (cfg.tile_n * cfg.cluster_n))
            self.epi_barrier = pipeline.NamedBarrier(barrier_id=1, num_threads=self.num_consumer_threads)

        # ---------------------------------------------------------------- host side
        @cute.jit
        def __call__(self, w_ptr: cute.Pointer, a_ptr: cute.Pointer, alpha_ptr: cute.Pointer,
                     out_ptr: cute.Pointer, ws_ptr: cute.Pointer, cnt_ptr: cute.Pointer,
                     m: Int32, ld_alpha: Int32, ld_out: Int32, num_clusters: Int32, stream):
            N, K, E = self.N, self.K, self.E
            mW = cute.make_tensor(w_ptr, cute.make_layout((N, K), stride=(K, 1)))
            mA = cute.make_tensor(a_ptr, cute.make_layout((m, K), stride=(K, 1)))
            mAlpha = cute.make_tensor(alpha_ptr, cute.make_layout((m, E), stride=(ld_alpha, 1)))
            mOut = cute.make_tensor(out_ptr, cute.make_layout((m, N), stride=(ld_out, 1)))
            mWs = cute.make_tensor(ws_ptr, cute.make_layout((m, N), stride=(N, 1)))

            self.tiled_mma = hopper.tiled_mma(self.ab_dtype, self.consumers, self.tile_m if self.swap else self.tile_n)
            w_layout = hopper.smem_layout(self.ab_dtype, self.tile_k, self.tile_n, self.stages)
            a_layout = hopper.smem_layout(self.ab_dtype, self.tile_k, self.tile_m, self.stages)
            self.w_smem_layout, self.a_smem_layout = w_layout, a_layout
            tma_w, tma_tw = hopper.tma_atom(mW, w_layout, self.tile_n, self.tile_k, self.num_mcast_w)
            tma_a, tma_ta = hopper.tma_atom(mA, a_layout, self.tile_m, self.tile_k, self.num_mcast_a)

            @cute.struct
            class SharedStorage:
                pipe_mbar: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
                flag: cute.struct.MemRange[Int32, 4]
                sW: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(w_layout)], 1024]
                sA: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(a_layout)], 1024]

            self.shared_storage = SharedStorage
            hopper.launch(self.kernel(tma_w, tma_tw, tma_a, tma_ta, mAlpha, mOut, mWs, cnt_ptr, m,
                                      self.tiled_mma, w_layout, a_layout),
                          num_clusters, self.cluster, self.threads, stream)

        # ---------------------------------------------------------------- device side
        @cute.kernel
        def kernel(self, tma_w: cute.CopyAtom, mW: cute.Tensor, tma_a: cute.CopyAtom, mA: cute.Tensor,
                   mAlpha: cute.Tensor, mOut: cute.Tensor, mWs: cute.Tensor, cnt_ptr: cute.Pointer,
                   m: Int32, tiled_mma: cute.TiledMma,
                   w_smem_layout: cute.ComposedLayout, a_smem_layout: cute.ComposedLayout):
            tile_n, tile_m, tile_k = self.tile_n, self.tile_m, self.tile_k
            E, KT = self.E, self.kt_per_expert
            cn, cm = self.cluster
            tidx, _, _ = cute.arch.thread_idx()
            warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
            if warp_idx == 0:
                cute.nvgpu.cpasync.prefetch_descriptor(tma_w)
                cute.nvgpu.cpasync.prefetch_descriptor(tma_a)

            # ---- cluster coordinates and multicast masks (w: to the CTAs on other token tiles,
            # a: to the CTAs on other column tiles)
            cta_layout, ccoord, w_mask, a_mask, cluster_id, num_clusters = hopper.cluster_coords(self.cluster)

            # ---- shared memory and the load pipeline
            smem = cutlass.memory.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            w_one = cute.slice_(w_smem_layout, (None, None, 0))
            a_one = cute.slice_(a_smem_layout, (None, None, 0))
            tx_bytes = cute.size_in_bytes(self.ab_dtype, w_one) + cute.size_in_bytes(self.ab_dtype, a_one)
            mcast_size = self.num_mcast_w + self.num_mcast_a - 1
            pipe = hopper.load_pipeline(storage.pipe_mbar.data_ptr(), self.stages, tx_bytes, cta_layout, self.cluster,
                                        mcast_size, self.consumers)
            sW = hopper.staged_tensor(storage.sW, w_smem_layout)
            sA = hopper.staged_tensor(storage.sA, a_smem_layout)
            flag = storage.flag.get_tensor(cute.make_layout(4))

            # ---- global tiles: (rows, tile_k, row tiles, k tiles)
            gW = cute.local_tile(mW, (tile_n, tile_k), (None, None))
            gA = cute.local_tile(mA, (tile_m, tile_k), (None, None))
            tWsW, tWgW = hopper.tma_slices(tma_w, ccoord[1], cm, sW, gW)
            tAsA, tAgA = hopper.tma_slices(tma_a, ccoord[0], cn, sA, gA)

            # ---- the work list: units [u0, u1) of this cluster
            m_tiles = (m + tile_m - 1) // tile_m
            m_groups = (m_tiles + cm - 1) // cm
            tiles = self.n_groups * m_groups
            units = tiles * E
            u0 = Int32(cutlass.Int64(cluster_id) * cutlass.Int64(units) // cutlass.Int64(num_clusters))
            u1 = Int32(cutlass.Int64(cluster_id + 1) * cutlass.Int64(units) // cutlass.Int64(num_clusters))

            pipeline.pipeline_init_wait(cluster_shape_mn=self.cluster)
            warp_group = cute.arch.make_warp_uniform(tidx // 128)

            if warp_group == 0:  # ------------------------------------------ producer
                hopper.producer_role()
                if warp_idx == 0:
                    state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
                    for u in range(u0, u1):
                        tile = u // E
                        e = self._expert(u, tile, units, num_clusters)
                        mg = tile // self.n_groups
                        ng = tile - mg * self.n_groups
                        n_tile = ng * cn + ccoord[0]
                        m_tile = mg * cm + ccoord[1]
                        for kt in cutlass.range(KT, unroll=1):
                            k_tile = e * KT + kt
                            pipe.producer_acquire(state)
                            bar = pipe.producer_get_barrier(state)
                            cute.copy(tma_w, tWgW[(None, n_tile, k_tile)], tWsW[(None, state.index)],
                                      tma_bar_ptr=bar, mcast_mask=w_mask)
                            cute.copy(tma_a, tAgA[(None, m_tile, k_tile)], tAsA[(None, state.index)],
                                      tma_bar_ptr=bar, mcast_mask=a_mask)
                            pipe.producer_commit(state)
                            state.advance()
                    pipe.producer_tail(state)
            else:  # --------------------------------------------------------- consumers
                ctid, wg_mma, thr_mma = hopper.consumer_role(tiled_mma, warp_group, tidx)
                # tCrA / tCrB: wgmma's A and B operands (w and a when swapped, else a and w)
                if cutlass.const_expr(self.swap):
                    tCrA = tiled_mma.make_fragment_A(wg_mma.partition_A(sW))
                    tCrB = tiled_mma.make_fragment_B(wg_mma.partition_B(sA))
                    cC = cute.make_identity_tensor((tile_n, tile_m))  # (column, token)
                else:
                    tCrA = tiled_mma.make_fragment_A(wg_mma.partition_A(sA))
                    tCrB = tiled_mma.make_fragment_B(wg_mma.partition_B(sW))
                    cC = cute.make_identity_tensor((tile_m, tile_n))  # (token, column)
                tCcC = thr_mma.partition_C(cC)
                acc = cute.make_rmem_tensor(tCcC.shape, Float32)
                tmp0 = cute.make_rmem_tensor(tCcC.shape, Float32)
                tmp1 = cute.make_rmem_tensor(tCcC.shape, Float32)
                alpha_cur = cute.make_rmem_tensor((self.alpha_n,), Float32)
                alpha_nxt = cute.make_rmem_tensor((self.alpha_n,), Float32)
                read = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)

                acc.fill(0.0)
                tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
                if u0 < u1:
                    self._load_alpha(alpha_nxt, mAlpha, tCcC, u0, m_groups, num_clusters, ccoord[1], m)
                if cutlass.const_expr(self.promote):
                    # per PROMOTE_K of k: tmp0 from zero (scale-d 0 on the first k-block), wait,
                    # acc += tmp0 * alpha (the stage released after its last chunk); the unit's
                    # alpha is rotated in first
                    num_kb = cute.size(tCrA, mode=[2])
                    chunk = hopper.promote_blocks(num_kb)  # hopper.PROMOTE_K of k a promotion
                    # (hopper.mainloop_promoted's step, written out: ACCUMULATE set from a
                    # trace-time helper inside this dynamic loop fails IR verification)
                    for u in range(u0, u1):
                        self._next_alpha(u, u1, m_groups, num_clusters, ccoord, alpha_cur, alpha_nxt, mAlpha, tCcC, m)
                        for kt in cutlass.range(self.kt_per_expert, unroll=1):
                            pipe.consumer_wait(read)
                            for c0 in cutlass.range_constexpr(0, num_kb, chunk):
                                cute.nvgpu.warpgroup.fence()
                                for kb in cutlass.range_constexpr(c0, c0 + chunk):
                                    coord = (None, None, kb, read.index)
                                    tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, kb > c0)
                                    cute.gemm(tiled_mma, tmp0, tCrA[coord], tCrB[coord], tmp0)
                                cute.nvgpu.warpgroup.commit_group()
                                cute.nvgpu.warpgroup.wait_group(0)
                                if c0 + chunk == num_kb:
                                    pipe.consumer_release(release)
                                    release.advance()
                                    read.advance()
                                self._promote(acc, tmp0, alpha_cur)
                        self._close(u, u0, u1, m_groups, num_clusters, ccoord, acc, tCcC, mOut, mWs, cnt_ptr, flag,
                                    m, ctid)
                elif cutlass.const_expr(self.acc_buffers == 1):
                    for u in range(u0, u1):
                        read, release = hopper.mainloop(tiled_mma, pipe, read, release, self.kt_per_expert,
                                                        ((tmp0, tCrA, tCrB),))
                        self._finish(u, u0, u1, m_groups, num_clusters, ccoord, tmp0, acc, alpha_cur, alpha_nxt, mAlpha,
                                     tCcC, mOut, mWs, cnt_ptr, flag, m, ctid)
                else:
                    # two temporaries: unit u's wgmmas run while unit u-1 is promoted
                    for up in range(u0, u1, 2):
                        read = self._issue(tiled_mma, pipe, read, tCrA, tCrB, tmp0)
                        if up > u0:
                            cute.nvgpu.warpgroup.wait_group(1)
                            release = self._release(pipe, release)
                            self._finish(up - 1, u0, u1, m_groups, num_clusters, ccoord, tmp1, acc, alpha_cur, alpha_nxt,
                                         mAlpha, tCcC, mOut, mWs, cnt_ptr, flag, m, ctid)
                        if up + 1 < u1:
                            read = self._issue(tiled_mma, pipe, read, tCrA, tCrB, tmp1)
                            cute.nvgpu.warpgroup.wait_group(1)
                        else:
                            cute.nvgpu.warpgroup.wait_group(0)
                        release = self._release(pipe, release)
                        self._finish(up, u0, u1, m_groups, num_clusters, ccoord, tmp0, acc, alpha_cur, alpha_nxt,
                                     mAlpha, tCcC, mOut, mWs, cnt_ptr, flag, m, ctid)
                    if u1 > u0 and (u1 - u0) % 2 == 0:
                        cute.nvgpu.warpgroup.wait_group(0)
                        release = self._release(pipe, release)
                        self._finish(u1 - 1, u0, u1, m_groups, num_clusters, ccoord, tmp1, acc, alpha_cur, alpha_nxt,
                                     mAlpha, tCcC, mOut, mWs, cnt_ptr, flag, m, ctid)

        @cute.jit
        def _issue(self, tiled_mma: cute.TiledMma, pipe, read, tCrA: cute.Tensor, tCrB: cute.Tensor,
                   tmp: cute.Tensor):
            """One unit's k-tiles into tmp as ONE wgmma commit group; its stages stay held
            until ``_release`` (after the caller has waited for the group)."""
            num_kb = cute.size(tCrA, mode=[2])
            tmp.fill(0.0)  # (not ACCUMULATE=False: a helper cannot rebind tiled_mma's state)
            cute.nvgpu.warpgroup.fence()
            for kt in cutlass.range_constexpr(self.kt_per_expert):
                pipe.consumer_wait(read)
                for kb in cutlass.range_constexpr(num_kb):
                    coord = (None, None, kb, read.index)
                    cute.gemm(tiled_mma, tmp, tCrA[coord], tCrB[coord], tmp)
                read.advance()
            cute.nvgpu.warpgroup.commit_group()
            return read

        @cute.jit
        def _release(self, pipe, release):
            for kt in cutlass.range_constexpr(self.kt_per_expert):
                pipe.consumer_release(release)
                release.advance()
            return release

        @cute.jit
        def _finish(self, u: Int32, u0: Int32, u1: Int32, m_groups: Int32, nclu: Int32, ccoord, tmp: cute.Tensor,
                    acc: cute.Tensor, alpha_cur: cute.Tensor, alpha_nxt: cute.Tensor, mAlpha: cute.Tensor,
                    tCcC: cute.Tensor, mOut: cute.Tensor, mWs: cute.Tensor, cnt_ptr: cute.Pointer,
                    flag: cute.Tensor, m: Int32, ctid: Int32):
            """Unit u's MMAs are complete: promote with alpha (loaded one unit ago), prefetch the
            next unit's alpha, and store / reduce the tile if u ends this CTA's segment of it."""
            self._next_alpha(u, u1, m_groups, nclu, ccoord, alpha_cur, alpha_nxt, mAlpha, tCcC, m)
            self._promote(acc, tmp, alpha_cur)
            self._close(u, u0, u1, m_groups, nclu, ccoord, acc, tCcC, mOut, mWs, cnt_ptr, flag, m, ctid)

        @cute.jit
        def _next_alpha(self, u: Int32, u1: Int32, m_groups: Int32, nclu: Int32, ccoord, alpha_cur: cute.Tensor,
                        alpha_nxt: cute.Tensor, mAlpha: cute.Tensor, tCcC: cute.Tensor, m: Int32):
            """Unit u's alpha (loaded one unit ago) into alpha_cur; unit u+1's loads issued."""
            for c in cutlass.range_constexpr(self.alpha_n):
                alpha_cur[c] = alpha_nxt[c]
            if u + 1 < u1:
                self._load_alpha(alpha_nxt, mAlpha, tCcC, u + 1, m_groups, nclu, ccoord[1], m)

        @cute.jit
        def _close(self, u: Int32, u0: Int32, u1: Int32, m_groups: Int32, nclu: Int32, ccoord, acc: cute.Tensor,
                   tCcC: cute.Tensor, mOut: cute.Tensor, mWs: cute.Tensor, cnt_ptr: cute.Pointer,
                   flag: cute.Tensor, m: Int32, ctid: Int32):
            """Unit u is promoted: store / reduce the tile if u ends this CTA's segment of it."""
            E = self.E
            cn, cm = self.cluster
            tile = u // E
            e = u - tile * E
            if e == E - 1 or u == u1 - 1:
                mg = tile // self.n_groups
                ng = tile - mg * self.n_groups
                seg_e0 = Int32(0)
                if tile == u0 // E:
                    seg_e0 = u0 - tile * E
                self._epilogue(acc, tCcC, mOut, mWs, cnt_ptr, flag, ng * cn + ccoord[0], mg * cm + ccoord[1],
                               m, seg_e0, e, ctid)
                acc.fill(0.0)

        @cute.jit
        def _load_alpha(self, dst: cute.Tensor, mAlpha: cute.Tensor, tCcC: cute.Tensor, u: Int32,
                        m_groups: Int32, nclu: Int32, rank_m: Int32, m: Int32):
            """alpha[token, expert of unit u] for this thread's token columns. Rows past M are
            clamped (their products are zero and never stored): no branch, so the loads are
            waited for only when the values are used, a unit later."""
            tile = u // self.E
            e = self._expert(u, tile, self.n_groups * m_groups * self.E, nclu)
            mg = tile // self.n_groups
            m_base = (mg * self.cluster[1] + rank_m) * self.tile_m
            if cutlass.const_expr(self.swap):
                # value mode ((2, 2, tile_m/8), atoms, 1): the token column depends on v0, v2
                for v2 in cutlass.range_constexpr(self.tile_m // 8):
                    for v0 in cutlass.range_constexpr(2):
                        row = cutlass.min(m_base + tCcC[((v0, 0, v2), 0, 0)][1], m - 1)
                        dst[v0 + 2 * v2] = mAlpha[row, e]
            else:
                # value mode ((2, 2, tile_n/8), 1, 1): the token row depends on v1 only
                for v1 in cutlass.range_constexpr(2):
                    row = cutlass.min(m_base + tCcC[((0, v1, 0), 0, 0)][0], m - 1)
                    dst[v1] = mAlpha[row, e]

        @cute.jit
        def _promote(self, acc: cute.Tensor, tmp: cute.Tensor, alpha: cute.Tensor):
            atoms = cute.size(acc, mode=[1])
            wg_n = self.tile_m if self.swap else self.tile_n  # the wgmma instruction's N
            for a_ in cutlass.range_constexpr(atoms):
                for v2 in cutlass.range_constexpr(wg_n // 8):
                    for v1 in cutlass.range_constexpr(2):
                        for v0 in cutlass.range_constexpr(2):
                            crd = ((v0, v1, v2), a_, 0)
                            ai = v0 + 2 * v2 if self.swap else v1
                            acc[crd] = acc[crd] + tmp[crd] * alpha[ai]

        def _expert(self, u, tile, units, nclu):
            """The expert of unit u (position u - tile * E of its tile). Without lockstep the
            position itself. With lockstep, tile t visits expert (u - base_t) mod E, where
            base_t is the first unit of the cluster slice that holds the tile's first unit: that
            cluster meets expert j at its j-th unit for every tile it starts, so all clusters
            are on the same expert at once (a cluster's last, cut tile is the exception). The
            rotation is a bijection per tile, the same for every CTA that works on the tile."""
            E = self.E
            if not self.lockstep:  # plain Python at trace time
                return u - tile * E
            x = cutlass.Int64(tile) * E  # the tile's first unit
            g = cutlass.Int64(nclu)
            total = cutlass.Int64(units)
            owner = ((x + 1) * g + total - 1) // total - 1  # slice c holds [c*U//G, (c+1)*U//G)
            base = owner * total // g
            return Int32((cutlass.Int64(u) - base) % E)

        def _nr(self, crd, n_base, m_base):
            """(output column, token row) of an accumulator coordinate."""
            if self.swap:  # plain Python at trace time
                return n_base + crd[0], m_base + crd[1]
            return n_base + crd[1], m_base + crd[0]

        @cute.jit
        def _epilogue(self, acc: cute.Tensor, tCcC: cute.Tensor, mOut: cute.Tensor, mWs: cute.Tensor,
                      cnt_ptr: cute.Pointer, flag: cute.Tensor, n_tile: Int32, m_tile: Int32, m: Int32,
                      seg_e0: Int32, e_last: Int32, ctid: Int32):
            n_base = n_tile * self.tile_n
            m_base = m_tile * self.tile_m
            N = self.N
            if seg_e0 == 0 and e_last == self.E - 1:  # the whole tile: store it
                for i in cutlass.range_constexpr(cute.size(acc)):
                    n, r = self._nr(tCcC[i], n_base, m_base)
                    if n < N and r < m:
                        mOut[r, n] = acc[i].to(self.out_dtype)
            else:  # part of a tile: reduce in the workspace, last CTA writes out
                for i in cutlass.range_constexpr(cute.size(acc)):
                    n, r = self._nr(tCcC[i], n_base, m_base)
                    if n < N and r < m:
                        cute.arch.red(mWs.iterator + (r * N + n), acc[i], op="add", dtype="f32",
                                      sem="relaxed", scope="gpu")
                cute.arch.fence_acq_rel_gpu()
                self.epi_barrier.arrive_and_wait()
                if ctid == 0:
                    tile_id = m_tile * (self.n_groups * self.cluster[0]) + n_tile
                    old = cute.arch.atomic_add(cnt_ptr + tile_id, e_last - seg_e0 + 1,
                                               sem="acq_rel", scope="gpu")
                    flag[0] = Int32(old + e_last - seg_e0 + 1 == self.E)
                self.epi_barrier.arrive_and_wait()
                if flag[0] != 0:
                    cute.arch.fence_acq_rel_gpu()
                    for i in cutlass.range_constexpr(cute.size(acc)):
                        n, r = self._nr(tCcC[i], n_base, m_base)
                        if n < N and r < m:
                            val = cute.arch.load(mWs.iterator + (r * N + n), Float32, cop="cg")
                            mOut[r, n] = val.to(self.out_dtype)
                self.epi_barrier.arrive_and_wait()  # flag is reused by the next segment

    return Fc2Sm90


@functools.lru_cache(maxsize=1)
def _kernel_class():
    return _build_kernel_class()


@functools.lru_cache(maxsize=1024)  # a tuning sweep compiles a few hundred; each holds one small module
def compile_fc2(config: Fc2CuteConfig, dtype: torch.dtype, out_dtype: torch.dtype, n: int, e: int, i: int):
    """Compile (once per static key) and return the launchable function.

    The key is static only: config, dtypes and the model shape (N, E, I). M is a runtime
    argument; so is the number of clusters launched.
    """
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    ok, why = can_implement(Fc2Problem(1, n, e, i, dtype, out_dtype), config)
    if not ok:
        raise ValueError(f"CuTe FC2 config {config} cannot run N={n} E={e} I={i} {dtype}: {why}")
    cls = _kernel_class()
    ab = cutlass_dtype(dtype)
    od = cutlass_dtype(out_dtype)
    gmem = cute.AddressSpace.gmem
    kern = cls(config, ab, od, n, e, i)
    args = (make_ptr(ab, 16, gmem, assumed_align=16), make_ptr(ab, 16, gmem, assumed_align=16),
            make_ptr(cutlass.Float32, 16, gmem, assumed_align=4), make_ptr(od, 16, gmem, assumed_align=od.width // 8),
            make_ptr(cutlass.Float32, 16, gmem, assumed_align=16), make_ptr(cutlass.Int32, 16, gmem, assumed_align=4),
            cutlass.Int32(1), cutlass.Int32(e), cutlass.Int32(n), cutlass.Int32(1), cuda.CUstream(0))
    return hopper.compile_kernel(kern, *args)


def runtime_ok(a: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor) -> tuple[bool, str]:
    """Whether these tensors can take the CuTe path (beyond ``can_implement``)."""
    ok, why = hopper.device_ok(a.device)
    if not ok:
        return False, why
    for name, t in (("a", a), ("w", w)):
        if not t.is_contiguous() or t.data_ptr() % 16:
            return False, f"{name} must be contiguous and 16-byte aligned for the CuTe kernel (TMA)"
    if alpha.stride(1) != 1 or out.stride(1) != 1:
        return False, "alpha and out need unit column stride for the CuTe kernel"
    if alpha.shape[0] > 1 and alpha.stride(0) < alpha.shape[1]:
        return False, "alpha rows overlap"
    return True, ""


def lockstep_expert(u: int, units: int, clusters: int, e: int) -> int:
    """Host twin of the kernel's ``_expert`` with lockstep (tests check its properties)."""
    x = (u // e) * e
    owner = ((x + 1) * clusters + units - 1) // units - 1
    return (u - owner * units // clusters) % e


def units_of(problem: Fc2Problem, config: Fc2CuteConfig) -> int:
    """Work units (cluster tile x expert) of one call."""
    c, p = config, problem
    m_groups = -(-(-(-p.m // c.tile_m)) // c.cluster_m)
    n_groups = -(-p.n // (c.tile_n * c.cluster_n))
    return m_groups * n_groups * p.e


def launch_shape(problem: Fc2Problem, config: Fc2CuteConfig, num_sms: int,
                 max_clusters: int | None = None) -> tuple[int, bool]:
    """(clusters launched, whether some tile is cut and needs the workspace).
    ``max_clusters``: the device's limit for this cluster size (default: SMs / size)."""
    c, p = config, problem
    units = units_of(p, c)
    ctas = c.ctas or num_sms
    clusters = max(1, min(ctas // c.cluster_size, units, max_clusters or num_sms // c.cluster_size))
    m_groups = -(-(-(-p.m // c.tile_m)) // c.cluster_m)
    if 1 < m_groups <= clusters:
        clusters -= clusters % m_groups  # token-tile groups in lock step (see the kernel docstring)
    return clusters, tiles_cut(units // p.e, p.e, clusters)


def fc2_cute(a: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor,
             config: Fc2CuteConfig) -> None:
    """Launch the CuTe kernel: out[M, N] <- FC2(a, w, alpha). Inputs validated by the op."""
    import cuda.bindings.driver as cuda
    import cutlass

    from densemoe._runtime import sm_count

    M, K = a.shape
    N = w.shape[0]
    E = alpha.shape[1]
    problem = Fc2Problem(M, N, E, K // E, a.dtype, out.dtype)
    ok, why = can_implement(problem, config)
    if not ok:
        raise ValueError(f"config {config} cannot run {problem}: {why}")
    if M == 0 or N == 0:
        return
    fn = compile_fc2(config, a.dtype, out.dtype, N, E, K // E)
    dev = a.device.index if a.device.index is not None else torch.cuda.current_device()
    cap = max_active_clusters(dev, config.cluster_size) if config.cluster_size > 1 else None
    clusters, cut = launch_shape(problem, config, sm_count(a.device), cap)
    if units_of(problem, config) >= 2**31:
        raise ValueError(f"M={M} is too large for the CuTe kernel's 32-bit work indices; split the batch")
    # counters for every tile a cluster can address, padding tiles included
    ws, cnt = split_workspace(M, N, -(-M // config.tile_m) + config.cluster_m,
                              -(-N // config.tile_n) + config.cluster_n, cut, a.device)
    ab = cutlass_dtype(a.dtype)
    stream = cuda.CUstream(torch.cuda.current_stream(a.device).cuda_stream)
    fn(ptr(w, ab), ptr(a, ab), ptr(alpha, cutlass.Float32, 4), ptr(out, cutlass_dtype(out.dtype), out.element_size()),
       ptr(ws, cutlass.Float32), ptr(cnt, cutlass.Int32, 4), cutlass.Int32(M), cutlass.Int32(alpha.stride(0)), cutlass.Int32(out.stride(0)),
       cutlass.Int32(clusters), stream)
