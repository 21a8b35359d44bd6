"""The routed (grouped) FC2 for Hopper (sm_90a) in NVIDIA's CuTe DSL: each (token, expert) pair's
row of y times its expert's w2, the y scales promoted per k-tile, w2's scale and the routing
weight applied, each pair's row written for the combine.

Semantics: those of the Triton routed FC2 without the fused or atomic combine
(``densemoe.kernels.triton.routed.fc2_launch``)::

    # y:       [P, I]   fp8 e4m3 with y_scale [P, I / tile_k] (one scale per (row, tile_k
    #                   columns): FC1's groups), or bf16; rows in the sorted order
    # w2:      [H, E*I] same dtype (expert e: columns e*I .. e*I+I-1), K-major
    # w2_scale [E] float32; topk_weights [P] float32 by pair (token * top_k + slot)
    # sorted:  [P] int32; offsets [E+1]; tiles [T, 2] (expert, first row), n_tiles [1]
    # rows:    [P, H] bf16, by pair
    for r in range(offsets[E]):  e = the expert whose rows hold r, p = sorted[r]
        acc[n] = sum_kt y_scale[r, kt] * sum(y[r, k] * w2[n, e*I + k] for k in k-tile kt)   # fp32
        rows[p, n] = bf16(acc[n] * w2_scale[e] * topk_weights[p])

Kernel (ninth session, docs/routed-journal.md): the construction of ``routed_fc1_sm90``. Units are
(tile of ``tile_m`` sorted rows from the tile list, tile of ``tile_n`` columns of H), tile-major,
taken by persistent CTAs; a producer warp loads y's rows through TMA at the tile's first row (they
are contiguous in the sorted order) and w2's ``tile_n`` rows of the expert's k-tile. Two consumer
warpgroups, not held in step: at ``tile_m`` 128 both take each unit, 64 rows each; at 64 the units
alternate between them (``routed_fc1_sm90``'s scheme), so one stores its rows while the other
multiplies. fp8 multiplies each k-tile into a temporary, waits for it and adds it times the row's
y scale (loaded before the wait) into the fp32 accumulator; bf16 accumulates as it goes. The
epilogue reads each row's pair, scales its columns and stores them two at a time (a thread's two
adjacent columns: one 4-byte store). With ``cols`` 2 (fp8) a unit is two column tiles: each
stage holds y's k-tile and w2's two (two TMA loads into two staged buffers), each k-tile's
product goes through the one temporary into the first tile's accumulator, then the second's, so
y's rows, their scales and the unit's indices load once for 2 x ``tile_n`` columns.

Constraints are in ``can_implement``. In the routed path through ``RoutedConfig.fc2_cute``.
"""

import dataclasses
import functools

import torch

from densemoe.kernels import common
from densemoe.kernels.cute import hopper
from densemoe.kernels.cute.hopper import MAX_ACC_REGS, SMEM_BYTES, SMEM_RESERVE, cutlass_dtype, ptr

FP8 = torch.float8_e4m3fn
TILE_M = 128  # rows a unit by default: two consumer warpgroups of one 64-row wgmma atom each (the tile list's)
_INDEX_LIMIT = 2**31

__all__ = ["RoutedFc2CuteConfig", "can_implement", "compile_routed_fc2", "routed_fc2_cute", "max_tiles"]


def max_tiles(pairs: int, e: int, tile_m: int = TILE_M) -> int:
    """Tiles of ``tile_m`` sorted rows at most (``kernels.common.max_tiles``): the tile list's size."""
    return common.max_tiles(pairs, e, tile_m)


