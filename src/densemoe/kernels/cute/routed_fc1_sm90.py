"""The routed (grouped) FC1 for Hopper (sm_90a) in NVIDIA's CuTe DSL: each (token, expert) pair's
row of x times its expert's gate and up rows, SwiGLU and the fp8 quantisation of y fused.

Semantics: the contract of the Triton routed FC1 (``densemoe.kernels.triton.routed.fc1_launch``,
the pairs sorted by expert; ``densemoe.reference`` holds the torch twin of the whole path)::

    # xs_sorted: [P, H]    fp8 e4m3 or bf16: row r is x[sorted[r] // top_k] (a sorted copy,
    #                      rows past offsets[E] zero), K-major, contiguous;
    #                      with ``gather``: x [M, H] itself, row r read as x[sorted[r] // top_k]
    # w1:        [E*2I, H] same dtype (expert e: rows e*2I .. +I gate, e*2I+I .. +I up)
    # alpha1:    [E]       float32;  x_scale: [M] float32, optional (fp8)
    # sorted:    [P] int32 pair ids (token * top_k + slot) in expert order; offsets: [E+1] int32
    # tiles:     [T, 2] int32 (expert, first row) of each tile of 128 rows; n_tiles: [1] int32
    # y:         [P, I]    fp8 e4m3 (with y_scale [P, I / tile_i]) or bf16
    for r in range(offsets[E]):  e = the expert whose rows hold r, m = sorted[r] // top_k
        s = alpha1[e] * x_scale[m]
        g = s * sum(xs_sorted[r, k] * w1[e*2I + i, k] for k)       # fp32 (fp8: promoted per k-tile)
        u = s * sum(xs_sorted[r, k] * w1[e*2I + I + i, k] for k)
        v = silu(g) * u
        fp8:  per (r, group of tile_i columns c): sc = e4m3_scale(amax |v|) (amax / 448, 1 for 0,
              NaN kept), y_scale[r, c] = sc, y[r, i] = fp8(clamp(v / sc, +-448))
        bf16: y[r, i] = bf16(v)

Kernel (sixth and ninth sessions' findings, docs/routed-journal.md): the Triton routed FC1 gathers x by
token with cp.async and waits for each fp8 product before its fp32 add with the whole CTA in
step, so its tensor cores sit idle through every wait and add (28% of the fp8 peak at Qwen3 M =
2048). Here:

* Work unit = (tile t, tile of I ``it``): 128 sorted rows from ``tiles[t]`` (one expert's; the
  rows past its last belong to the next expert or to none: loaded, multiplied, never stored) x
  ``tile_i`` gate and ``tile_i`` up rows. Units are numbered tile-major (``u = t * I/tile_i +
  it``): the CTAs running at once hold one expert's tiles of I against the same rows, then its
  next row tile (its weights still in L2). Persistent CTAs (one per SM) take ``u = cta, cta + G,
  ...`` up to ``n_tiles * I / tile_i``, read on the device: no host sync, graph-capturable.
* A producer warp loads x's rows through TMA at any first row (the descriptor over the whole
  sorted copy, offset per unit: Hopper's TMA has no gather, hence the copy), and the gate and up
  rows from the checkpoint layout as they are, into a ring of ``stages``.
  ``gather``: no sorted copy. The producer warpgroup's four warps each load a quarter of the
  unit's rows straight from x, one TMA load a row and 128-byte chunk (a box of one row, at the
  row's place in the swizzled stage: the 128-byte swizzle is a function of the shared-memory
  address, so one-row boxes land as the whole tile's box would,
  ``bench/probes/row_tma_gather.py``). A lane holds one row's token (read once a unit); warp 0
  also loads the weights and sets the stage's transaction bytes (the same bytes as the copy's
  box), the others wait for the stage to be free and add their loads to its barrier. Rows past
  the expert's last load that last row again (multiplied, never stored).
* Two consumer warpgroups, 64 rows each, not held in step (each waits only for its own wgmmas and
  the ring's barriers): each k-tile's gate product goes into a temporary, is waited for and
  added into the fp32 gate accumulator, then the up product the same way
  (``hopper.mainloop_promoted_shared``; fp8 only, bf16 accumulates in fp32 as it goes). While one
  warpgroup waits and adds, the other's wgmmas keep the tensor cores busy (DeepGEMM's scheme).
* Epilogue: a thread holds two rows (its quad of four threads the row's ``tile_i`` columns): the
  scales, SwiGLU, the row's amax over the quad (two butterfly shuffles), the fp8 scale and
  values; stores masked to the tile's rows.

Constraints are in ``can_implement``. In the routed path through ``RoutedConfig.fc1_cute`` (the op
layer runs the sorted copy unless ``fc1_cute_gather``, the tile list and this kernel);
``bench/probes/routed_fc1_cute.py``
times it against the Triton routed FC1.
"""