@dataclasses.dataclass(frozen=True)
class RoutedFc2CuteConfig:
    """One tactic of the CuTe routed FC2 (sm_90a); ``ctas`` only sizes the launch.

    tile_n: columns of H a unit, wgmma's N (64 or 128); must divide H
    tile_k: k-tile in elements, 128 bytes a row; fp8: also y's scale group (FC1's tile of I)
    stages: ring depth (0: as deep as shared memory allows, <= 12)
    ctas:   persistent CTAs (0: one per SM)
    tile_m: sorted rows a unit (the tile list's tiles). 128: the two consumer warpgroups take 64
            rows each of one unit; 64: each warpgroup its own units, in turn
    ahead:  load a unit's indices (tile -> expert, first row -> end row, pairs -> weights: three
            dependent loads) and its first k-tile's y scales one unit ahead, under the k-loop and
            the epilogue of the unit before; off: at the unit's start, before its k-loop (two
            k-tiles at I = 256: shorter than the chain). Either way a k-tile's y scales load
            while the k-tile before multiplies.
    cols:   column tiles a unit (1 or 2; 2: fp8 only): each k-tile's y rows and scales and the
            unit's indices serve both, w2's two tiles land in one stage as one TMA box, and
            each has its own accumulator (one promotion temporary between them)
    """

    tile_n: int = 128
    tile_k: int = 128
    stages: int = 0
    ctas: int = 0
    tile_m: int = TILE_M
    ahead: bool = True
    cols: int = 1

    backend = "cute"

    def to_str(self) -> str:
        return "routed-fc2-cute:" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    def stage_bytes(self, dtype: torch.dtype) -> int:
        return (self.tile_m + self.cols * self.tile_n) * self.tile_k * dtype.itemsize

    def resolved_stages(self, dtype: torch.dtype) -> int:
        return self.stages or min(12, (SMEM_BYTES - SMEM_RESERVE) // self.stage_bytes(dtype))

    def acc_regs(self, dtype: torch.dtype) -> int:
        """fp32 registers a consumer thread: the accumulators (64 rows x tile_n over 128 threads,
        one a column tile) and, fp8, the temporary."""
        return 64 * self.tile_n // 128 * (self.cols + (1 if dtype == FP8 else 0))


def can_implement(h: int, e: int, i: int, dtype: torch.dtype, group: int, config: RoutedFc2CuteConfig,
                  pairs: int = 1) -> tuple[bool, str]:
    """Whether ``config`` can run this problem; ``group``: the columns of y per scale (fp8)."""
    c = config
    if dtype not in (FP8, torch.bfloat16):
        return False, f"input dtype {dtype} not supported (fp8 e4m3 or bf16)"
    if c.tile_n not in (64, 128):
        return False, f"tile_n={c.tile_n} must be 64 or 128 (wgmma N)"
    if c.tile_m not in (64, 128):
        return False, f"tile_m={c.tile_m} must be 64 or 128 (one or two 64-row wgmma atoms a unit)"
    if c.cols not in (1, 2) or (c.cols == 2 and dtype != FP8):
        return False, f"cols={c.cols} must be 1, or 2 with fp8"
    if h % (c.tile_n * c.cols):
        return False, f"tile_n={c.tile_n} x cols={c.cols} does not divide H={h}"
    if c.tile_k * dtype.itemsize != 128:
        return False, f"tile_k={c.tile_k} must give 128 bytes per row for {dtype}"
    if i % c.tile_k:
        return False, f"tile_k={c.tile_k} does not divide I={i} (a k-tile never reaches the next expert)"
    if dtype == FP8 and group != c.tile_k:
        return False, f"fp8 y's scale group ({group} columns) must be the k-tile ({c.tile_k}): one scale a k-tile"
    regs = c.acc_regs(dtype) + 8
    if regs > MAX_ACC_REGS:
        return False, f"accumulators need {regs} fp32 registers per thread (limit {MAX_ACC_REGS})"
    st = c.resolved_stages(dtype)
    if st < 2 or st * c.stage_bytes(dtype) + SMEM_RESERVE > SMEM_BYTES:
        return False, f"{st} stages of {c.stage_bytes(dtype)} B do not fit shared memory ({SMEM_BYTES} B)"
    if c.ctas < 0:
        return False, f"ctas={c.ctas} must be >= 0"
    for what, n in (("w2", e * i * h), ("y", pairs * i), ("the rows", pairs * h)):
        if n >= _INDEX_LIMIT:
            return False, f"{what} has {n} elements: the kernel's indices are 32-bit"
    return True, ""


def _build_kernel_class():
    import cutlass
    import cutlass.cute as cute
    import cutlass.memory  # noqa: F401
    import cutlass.pipeline as pipeline
    from cutlass import Float32, Int32

    class RoutedFc2Sm90:
        def __init__(self, cfg: RoutedFc2CuteConfig, ab_dtype, h: int, e: int, i: int):
            self.cfg = cfg
            self.ab_dtype = ab_dtype
            self.fp8 = ab_dtype.width == 8
            self.H, self.E, self.I = h, e, i
            self.tile_n, self.tile_k = cfg.tile_n, cfg.tile_k
            self.kt = i // cfg.tile_k  # k-tiles a unit (an expert's I)
            self.cols = cfg.cols
            self.n_tiles = h // (cfg.tile_n * cfg.cols)  # a unit's columns: cols tiles of tile_n
            self.tile_m = cfg.tile_m
            self.alternate = cfg.tile_m == 64  # each consumer warpgroup its own units
            self.consumers = 2
            self.mma_atoms = 1 if self.alternate else 2  # 64-row wgmma atoms a unit
            self.threads = 128 * 3
            self.stages = cfg.resolved_stages(FP8 if self.fp8 else torch.bfloat16)

        @cute.jit
        def __call__(self, y_ptr: cute.Pointer, w_ptr: cute.Pointer, ys_ptr: cute.Pointer, w2s_ptr: cute.Pointer,
                     tw_ptr: cute.Pointer, sorted_ptr: cute.Pointer, offsets_ptr: cute.Pointer,
                     tiles_ptr: cute.Pointer, ntiles_ptr: cute.Pointer, rows_ptr: cute.Pointer, pairs: Int32,
                     ld_ys: Int32, ld_rows: Int32, num_ctas: Int32, stream):
            H, E, I = self.H, self.E, self.I
            mY = cute.make_tensor(y_ptr, cute.make_layout((pairs, I), stride=(I, 1)))
            mW = cute.make_tensor(w_ptr, cute.make_layout((H, E * I), stride=(E * I, 1)))
            mYs = cute.make_tensor(ys_ptr, cute.make_layout((pairs, self.kt), stride=(ld_ys, 1)))
            mW2s = cute.make_tensor(w2s_ptr, cute.make_layout(E))
            mTw = cute.make_tensor(tw_ptr, cute.make_layout(pairs))
            mSorted = cute.make_tensor(sorted_ptr, cute.make_layout(pairs))
            mOffsets = cute.make_tensor(offsets_ptr, cute.make_layout(E + 1))
            mTiles = cute.make_tensor(tiles_ptr, cute.make_layout((pairs, 2), stride=(2, 1)))
            mNTiles = cute.make_tensor(ntiles_ptr, cute.make_layout(1))
            mRows = cute.make_tensor(rows_ptr, cute.make_layout((pairs, H), stride=(ld_rows, 1)))

            self.tiled_mma = hopper.tiled_mma(self.ab_dtype, self.mma_atoms, self.tile_n)
            y_layout = hopper.smem_layout(self.ab_dtype, self.tile_k, self.tile_m, self.stages)
            w_layout = hopper.smem_layout(self.ab_dtype, self.tile_k, self.tile_n, self.stages)
            tma_y, tma_ty = hopper.tma_atom(mY, y_layout, self.tile_m, self.tile_k, 1)
            tma_w, tma_tw = hopper.tma_atom(mW, w_layout, self.tile_n, self.tile_k, 1)

            @cute.struct
            class SharedStorage:
                pipe_mbar: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
                sY: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(y_layout)], 1024]
                sW: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(w_layout)], 1024]
                # the second column tile's w2 (cols 2; one element otherwise)
                sW2: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(w_layout) if self.cols == 2
                                                            else 1], 1024]

            self.shared_storage = SharedStorage
            hopper.launch(self.kernel(tma_y, tma_ty, tma_w, tma_tw, mYs, mW2s, mTw, mSorted, mOffsets, mTiles, mNTiles,
                                      mRows, self.tiled_mma, y_layout, w_layout),
                          num_ctas, (1, 1), self.threads, stream)

        @cute.kernel
        def kernel(self, tma_y: cute.CopyAtom, mY: cute.Tensor, tma_w: cute.CopyAtom, mW: cute.Tensor,
                   mYs: cute.Tensor, mW2s: cute.Tensor, mTw: cute.Tensor, mSorted: cute.Tensor,
                   mOffsets: cute.Tensor, mTiles: cute.Tensor, mNTiles: cute.Tensor, mRows: cute.Tensor,
                   tiled_mma: cute.TiledMma, y_smem_layout: cute.ComposedLayout, w_smem_layout: cute.ComposedLayout):
            tile_n, tile_k = self.tile_n, self.tile_k
            NT, KT = self.n_tiles, self.kt
            tidx, _, _ = cute.arch.thread_idx()
            warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
            if warp_idx == 0:
                cute.nvgpu.cpasync.prefetch_descriptor(tma_y)
                cute.nvgpu.cpasync.prefetch_descriptor(tma_w)
            cta_layout, _, _, _, cta, num_ctas = hopper.cluster_coords((1, 1))

            smem = cutlass.memory.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            y_one = cute.slice_(y_smem_layout, (None, None, 0))
            w_one = cute.slice_(w_smem_layout, (None, None, 0))
            tx_bytes = cute.size_in_bytes(self.ab_dtype, y_one) + self.cols * cute.size_in_bytes(self.ab_dtype, w_one)
            # a stage is released by the warpgroups that read it: both, or (alternate) one
            pipe = hopper.load_pipeline(storage.pipe_mbar.data_ptr(), self.stages, tx_bytes, cta_layout, (1, 1), 1,
                                        self.mma_atoms)
            sY = hopper.staged_tensor(storage.sY, y_smem_layout)
            sW = hopper.staged_tensor(storage.sW, w_smem_layout)
            gW = cute.local_tile(mW, (tile_n, tile_k), (None, None))
            tWsW, tWgW = hopper.tma_slices(tma_w, 0, 1, sW, gW)
            sW2 = sW
            tWsW2 = tWsW
            if cutlass.const_expr(self.cols == 2):  # the second column tile's w2: its own staged buffer
                sW2 = hopper.staged_tensor(storage.sW2, w_smem_layout)
                tWsW2, _ = hopper.tma_slices(tma_w, 0, 1, sW2, gW)

            units = mNTiles[0] * NT
            pipeline.pipeline_init_wait(cluster_shape_mn=(1, 1))
            warp_group = cute.arch.make_warp_uniform(tidx // 128)

            if warp_group == 0:  # ------------------------------------------ producer
                hopper.producer_role()
                if warp_idx == 0:
                    state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
                    last = cutlass.max(units - 1, 0)
                    tn = cutlass.min(cta, last) // NT
                    n_e = mTiles[tn, 0]
                    n_r0 = mTiles[tn, 1]
                    for u in range(cta, units, num_ctas):
                        t = u // NT
                        nt = u - t * NT
                        e = n_e
                        r0 = n_r0
                        if cutlass.const_expr(self.cfg.ahead):  # the next unit's tile entry, under this one's copies
                            tn = cutlass.min(u + num_ctas, last) // NT
                            n_e = mTiles[tn, 0]
                            n_r0 = mTiles[tn, 1]
                        else:
                            e = mTiles[t, 0]
                            r0 = mTiles[t, 1]
                        gY = cute.local_tile(cute.domain_offset((r0, 0), mY), (self.tile_m, tile_k), (None, None))
                        tYsY, tYgY = hopper.tma_slices(tma_y, 0, 1, sY, gY)
                        for kt in cutlass.range(KT, unroll=1):
                            pipe.producer_acquire(state)
                            bar = pipe.producer_get_barrier(state)
                            cute.copy(tma_y, tYgY[(None, 0, kt)], tYsY[(None, state.index)], tma_bar_ptr=bar)
                            cute.copy(tma_w, tWgW[(None, nt * self.cols, e * KT + kt)], tWsW[(None, state.index)],
                                      tma_bar_ptr=bar)
                            if cutlass.const_expr(self.cols == 2):
                                cute.copy(tma_w, tWgW[(None, nt * 2 + 1, e * KT + kt)], tWsW2[(None, state.index)],
                                          tma_bar_ptr=bar)
                            pipe.producer_commit(state)
                            state.advance()
                    pipe.producer_tail(state)
            else:  # --------------------------------------------------------- consumers
                if cutlass.const_expr(self.alternate):  # the warpgroup's own 64-row atom: its threads 0-127
                    ctid, wg_mma, thr_mma = hopper.consumer_role(tiled_mma, Int32(1), tidx - (warp_group - 1) * 128)
                else:
                    ctid, wg_mma, thr_mma = hopper.consumer_role(tiled_mma, warp_group, tidx)
                tA = tiled_mma.make_fragment_A(wg_mma.partition_A(sY))  # rows are wgmma's M
                tB = tiled_mma.make_fragment_B(wg_mma.partition_B(sW))
                tBs = (tB,)
                if cutlass.const_expr(self.cols == 2):
                    tBs = (tB, tiled_mma.make_fragment_B(wg_mma.partition_B(sW2)))
                cC = cute.make_identity_tensor((self.tile_m, tile_n))  # (row, column)
                tCcC = thr_mma.partition_C(cC)
                acc = cute.make_rmem_tensor(tCcC.shape, Float32)
                accs = (acc,)
                if cutlass.const_expr(self.cols == 2):  # the second column tile's
                    accs = (acc, cute.make_rmem_tensor(tCcC.shape, Float32))
                read = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
                if cutlass.const_expr(self.fp8):
                    tmp = cute.make_rmem_tensor(tCcC.shape, Float32)
                first, step = cta, num_ctas
                mine = warp_group - 1
                if cutlass.const_expr(self.alternate):
                    # routed_fc1_sm90's scheme: the CTA's units alternate between the warpgroups in
                    # the ring's order; each passes over the other's unit (no wait, no release: the
                    # other does both) and waits for a unit's stages only once the other has waited
                    # for all of the unit before (named barrier 1 + its index), so that a warpgroup
                    # a ring-lap ahead never takes an earlier fill of a stage for its own.
                    first = cta + mine * num_ctas
                    step = 2 * num_ctas
                    for _ in cutlass.range(mine * KT, unroll=1):
                        read.advance()
                        release.advance()
                # The unit's indices: tile t -> (expert e, first row r0) -> end row r1 and w2's
                # scale; the thread's two rows -> pairs -> routing weights. With ``ahead``, each
                # level of that chain is issued for the next unit where this one waits anyway (the
                # tile entry before the k-loop, the rows' pairs before the epilogue, the weights
                # after it); indices are clamped into their tensors, so a unit past the last (or an
                # empty tile list) loads in bounds and is never used.
                last = cutlass.max(units - 1, 0)
                pairs_last = cute.size(mSorted) - 1
                row0 = tCcC[((0, 0, 0), 0, 0)][0]
                row1 = tCcC[((0, 1, 0), 0, 0)][0]
                tn = cutlass.min(first, last) // NT
                r0, r1, p0, p1, ws, sy0, sy1 = self._unit_rows(mTiles[tn, 0], mTiles[tn, 1], row0, row1, pairs_last,
                                                               mOffsets, mSorted, mW2s, mYs)
                wt0 = mTw[p0] * ws
                wt1 = mTw[p1] * ws
                nt = cutlass.min(first, last) - tn * NT
                for u in range(first, units, step):
                    if cutlass.const_expr(not self.cfg.ahead):  # the chain here, at the unit's start
                        t = u // NT
                        nt = u - t * NT
                        e = mTiles[t, 0]
                        r0 = mTiles[t, 1]
                        r1 = cutlass.min(r0 + self.tile_m, mOffsets[e + 1])
                        ws = mW2s[e]
                        p0 = mSorted[cutlass.min(r0 + row0, r1 - 1)]
                        p1 = mSorted[cutlass.min(r0 + row1, r1 - 1)]
                        wt0 = mTw[p0] * ws
                        wt1 = mTw[p1] * ws
                        if cutlass.const_expr(self.fp8):
                            sy0 = mYs[cutlass.min(r0 + row0, r1 - 1), 0]
                            sy1 = mYs[cutlass.min(r0 + row1, r1 - 1), 0]
                    if cutlass.const_expr(self.cfg.ahead):  # the next unit's tile entry: lands during the k-loop
                        un = cutlass.min(u + step, last)
                        tn = un // NT
                        n_e = mTiles[tn, 0]
                        n_r0 = mTiles[tn, 1]
                    if cutlass.const_expr(self.alternate):
                        if u >= cta + num_ctas:  # not the CTA's first unit
                            cute.arch.barrier(barrier_id=1 + mine, number_of_threads=256)
                    if cutlass.const_expr(self.fp8):
                        read, release = self._mainloop_scaled(tiled_mma, pipe, read, release, accs, tmp, tA, tBs, tCcC,
                                                              mYs, r0, r1, sy0, sy1)
                    else:
                        read, release = hopper.mainloop(tiled_mma, pipe, read, release, KT, ((acc, tA, tB),))
                    if cutlass.const_expr(self.alternate):
                        if u + num_ctas < units:  # the other warpgroup has the next unit
                            cute.arch.barrier_arrive(barrier_id=2 - mine, number_of_threads=256)
                    if cutlass.const_expr(self.cfg.ahead):  # the next unit's rows, pairs, first scales: land during
                        n_r0, n_r1, n_p0, n_p1, n_ws, sy0, sy1 = self._unit_rows(  # the epilogue
                            n_e, n_r0, row0, row1, pairs_last, mOffsets, mSorted, mW2s, mYs)
                    for n in cutlass.range_constexpr(self.cols):  # nt: the unit's group of column tiles
                        self._epilogue(accs[n], tCcC, mRows, nt * self.cols + n, r0, r1, p0, p1, wt0, wt1)
                    if cutlass.const_expr(self.cfg.ahead):  # the next unit becomes this one
                        nt = un - tn * NT
                        r0 = n_r0
                        r1 = n_r1
                        p0 = n_p0
                        p1 = n_p1
                        wt0 = mTw[n_p0] * n_ws
                        wt1 = mTw[n_p1] * n_ws
                    if cutlass.const_expr(self.alternate):
                        for _ in cutlass.range(KT, unroll=1):
                            read.advance()
                            release.advance()

        @cute.jit
        def _unit_rows(self, e: Int32, r0: Int32, row0: Int32, row1: Int32, pairs_last: Int32, mOffsets: cute.Tensor,
                       mSorted: cute.Tensor, mW2s: cute.Tensor, mYs: cute.Tensor):
            """A unit's rows from its tile entry (expert ``e``, first row ``r0``), both clamped into
            their tensors: first and end row, the pairs of this thread's two rows (``row0``,
            ``row1`` within the unit, clamped to the last pair: a row past the unit's end is never
            stored), w2's scale, and (fp8) the two rows' y scales of the first k-tile (1 for bf16)."""
            e = cutlass.min(cutlass.max(e, 0), self.E - 1)
            r0 = cutlass.min(cutlass.max(r0, 0), pairs_last)
            r1 = cutlass.min(r0 + self.tile_m, mOffsets[e + 1])
            p0 = mSorted[cutlass.min(r0 + row0, pairs_last)]
            p1 = mSorted[cutlass.min(r0 + row1, pairs_last)]
            sy0 = Float32(1.0)
            sy1 = Float32(1.0)
            if cutlass.const_expr(self.fp8):
                sy0 = mYs[cutlass.min(r0 + row0, pairs_last), 0]
                sy1 = mYs[cutlass.min(r0 + row1, pairs_last), 0]
            return r0, r1, p0, p1, mW2s[e], sy0, sy1

        @cute.jit
        def _mainloop_scaled(self, tiled_mma: cute.TiledMma, pipe, read, release, accs, tmp: cute.Tensor,
                             tA: cute.Tensor, tBs, tCcC: cute.Tensor, mYs: cute.Tensor, r0: Int32,
                             r1: Int32, sy0: Float32, sy1: Float32):
            """fp8: each k-tile into ``tmp`` (scale-d 0 on its first k-block), waited for, then
            added into its column tile's accumulator (``accs``: one a column tile of the unit)
            times its rows' y scales: the first k-tile's given (``sy0``, ``sy1``, loaded by the
            caller), each next k-tile's loaded while this one multiplies (rows clamped below r1:
            a row at or past it is never stored). Two column tiles (``tBs``: w2's tiles of the
            stage, one a column tile) share the temporary, one after the other."""
            num_kb = cute.size(tA, mode=[2])
            for n in cutlass.range_constexpr(self.cols):
                accs[n].fill(0.0)
            row0 = cutlass.min(r0 + tCcC[((0, 0, 0), 0, 0)][0], r1 - 1)
            row1 = cutlass.min(r0 + tCcC[((0, 1, 0), 0, 0)][0], r1 - 1)
            for kt in cutlass.range(self.kt, unroll=1):
                pipe.consumer_wait(read)
                n0 = sy0
                n1 = sy1
                for n in cutlass.range_constexpr(self.cols):
                    cute.nvgpu.warpgroup.fence()
                    for kb in cutlass.range_constexpr(num_kb):
                        tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, kb > 0)
                        cute.gemm(tiled_mma, tmp, tA[(None, None, kb, read.index)],
                                  tBs[n][(None, None, kb, read.index)], tmp)
                    cute.nvgpu.warpgroup.commit_group()
                    if cutlass.const_expr(n == 0):
                        kn = cutlass.min(kt + 1, self.kt - 1)  # the next k-tile's scales (the last loads its own again)
                        n0 = mYs[row0, kn]
                        n1 = mYs[row1, kn]
                    cute.nvgpu.warpgroup.wait_group(0)
                    if cutlass.const_expr(n == self.cols - 1):
                        pipe.consumer_release(release)
                        release.advance()
                        read.advance()
                    acc = accs[n]
                    for v2 in cutlass.range_constexpr(self.tile_n // 8):
                        for v0 in cutlass.range_constexpr(2):
                            acc[((v0, 0, v2), 0, 0)] = acc[((v0, 0, v2), 0, 0)] + tmp[((v0, 0, v2), 0, 0)] * sy0
                            acc[((v0, 1, v2), 0, 0)] = acc[((v0, 1, v2), 0, 0)] + tmp[((v0, 1, v2), 0, 0)] * sy1
                sy0 = n0
                sy1 = n1
            return read, release

        @cute.jit
        def _epilogue(self, acc: cute.Tensor, tCcC: cute.Tensor, mRows: cute.Tensor, nt: Int32, r0: Int32,
                      r1: Int32, p0: Int32, p1: Int32, wt0: Float32, wt1: Float32):
            """rows[pair, nt * tile_n + columns] = acc * (w2_scale[e] * topk_weights[pair]: wt0,
            wt1) for this thread's two rows (pairs p0, p1); rows at or past r1 are not stored.
            A thread's values come in pairs of adjacent columns (the accumulator's value mode
            ((2, 2, tile_n / 8), 1, 1): column pair, row, group of 8 columns), each pair one
            4-byte store: the row's start is 4-byte aligned (``routed_fc2_cute`` checks the rows'
            pointer and row stride) and the pair's first column even."""
            col0 = nt * self.tile_n
            two = cute.make_rmem_tensor(cute.make_layout(2), cutlass.BFloat16)
            for v1 in cutlass.range_constexpr(2):
                row = r0 + tCcC[((0, v1, 0), 0, 0)][0]
                if row < r1:
                    pair = p0 if v1 == 0 else p1
                    wt = wt0 if v1 == 0 else wt1
                    for v2 in cutlass.range_constexpr(self.tile_n // 8):
                        for v0 in cutlass.range_constexpr(2):
                            two[v0] = (acc[((v0, v1, v2), 0, 0)] * wt).to(cutlass.BFloat16)
                        at = mRows.iterator + cute.crd2idx((pair, col0 + tCcC[((0, v1, v2), 0, 0)][1]), mRows.layout)
                        dst = cute.make_tensor(cute.make_ptr(cutlass.BFloat16, at.toint(), cute.AddressSpace.gmem,
                                                             assumed_align=4), cute.make_layout(2))
                        cute.autovec_copy(two, dst)

    return RoutedFc2Sm90


@functools.lru_cache(maxsize=1)
def _kernel_class():
    return _build_kernel_class()


@functools.lru_cache(maxsize=256)
def compile_routed_fc2(config: RoutedFc2CuteConfig, dtype: torch.dtype, h: int, e: int, i: int):
    """Compile once per static key (config, dtype, H, E, I)."""
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    ok, why = can_implement(h, e, i, dtype, config.tile_k, config)
    if not ok:
        raise ValueError(f"CuTe routed FC2 config {config} cannot run H={h} E={e} I={i} {dtype}: {why}")
    ab = cutlass_dtype(dtype)
    gmem = cute.AddressSpace.gmem
    f32, i32, bf16 = cutlass.Float32, cutlass.Int32, cutlass.BFloat16
    kern = _kernel_class()(config, ab, h, e, i)
    args = (make_ptr(ab, 16, gmem, assumed_align=16), make_ptr(ab, 16, gmem, assumed_align=16),
            make_ptr(f32, 16, gmem, assumed_align=4), make_ptr(f32, 16, gmem, assumed_align=4),
            make_ptr(f32, 16, gmem, assumed_align=4), make_ptr(i32, 16, gmem, assumed_align=4),
            make_ptr(i32, 16, gmem, assumed_align=4), make_ptr(i32, 16, gmem, assumed_align=8),
            make_ptr(i32, 16, gmem, assumed_align=4), make_ptr(bf16, 16, gmem, assumed_align=2),
            i32(1), i32(1), i32(1), i32(1), cuda.CUstream(0))
    return hopper.compile_kernel(kern, *args)


def routed_fc2_cute(y: torch.Tensor, y_scale: torch.Tensor | None, w2: torch.Tensor, w2_scale: torch.Tensor,
                    topk_weights: torch.Tensor, sorted_pairs: torch.Tensor, offsets: torch.Tensor,
                    tiles: torch.Tensor, n_tiles: torch.Tensor, rows: torch.Tensor,
                    config: RoutedFc2CuteConfig) -> None:
    """Launch (the module docstring's contract; ``tiles``/``n_tiles`` as for ``routed_fc1_sm90``,
    tiles of ``config.tile_m`` rows; ``topk_weights`` [P] float32, contiguous)."""
    import cuda.bindings.driver as cuda
    import cutlass

    from densemoe._runtime import sm_count

    P, I = y.shape
    H = w2.shape[0]
    E = w2_scale.shape[0]
    fp8 = y.dtype == FP8
    group = I // y_scale.shape[1] if fp8 else config.tile_k
    ok, why = can_implement(H, E, I, y.dtype, group, config, P)
    if not ok:
        raise ValueError(f"config {config} cannot run H={H} E={E} I={I}: {why}")
    if rows.dtype != torch.bfloat16 or rows.shape != (P, H) or rows.stride(1) != 1:
        raise ValueError(f"rows must be bf16 [P={P}, H={H}] with unit column stride")
    if rows.data_ptr() % 4 or rows.stride(0) % 2:  # the epilogue stores two columns at once
        raise ValueError("rows must start 4-byte aligned with an even row stride")
    common.check_tile_list(tiles, n_tiles, sorted_pairs, offsets, P, E, config.tile_m)
    if topk_weights.dtype != torch.float32 or not topk_weights.is_contiguous() or topk_weights.numel() < P:
        raise ValueError(f"topk_weights must be float32 [P={P}], contiguous")
    if P == 0:
        return
    for name, t in (("y", y), ("w2", w2)):
        if not t.is_contiguous() or t.data_ptr() % 16:
            raise ValueError(f"{name} must be contiguous and 16-byte aligned (TMA)")
    fn = compile_routed_fc2(config, y.dtype, H, E, I)
    # no more CTAs than units can exist
    ctas = min(config.ctas or sm_count(y.device), max_tiles(P, E, config.tile_m) * (H // config.tile_n))
    ab = cutlass_dtype(y.dtype)
    f32, i32 = cutlass.Float32, cutlass.Int32
    ys = y_scale if fp8 else w2_scale
    stream = cuda.CUstream(torch.cuda.current_stream(y.device).cuda_stream)
    fn(ptr(y, ab), ptr(w2, ab), ptr(ys, f32, 4), ptr(w2_scale, f32, 4), ptr(topk_weights, f32, 4),
       ptr(sorted_pairs, i32, 4), ptr(offsets, i32, 4), ptr(tiles, i32, 8), ptr(n_tiles, i32, 4),
       ptr(rows, cutlass.BFloat16, 2), i32(P), i32(ys.stride(0) if fp8 else 1), i32(rows.stride(0)), i32(ctas), stream)