import dataclasses
import functools

import torch

from densemoe.kernels import common
from densemoe.kernels.cute import hopper
from densemoe.kernels.cute.hopper import MAX_ACC_REGS, SMEM_BYTES, SMEM_RESERVE, cutlass_dtype, ptr

FP8 = torch.float8_e4m3fn
TILE_M = 128  # rows a unit by default: two consumer warpgroups of one 64-row wgmma atom each
_INDEX_LIMIT = 2**31

__all__ = ["RoutedFc1CuteConfig", "can_implement", "compile_routed_fc1", "routed_fc1_cute", "max_tiles"]


@dataclasses.dataclass(frozen=True)
class RoutedFc1CuteConfig:
    """One tactic of the CuTe routed FC1 (sm_90a); ``ctas`` only sizes the launch.

    tile_i: gate rows (and as many up rows) a unit, wgmma's N (64 or 128); also fp8 y's scale
            group (the Triton FC1's ``fc1_block_i``), so FC2 must step through y by at most it
    tile_k: k-tile in elements, 128 or 256 bytes a row; must divide H
    stages: ring depth (0: as deep as shared memory allows, <= 12)
    ctas:   persistent CTAs (0: one per SM)
    gather: x's rows straight from x [M, H] by one TMA load a row (no sorted copy: the caller
            passes x itself); 0: from a sorted copy [P, H]
    tile_m: sorted rows a unit. 128: the two consumer warpgroups take 64 rows each of one unit.
            64: each warpgroup takes every other unit of the CTA's, whole (so one's epilogue
            runs under the other's k-loop), for experts with few rows (DeepSeek-V3 TP8 at
            M = 2048: 64 rows an expert, a 128-row tile half empty)
    """

    tile_i: int = 128
    tile_k: int = 128
    stages: int = 0
    ctas: int = 0
    tile_m: int = 128
    gather: bool = False

    backend = "cute"

    def to_str(self) -> str:
        return "routed-fc1-cute:" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    def stage_bytes(self, dtype: torch.dtype) -> int:
        return (self.tile_m + 2 * self.tile_i) * self.tile_k * dtype.itemsize

    def resolved_stages(self, dtype: torch.dtype) -> int:
        return self.stages or min(12, (SMEM_BYTES - SMEM_RESERVE) // self.stage_bytes(dtype))

    def acc_regs(self, dtype: torch.dtype) -> int:
        """fp32 registers a consumer thread: the gate and up accumulators (64 rows x tile_i each
        over 128 threads) and, fp8, the one temporary."""
        one = 64 * self.tile_i // 128
        return one * (3 if dtype == FP8 else 2)


def max_tiles(pairs: int, e: int, tile_m: int = TILE_M) -> int:
    """Tiles of ``tile_m`` sorted rows at most (``kernels.common.max_tiles``): the tile list's size."""
    return common.max_tiles(pairs, e, tile_m)


def can_implement(h: int, e: int, i: int, dtype: torch.dtype, out_dtype: torch.dtype,
                  config: RoutedFc1CuteConfig, pairs: int = 1) -> tuple[bool, str]:
    """Whether ``config`` can run this problem (shape and config rules; no device query)."""
    c = config
    if dtype not in (FP8, torch.bfloat16):
        return False, f"input dtype {dtype} not supported (fp8 e4m3 or bf16)"
    want = FP8 if dtype == FP8 else torch.bfloat16
    if out_dtype != want:
        return False, f"y must be {want} for {dtype} inputs (fp8 y with per-row group scales, or bf16)"
    if c.tile_m not in (64, 128):
        return False, f"tile_m={c.tile_m} must be 64 (a unit a warpgroup) or 128 (a unit a CTA)"
    if c.tile_i not in (64, 128):
        return False, f"tile_i={c.tile_i} must be 64 or 128 (wgmma N, fp8 y's scale group)"
    if i % c.tile_i:
        return False, f"tile_i={c.tile_i} does not divide I={i}"
    if c.tile_k * dtype.itemsize not in (128, 256):
        return False, f"tile_k={c.tile_k} must give 128 or 256 bytes per row for {dtype}"
    if h % c.tile_k:
        return False, f"tile_k={c.tile_k} does not divide H={h}"
    regs = c.acc_regs(dtype) + 8
    if regs > MAX_ACC_REGS:
        return False, f"accumulators need {regs} fp32 registers per thread (limit {MAX_ACC_REGS})"
    st = c.resolved_stages(dtype)
    if st < 2 or st * c.stage_bytes(dtype) + SMEM_RESERVE > SMEM_BYTES:
        return False, f"{st} stages of {c.stage_bytes(dtype)} B do not fit shared memory ({SMEM_BYTES} B)"
    if c.ctas < 0:
        return False, f"ctas={c.ctas} must be >= 0"
    # (the gathered x [M, H] has at most P rows: the sorted copy's bound covers it)
    for what, n in (("w1", 2 * e * i * h), ("the sorted x", pairs * h), ("y", pairs * i)):
        if n >= _INDEX_LIMIT:
            return False, f"{what} has {n} elements: the kernel's indices are 32-bit"
    return True, ""


def _build_kernel_class():
    import cutlass
    import cutlass.cute as cute
    import cutlass.memory  # noqa: F401
    import cutlass.pipeline as pipeline
    from cutlass import Float32, Int32

    log2e = 1.4426950408889634

    class RoutedFc1Sm90:
        def __init__(self, cfg: RoutedFc1CuteConfig, ab_dtype, out_dtype, h: int, e: int, i: int):
            self.cfg = cfg
            self.ab_dtype, self.out_dtype = ab_dtype, out_dtype
            self.fp8 = ab_dtype.width == 8
            self.H, self.E, self.I = h, e, i
            self.tile_i, self.tile_k = cfg.tile_i, cfg.tile_k
            self.kt = h // cfg.tile_k
            self.i_tiles = i // cfg.tile_i
            self.tile_m = cfg.tile_m
            self.gather = cfg.gather
            # a one-row TMA box is 128 bytes of a row (the swizzle's span): chunks a k-tile
            self.chunk = 128 // (ab_dtype.width // 8)
            self.chunks = cfg.tile_k // self.chunk
            self.alternate = cfg.tile_m == 64  # each consumer warpgroup its own units
            self.consumers = 2
            self.mma_atoms = 1 if self.alternate else 2  # 64-row wgmma atoms a unit
            self.threads = 128 * 3
            self.stages = cfg.resolved_stages(FP8 if self.fp8 else torch.bfloat16)

        @cute.jit
        def __call__(self, w_ptr: cute.Pointer, x_ptr: cute.Pointer, alpha1_ptr: cute.Pointer, xs_ptr: cute.Pointer,
                     sorted_ptr: cute.Pointer, offsets_ptr: cute.Pointer, tiles_ptr: cute.Pointer,
                     ntiles_ptr: cute.Pointer, y_ptr: cute.Pointer, ys_ptr: cute.Pointer, pairs: Int32,
                     n_tokens: Int32, top_k: Int32, has_xs: Int32, ld_ys: Int32, num_ctas: Int32, stream):
            H, E, I = self.H, self.E, self.I
            mW = cute.make_tensor(w_ptr, cute.make_layout((E * 2 * I, H), stride=(H, 1)))
            x_rows = n_tokens if cutlass.const_expr(self.gather) else pairs
            mX = cute.make_tensor(x_ptr, cute.make_layout((x_rows, H), stride=(H, 1)))
            mAlpha1 = cute.make_tensor(alpha1_ptr, cute.make_layout(E))
            mXs = cute.make_tensor(xs_ptr, cute.make_layout(n_tokens))
            mSorted = cute.make_tensor(sorted_ptr, cute.make_layout(pairs))
            mOffsets = cute.make_tensor(offsets_ptr, cute.make_layout(E + 1))
            mTiles = cute.make_tensor(tiles_ptr, cute.make_layout((pairs, 2), stride=(2, 1)))
            mNTiles = cute.make_tensor(ntiles_ptr, cute.make_layout(1))
            mY = cute.make_tensor(y_ptr, cute.make_layout((pairs, I), stride=(I, 1)))
            mYs = cute.make_tensor(ys_ptr, cute.make_layout((pairs, self.i_tiles), stride=(ld_ys, 1)))

            self.tiled_mma = hopper.tiled_mma(self.ab_dtype, self.mma_atoms, self.tile_i)
            w_layout = hopper.smem_layout(self.ab_dtype, self.tile_k, self.tile_i, self.stages)
            x_layout = hopper.smem_layout(self.ab_dtype, self.tile_k, self.tile_m, self.stages)
            tma_w, tma_tw = hopper.tma_atom(mW, w_layout, self.tile_i, self.tile_k, 1)
            if cutlass.const_expr(self.gather):  # one row by one 128-byte chunk, over the stage's swizzle
                one = cute.slice_(x_layout, (None, None, 0))
                row = cute.make_composed_layout(one.inner, one.offset,
                                                cute.make_layout((1, self.chunk), stride=(self.chunk, 1)))
                tma_x, tma_tx = cute.nvgpu.cpasync.make_tiled_tma_atom(
                    cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp(), mX, row, (1, self.chunk))
            else:
                tma_x, tma_tx = hopper.tma_atom(mX, x_layout, self.tile_m, self.tile_k, 1)

            @cute.struct
            class SharedStorage:
                pipe_mbar: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
                sG: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(w_layout)], 1024]
                sU: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(w_layout)], 1024]
                sX: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(x_layout)], 1024]

            self.shared_storage = SharedStorage
            hopper.launch(self.kernel(tma_w, tma_tw, tma_x, tma_tx, mAlpha1, mXs, mSorted, mOffsets, mTiles, mNTiles,
                                      mY, mYs, top_k, has_xs, self.tiled_mma, w_layout, x_layout),
                          num_ctas, (1, 1), self.threads, stream)

        @cute.kernel
        def kernel(self, tma_w: cute.CopyAtom, mW: cute.Tensor, tma_x: cute.CopyAtom, mX: cute.Tensor,
                   mAlpha1: cute.Tensor, mXs: cute.Tensor, mSorted: cute.Tensor, mOffsets: cute.Tensor,
                   mTiles: cute.Tensor, mNTiles: cute.Tensor, mY: cute.Tensor, mYs: cute.Tensor, top_k: Int32,
                   has_xs: Int32, tiled_mma: cute.TiledMma, w_smem_layout: cute.ComposedLayout,
                   x_smem_layout: cute.ComposedLayout):
            tile_i, tile_k = self.tile_i, self.tile_k
            IT = self.i_tiles
            tidx, _, _ = cute.arch.thread_idx()
            warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
            if warp_idx == 0:
                cute.nvgpu.cpasync.prefetch_descriptor(tma_w)
                cute.nvgpu.cpasync.prefetch_descriptor(tma_x)
            cta_layout, _, _, _, cta, num_ctas = hopper.cluster_coords((1, 1))

            smem = cutlass.memory.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            w_one = cute.slice_(w_smem_layout, (None, None, 0))
            x_one = cute.slice_(x_smem_layout, (None, None, 0))
            tx_bytes = 2 * cute.size_in_bytes(self.ab_dtype, w_one) + cute.size_in_bytes(self.ab_dtype, x_one)
            # a stage is released by the warpgroups that read it: both, or (alternate) one
            pipe = hopper.load_pipeline(storage.pipe_mbar.data_ptr(), self.stages, tx_bytes, cta_layout, (1, 1), 1,
                                        self.mma_atoms)
            sG = hopper.staged_tensor(storage.sG, w_smem_layout)
            sU = hopper.staged_tensor(storage.sU, w_smem_layout)
            sX = hopper.staged_tensor(storage.sX, x_smem_layout)
            gW = cute.local_tile(mW, (tile_i, tile_k), (None, None))
            tGsG, tWgW = hopper.tma_slices(tma_w, 0, 1, sG, gW)
            tUsU, _ = hopper.tma_slices(tma_w, 0, 1, sU, gW)

            units = mNTiles[0] * IT
            pipeline.pipeline_init_wait(cluster_shape_mn=(1, 1))
            warp_group = cute.arch.make_warp_uniform(tidx // 128)

            if warp_group == 0:  # ------------------------------------------ producer
                hopper.producer_role()
                if cutlass.const_expr(self.gather):
                    self._produce_gathered(pipe, tma_w, tWgW, tGsG, tUsU, tma_x, mX, sX, mSorted, mOffsets, mTiles,
                                           top_k, units, cta, num_ctas, warp_idx, tidx)
                elif warp_idx == 0:
                    state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
                    for u in range(cta, units, num_ctas):
                        t = u // IT
                        it = u - t * IT
                        e = mTiles[t, 0]
                        r0 = mTiles[t, 1]
                        gate_tile = 2 * e * IT + it  # (e*2I + it*tile_i) / tile_i
                        up_tile = gate_tile + IT
                        # the unit's rows of the sorted x from row r0 (TMA: any first row; the
                        # rows past the copy's end read as zeros)
                        gX = cute.local_tile(cute.domain_offset((r0, 0), mX), (self.tile_m, tile_k), (None, None))
                        tXsX, tXgX = hopper.tma_slices(tma_x, 0, 1, sX, gX)
                        for kt in cutlass.range(self.kt, unroll=1):
                            pipe.producer_acquire(state)
                            bar = pipe.producer_get_barrier(state)
                            cute.copy(tma_w, tWgW[(None, gate_tile, kt)], tGsG[(None, state.index)], tma_bar_ptr=bar)
                            cute.copy(tma_w, tWgW[(None, up_tile, kt)], tUsU[(None, state.index)], tma_bar_ptr=bar)
                            cute.copy(tma_x, tXgX[(None, 0, kt)], tXsX[(None, state.index)], tma_bar_ptr=bar)
                            pipe.producer_commit(state)
                            state.advance()
                    pipe.producer_tail(state)
            else:  # --------------------------------------------------------- consumers
                if cutlass.const_expr(self.alternate):  # the warpgroup's own 64-row atom: its threads 0-127
                    ctid, wg_mma, thr_mma = hopper.consumer_role(tiled_mma, Int32(1), tidx - (warp_group - 1) * 128)
                else:
                    ctid, wg_mma, thr_mma = hopper.consumer_role(tiled_mma, warp_group, tidx)
                gA = tiled_mma.make_fragment_A(wg_mma.partition_A(sX))  # rows are wgmma's M
                gB = tiled_mma.make_fragment_B(wg_mma.partition_B(sG))
                uB = tiled_mma.make_fragment_B(wg_mma.partition_B(sU))
                cC = cute.make_identity_tensor((self.tile_m, tile_i))  # (row, column)
                tCcC = thr_mma.partition_C(cC)
                acc_g = cute.make_rmem_tensor(tCcC.shape, Float32)
                acc_u = cute.make_rmem_tensor(tCcC.shape, Float32)
                read = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                if cutlass.const_expr(self.fp8):
                    tmp = cute.make_rmem_tensor(tCcC.shape, Float32)
                tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
                first, step = cta, num_ctas
                mine = warp_group - 1
                if cutlass.const_expr(self.alternate):
                    # The CTA's units alternate between the warpgroups, in the ring's order: the
                    # second passes over the first unit's stages, and each passes over the other's
                    # unit after its own (no wait, no release: the other warpgroup does both).
                    # A warpgroup waits for a unit's stages only once the other has waited for
                    # all of the unit before (named barrier 1 + its index): a full barrier's
                    # wait tells phases apart by parity only, so a warpgroup a ring-lap or more
                    # ahead of the loads could take an earlier fill of the stage for its own.
                    first = cta + mine * num_ctas
                    step = 2 * num_ctas
                    for _ in cutlass.range(mine * self.kt, unroll=1):
                        read.advance()
                        release.advance()
                for u in range(first, units, step):
                    # the unit's indices and its two rows' scales, loaded before the k-loop so their
                    # dependent reads (tile -> expert -> row end; row -> pair -> x scale) overlap it
                    t = u // IT
                    it = u - t * IT
                    e = mTiles[t, 0]
                    r0 = mTiles[t, 1]
                    r1 = cutlass.min(r0 + self.tile_m, mOffsets[e + 1])
                    a1 = mAlpha1[e]
                    s0 = a1
                    s1 = a1
                    if has_xs != 0:  # rows clamped into the unit: in range whatever the row (never stored past r1)
                        s0 = a1 * mXs[mSorted[cutlass.min(r0 + tCcC[((0, 0, 0), 0, 0)][0], r1 - 1)] // top_k]
                        s1 = a1 * mXs[mSorted[cutlass.min(r0 + tCcC[((0, 1, 0), 0, 0)][0], r1 - 1)] // top_k]
                    if cutlass.const_expr(self.alternate):
                        if u >= cta + num_ctas:  # not the CTA's first unit
                            cute.arch.barrier(barrier_id=1 + mine, number_of_threads=256)
                    if cutlass.const_expr(self.fp8):
                        read, release = hopper.mainloop_promoted_shared(tiled_mma, pipe, read, release, self.kt,
                                                                        ((acc_g, gA, gB), (acc_u, gA, uB)), tmp)
                    else:
                        read, release = hopper.mainloop(tiled_mma, pipe, read, release, self.kt,
                                                        ((acc_g, gA, gB), (acc_u, gA, uB)))
                    if cutlass.const_expr(self.alternate):
                        if u + num_ctas < units:  # the other warpgroup has the next unit
                            cute.arch.barrier_arrive(barrier_id=2 - mine, number_of_threads=256)
                    self._epilogue(acc_g, acc_u, tCcC, mY, mYs, it, r0, r1, s0, s1)
                    if cutlass.const_expr(self.alternate):
                        for _ in cutlass.range(self.kt, unroll=1):
                            read.advance()
                            release.advance()

        @cute.jit
        def _produce_gathered(self, pipe, tma_w: cute.CopyAtom, tWgW: cute.Tensor, tGsG: cute.Tensor,
                              tUsU: cute.Tensor, tma_x: cute.CopyAtom, mX: cute.Tensor, sX: cute.Tensor,
                              mSorted: cute.Tensor, mOffsets: cute.Tensor, mTiles: cute.Tensor, top_k: Int32,
                              units: Int32, cta: Int32, num_ctas: Int32, warp_idx: Int32, tidx: Int32):
            """The producer warpgroup without the sorted copy: warp ``w`` loads rows w * tile_m/4 ..
            of each stage straight from x (one TMA load a row and chunk); warp 0 also the weights,
            and it sets the stage's transaction bytes (the others' loads may land first: the
            barrier's count of bytes goes below zero until then, and the phase cannot end before
            warp 0 arrives)."""
            IT = self.i_tiles
            per_warp = self.tile_m // 4
            lane = tidx % 32
            mine = warp_idx * per_warp + cutlass.min(lane, per_warp - 1)  # this lane's row of the unit
            state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
            for u in range(cta, units, num_ctas):
                t = u // IT
                it = u - t * IT
                e = mTiles[t, 0]
                r0 = mTiles[t, 1]
                r1 = cutlass.min(r0 + self.tile_m, mOffsets[e + 1])
                token = mSorted[cutlass.min(r0 + mine, r1 - 1)] // top_k  # past the expert: its last row again
                gate_tile = 2 * e * IT + it
                up_tile = gate_tile + IT
                for kt in cutlass.range(self.kt, unroll=1):
                    if warp_idx == 0:
                        pipe.producer_acquire(state)
                    else:
                        pipe.sync_object_empty.wait(state.index, state.phase)
                    bar = pipe.producer_get_barrier(state)
                    if warp_idx == 0:
                        cute.copy(tma_w, tWgW[(None, gate_tile, kt)], tGsG[(None, state.index)], tma_bar_ptr=bar)
                        cute.copy(tma_w, tWgW[(None, up_tile, kt)], tUsU[(None, state.index)], tma_bar_ptr=bar)
                    s_stage = sX[(None, None, state.index)]
                    for j in cutlass.range(per_warp, unroll=1):
                        tok = cute.arch.shuffle_sync(token, j)
                        for c in cutlass.range_constexpr(self.chunks):
                            s_row = cute.local_tile(s_stage, (1, self.chunk), (warp_idx * per_warp + j, c))
                            g_row = cute.local_tile(mX, (1, self.chunk), (tok, kt * self.chunks + c))
                            ts, tg = cute.nvgpu.cpasync.tma_partition(tma_x, 0, cute.make_layout(1),
                                                                      cute.group_modes(s_row, 0, 2),
                                                                      cute.group_modes(g_row, 0, 2))
                            cute.copy(tma_x, tg, ts, tma_bar_ptr=bar)
                    state.advance()
            if warp_idx == 0:
                pipe.producer_tail(state)

        @cute.jit
        def _epilogue(self, acc_g: cute.Tensor, acc_u: cute.Tensor, tCcC: cute.Tensor, mY: cute.Tensor,
                      mYs: cute.Tensor, it: Int32, r0: Int32, r1: Int32, s0: Float32, s1: Float32):
            """Rows r0 + (this thread's two rows), columns it * tile_i + (its tile_i / 4): the
            rows' scales (alpha1[e] times the token's x scale: s0, s1), SwiGLU, fp8 y and its group
            scale (or bf16 y); rows at or past r1 not stored."""
            col0 = it * self.tile_i
            for v1 in cutlass.range_constexpr(2):  # the accumulator's value mode ((2, 2, tile_i/8), 1, 1)
                row = r0 + tCcC[((0, v1, 0), 0, 0)][0]
                ok = row < r1
                s = s0 if v1 == 0 else s1
                for v2 in cutlass.range_constexpr(self.tile_i // 8):
                    for v0 in cutlass.range_constexpr(2):
                        crd = ((v0, v1, v2), 0, 0)
                        g = acc_g[crd] * s
                        up = acc_u[crd] * s
                        sig = Float32(1.0) / (Float32(1.0) + cute.math.exp2(g * (-log2e), fastmath=True))
                        acc_g[crd] = g * sig * up
                if cutlass.const_expr(self.fp8):
                    amax = Float32(0.0)
                    for v2 in cutlass.range_constexpr(self.tile_i // 8):
                        for v0 in cutlass.range_constexpr(2):
                            amax = cute.arch.fmax(amax, cute.math.absf(acc_g[((v0, v1, v2), 0, 0)]), nan=True)
                    # the row's tile_i columns are spread over a quad of lanes (lane % 4)
                    for sh in cutlass.range_constexpr(2):
                        amax = cute.arch.fmax(amax, cute.arch.shuffle_sync_bfly(amax, offset=1 << sh), nan=True)
                    sc = amax / Float32(448.0)
                    if amax == Float32(0.0):
                        sc = Float32(1.0)
                    for v2 in cutlass.range_constexpr(self.tile_i // 8):
                        for v0 in cutlass.range_constexpr(2):
                            crd = ((v0, v1, v2), 0, 0)
                            q = acc_g[crd] / sc
                            q = cute.arch.fmin(cute.arch.fmax(q, Float32(-448.0), nan=True), Float32(448.0), nan=True)
                            if ok:
                                mY[row, col0 + tCcC[crd][1]] = q.to(self.out_dtype)
                    if ok:
                        if tCcC[((0, v1, 0), 0, 0)][1] == 0:  # one lane of the quad
                            mYs[row, it] = sc
                else:
                    if ok:
                        for v2 in cutlass.range_constexpr(self.tile_i // 8):
                            for v0 in cutlass.range_constexpr(2):
                                crd = ((v0, v1, v2), 0, 0)
                                mY[row, col0 + tCcC[crd][1]] = acc_g[crd].to(self.out_dtype)

    return RoutedFc1Sm90


@functools.lru_cache(maxsize=1)
def _kernel_class():
    return _build_kernel_class()


@functools.lru_cache(maxsize=256)
def compile_routed_fc1(config: RoutedFc1CuteConfig, dtype: torch.dtype, h: int, e: int, i: int):
    """Compile once per static key (config, dtype, H, E, I); the pairs, tokens, top-k and the
    launch size are runtime arguments."""
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    out_dtype = FP8 if dtype == FP8 else torch.bfloat16
    ok, why = can_implement(h, e, i, dtype, out_dtype, config)
    if not ok:
        raise ValueError(f"CuTe routed FC1 config {config} cannot run H={h} E={e} I={i} {dtype}: {why}")
    ab = cutlass_dtype(dtype)
    od = cutlass.Float8E4M3FN if dtype == FP8 else cutlass.BFloat16
    gmem = cute.AddressSpace.gmem
    f32, i32 = cutlass.Float32, cutlass.Int32
    kern = _kernel_class()(config, ab, od, h, e, i)
    args = (make_ptr(ab, 16, gmem, assumed_align=16), make_ptr(ab, 16, gmem, assumed_align=16),
            make_ptr(f32, 16, gmem, assumed_align=4), make_ptr(f32, 16, gmem, assumed_align=4),
            make_ptr(i32, 16, gmem, assumed_align=4), make_ptr(i32, 16, gmem, assumed_align=4),
            make_ptr(i32, 16, gmem, assumed_align=8), make_ptr(i32, 16, gmem, assumed_align=4),
            make_ptr(od, 16, gmem, assumed_align=od.width // 8), make_ptr(f32, 16, gmem, assumed_align=4),
            i32(1), i32(1), i32(1), i32(1), i32(1), i32(1), cuda.CUstream(0))
    return hopper.compile_kernel(kern, *args)


def routed_fc1_cute(xs_sorted: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, x_scale: torch.Tensor | None,
                    sorted_pairs: torch.Tensor, offsets: torch.Tensor, tiles: torch.Tensor, n_tiles: torch.Tensor,
                    y: torch.Tensor, y_scale: torch.Tensor | None, top_k: int, config: RoutedFc1CuteConfig) -> None:
    """Launch (the module docstring's contract). ``tiles`` [>= max_tiles(P, E), 2] int32 and
    ``n_tiles`` [1] int32 come from ``densemoe.kernels.triton.routed.tile_list_launch`` (or any
    writer of the same list) for tiles of ``config.tile_m`` rows. With ``config.gather``,
    ``xs_sorted`` is x [M, H] itself (M * top_k = P pairs)."""
    import cuda.bindings.driver as cuda
    import cutlass

    from densemoe._runtime import sm_count

    P = sorted_pairs.shape[0]
    rows, H = xs_sorted.shape
    if rows != (P // top_k if config.gather else P) or (config.gather and P != rows * top_k):
        raise ValueError(f"{'x' if config.gather else 'xs_sorted'} has {rows} rows; with {P} sorted pairs of top_k="
                         f"{top_k} it must have {P // top_k if config.gather else P}"
                         f"{' (gather: x itself, M rows)' if config.gather else ' (the sorted copy)'}")
    E = alpha1.shape[0]
    if E == 0:
        raise ValueError("alpha1 must hold one scale per expert (E >= 1)")
    I = w1.shape[0] // (2 * E)
    ok, why = can_implement(H, E, I, xs_sorted.dtype, y.dtype, config, P)
    if not ok:
        raise ValueError(f"config {config} cannot run H={H} E={E} I={I}: {why}")
    fp8 = y.dtype == FP8
    if fp8 and (y_scale is None or y_scale.shape[1] != I // config.tile_i):
        raise ValueError(f"fp8 y needs y_scale [P, I / tile_i = {I // config.tile_i}]")
    common.check_tile_list(tiles, n_tiles, sorted_pairs, offsets, P, E, config.tile_m)
    if P == 0:
        return
    for name, t in (("xs_sorted", xs_sorted), ("w1", w1), ("y", y)):
        if not t.is_contiguous() or t.data_ptr() % 16:
            raise ValueError(f"{name} must be contiguous and 16-byte aligned (TMA)")
    fn = compile_routed_fc1(config, xs_sorted.dtype, H, E, I)
    # no more CTAs than units can exist (M = 1: 8 tiles)
    units = max_tiles(P, E, config.tile_m) * (I // config.tile_i)
    ctas = min(config.ctas or sm_count(xs_sorted.device), units if config.tile_m == TILE_M else -(-units // 2))
    ab = cutlass_dtype(xs_sorted.dtype)
    od = cutlass.Float8E4M3FN if fp8 else cutlass.BFloat16
    f32, i32 = cutlass.Float32, cutlass.Int32
    xs = x_scale if x_scale is not None else alpha1
    ys = y_scale if fp8 else alpha1
    stream = cuda.CUstream(torch.cuda.current_stream(xs_sorted.device).cuda_stream)
    fn(ptr(w1, ab), ptr(xs_sorted, ab), ptr(alpha1, f32, 4), ptr(xs, f32, 4), ptr(sorted_pairs, i32, 4),
       ptr(offsets, i32, 4), ptr(tiles, i32, 8), ptr(n_tiles, i32, 4), ptr(y, od, y.element_size()), ptr(ys, f32, 4),
       i32(P), i32(rows if config.gather else xs.shape[0]), i32(top_k), i32(x_scale is not None),
       i32(ys.stride(0) if fp8 else 1), i32(ctas),
       stream)
