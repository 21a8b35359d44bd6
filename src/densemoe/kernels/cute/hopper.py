"""The pieces of a warp-specialised, TMA-fed, clustered sm_90a GEMM that ``fc1_sm90`` and
``fc2_sm90`` share.

Both kernels have the same skeleton: warpgroup 0 is the producer (one warp issues TMA loads
into a ``stages``-deep shared-memory ring guarded by mbarriers, ``PipelineTmaAsync``, and the
warpgroup gives its registers away with ``setmaxnreg``); warpgroups 1.. are consumers issuing
wgmma. A cluster is ``(cluster_n, cluster_m)`` CTAs: mode 0 (``cluster_n``) runs along the
weight tiles, so those CTAs share the token tile, which each loads a slice of and multicasts;
mode 1 (``cluster_m``) runs along the token tiles, so those CTAs share the weight tile. Both
operands are K-major and tiled ``(rows, tile_k)`` with 128-byte swizzle atoms.

What lives here:

* host helpers: ``cute_available``, ``cutlass_dtype``, ``ptr``, ``max_active_clusters`` and
  the sm_90a limits (``SMEM_BYTES``, ``SMEM_RESERVE``, register budgets);
* trace-time helpers, plain Python functions that a ``@cute.jit`` / ``@cute.kernel`` body calls
  while it traces (they emit exactly the IR of the code written inline): ``tiled_mma``,
  ``smem_layout``, ``tma_atom``, ``launch``, ``cluster_coords``, ``load_pipeline``,
  ``staged_tensor``, ``tma_slices``, ``producer_role``, ``consumer_role``;
* ``mainloop``: the consumers' k-loop over one work unit (``@cute.jit``: dynamic control flow);
  ``mainloop_promoted`` the same with the fp8 products added into fp32 accumulators every ``PROMOTE_K``.

Each kernel keeps its own work list, epilogue and scaling. Every cutlass import is lazy, so
this module (like the kernel modules' configs and ``can_implement``) imports without CuTe DSL.
"""

import functools
from typing import Any, NamedTuple

import torch

from densemoe._runtime import capability
from densemoe.kernels.common import SMEM_BYTES

SMEM_RESERVE = 2048  # mbarriers + alignment slack
CONSUMER_REGS = 232  # setmaxnreg of a consumer warpgroup
PRODUCER_REGS = 40  # setmaxnreg of the producer warpgroup (it only issues TMA)
MAX_ACC_REGS = 200  # fp32 registers per consumer thread for accumulators + epilogue factors (can_implement)
# fp8 promotion interval, in k elements: the products of this many k go into a temporary at
# Hopper's reduced fp8 accumulation before the fp32 add. 128 is what cuBLAS does without fast
# accumulation: measured on an H100 (tenth session), promoting every 256 instead gave 1.55-1.65x
# cuBLAS's error (FC1 at H = 7168, FC2 at I = 768), every 128 within 1.1x of it.
PROMOTE_K = 128
WGMMA_K_FP8 = 32  # k of one fp8 wgmma instruction (a k-block of the staged tile)

# ----------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------


def cute_available() -> bool:
    try:
        import cutlass  # noqa: F401
        import cutlass.cute  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def device_ok(device: torch.device) -> tuple[bool, str]:
    """Whether the CuTe kernels can run on ``device`` at all: a CUDA sm_90 device with CuTe DSL
    installed (each kernel's ``runtime_ok`` adds its tensors' rules)."""
    if device.type != "cuda":
        return False, "the CuTe kernel runs on CUDA devices only"
    cap = capability(device)
    if cap != (9, 0):
        return False, f"the CuTe kernel is built for sm_90a (Hopper); {device} is sm_{cap[0]}{cap[1]}"
    if not cute_available():
        return False, "CuTe DSL (nvidia-cutlass-dsl) is not installed"
    return True, ""


_TORCH_TO_CUTLASS = {}


def cutlass_dtype(dt: torch.dtype):
    """The cutlass numeric type of a torch dtype (fp8 e4m3, bf16, fp16, fp32)."""
    import cutlass

    if not _TORCH_TO_CUTLASS:
        _TORCH_TO_CUTLASS.update({
            torch.float8_e4m3fn: cutlass.Float8E4M3FN,
            torch.bfloat16: cutlass.BFloat16,
            torch.float16: cutlass.Float16,
            torch.float32: cutlass.Float32,
        })
    return _TORCH_TO_CUTLASS[dt]


def ptr(t: torch.Tensor, dtype, align: int = 16):
    """A global-memory cute pointer to ``t``'s data, ``align`` bytes aligned."""
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    return make_ptr(dtype, t.data_ptr(), cute.AddressSpace.gmem, assumed_align=align)


@functools.lru_cache(maxsize=32)
def max_active_clusters(device_index: int, cluster_size: int) -> int:
    """How many clusters of this size the GPU can hold at once (asked once per device and
    size, at the first call that needs it; never at import). Clusters must fit in one GPC, so
    for size 4 or 8 this is less than SMs / size: a launch sized by SMs alone would run a
    second, nearly empty wave."""
    import cutlass.utils as utils

    with torch.cuda.device(device_index):
        return int(utils.HardwareInfo(device_index).get_max_active_clusters(cluster_size))


def compile_kernel(kernel, *args):
    """``cute.compile(kernel, *args)``. The epilogues walk the accumulator with loops unrolled at
    trace time on purpose (``range_constexpr``: every value keeps its own register); the DSL's
    warning that such a loop may compile slowly is about compile time only, so it is not shown."""
    import warnings

    import cutlass.cute as cute

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"This static loop has \d+ iterations")
        return cute.compile(kernel, *args)


# ----------------------------------------------------------------------------------------
# Trace time, host function (the kernel's @cute.jit __call__)
# ----------------------------------------------------------------------------------------


def tiled_mma(ab_dtype, consumers: int, wgmma_n: int):
    """The wgmma tiled MMA: K-major A and B of ``ab_dtype``, fp32 accumulators, one 64-row
    atom per consumer warpgroup along M, ``wgmma_n`` columns."""
    import cutlass
    import cutlass.cute as cute
    import cutlass.utils.hopper_helpers as sm90_utils

    return sm90_utils.make_trivial_tiled_mma(
        ab_dtype, ab_dtype,
        cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.K,
        cutlass.Float32, (consumers, 1, 1), tiler_mn=(64, wgmma_n))


def smem_layout(ab_dtype, tile_k: int, rows: int, stages: int):
    """Staged shared-memory layout ``(rows, tile_k, stages)`` of a K-major operand, tiled with
    the swizzle atom that ``tile_k`` elements of ``ab_dtype`` call for."""
    import cutlass.cute as cute
    import cutlass.tensor_utils as tensor_utils
    import cutlass.utils.hopper_helpers as sm90_utils

    atom = cute.nvgpu.warpgroup.make_smem_layout_atom(
        sm90_utils.get_smem_layout_atom(tensor_utils.LayoutEnum.ROW_MAJOR, ab_dtype, tile_k), ab_dtype)
    return cute.tile_to_shape(atom, (rows, tile_k, stages), order=(0, 1, 2))


def tma_atom(tensor, smem_layout_staged, rows: int, tile_k: int, mcast: int):
    """(TMA load atom, TMA tensor) for ``(rows, tile_k)`` boxes of ``tensor`` into one stage of
    ``smem_layout_staged``; a multicast load when ``mcast`` CTAs share the tile."""
    import cutlass.cute as cute

    op = (cute.nvgpu.cpasync.CopyBulkTensorTileG2SOp() if mcast == 1
          else cute.nvgpu.cpasync.CopyBulkTensorTileG2SMulticastOp())
    one_stage = cute.slice_(smem_layout_staged, (None, None, 0))
    return cute.nvgpu.cpasync.make_tiled_tma_atom(op, tensor, one_stage, (rows, tile_k), num_multicast=mcast)


def launch(kernel_call, num_clusters, cluster: tuple[int, int], threads: int, stream) -> None:
    """Launch ``num_clusters`` clusters of ``cluster = (cluster_n, cluster_m)`` CTAs of
    ``threads`` threads (grid x: clusters * cluster_n, grid y: cluster_m)."""
    kernel_call.launch(
        grid=[num_clusters * cluster[0], cluster[1], 1],
        block=[threads, 1, 1],
        cluster=[cluster[0], cluster[1], 1],
        min_blocks_per_mp=1,
        stream=stream,
    )


# ----------------------------------------------------------------------------------------
# Trace time, device function (the kernel's @cute.kernel)
# ----------------------------------------------------------------------------------------


class ClusterCoords(NamedTuple):
    """Where this CTA sits in its cluster and in the launch."""

    layout: Any  # the (cluster_n, cluster_m, 1) CTA layout
    coord: Any  # this CTA's (rank_n, rank_m, 0)
    w_mask: Any  # multicast mask of the CTAs sharing this CTA's weight tile (mode 1); 0 if cluster_m == 1
    tok_mask: Any  # multicast mask of the CTAs sharing this CTA's token tile (mode 0); 0 if cluster_n == 1
    cluster_id: Any  # this cluster's index in the launch
    num_clusters: Any  # clusters launched


def cluster_coords(cluster: tuple[int, int]) -> ClusterCoords:
    """The cluster coordinates and multicast masks of the calling CTA (grid as ``launch``)."""
    import cutlass.cute as cute

    cn, cm = cluster
    cta_layout = cute.make_layout((cn, cm, 1))
    rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())
    ccoord = cta_layout.get_flat_coord(rank)
    w_mask = cute.make_layout_image_mask(cta_layout, ccoord, mode=1) if cm > 1 else 0
    tok_mask = cute.make_layout_image_mask(cta_layout, ccoord, mode=0) if cn > 1 else 0
    bidx, _, _ = cute.arch.block_idx()
    gdim, _, _ = cute.arch.grid_dim()
    return ClusterCoords(cta_layout, ccoord, w_mask, tok_mask, bidx // cn, gdim // cn)


def load_pipeline(barrier_storage, stages: int, tx_bytes: int, cta_layout, cluster: tuple[int, int],
                  mcast_size: int, consumers: int):
    """The TMA -> wgmma load ring: ``PipelineTmaAsync`` over ``stages`` full/empty mbarrier
    pairs at ``barrier_storage``, ``tx_bytes`` landing per stage, released by every consumer
    warp (4 per consumer warpgroup) of each of the ``mcast_size`` CTAs that write into this
    CTA's ring (itself included). Arrives on the cluster's init barrier; the kernel must call
    ``pipeline.pipeline_init_wait`` before the ring is used."""
    import cutlass.cute as cute
    import cutlass.pipeline as pipeline

    pipe = pipeline.PipelineTmaAsync.create(
        barrier_storage=barrier_storage,
        num_stages=stages,
        producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
        consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, mcast_size * consumers * 4),
        tx_count=tx_bytes,
        cta_layout_vmnk=cute.make_layout((1, *cta_layout.shape)),
        defer_sync=True,
    )
    pipeline.pipeline_init_arrive(cluster_shape_mn=cluster, is_relaxed=True)
    return pipe


def staged_tensor(mem_range, smem_layout_staged):
    """The swizzled shared-memory tensor of a staged operand buffer (a ``SharedStorage`` field)."""
    return mem_range.get_tensor(smem_layout_staged.outer, swizzle=smem_layout_staged.inner)


def tma_slices(atom, rank, size: int, s_tensor, g_tensor):
    """(shared, global) TMA views of one operand for the CTA at ``rank`` of the ``size`` CTAs
    that multicast it to each other: ``s_tensor`` is staged ``(rows, tile_k, stages)``,
    ``g_tensor`` tiled ``(rows, tile_k, row tiles, k tiles)``."""
    import cutlass.cute as cute

    return cute.nvgpu.cpasync.tma_partition(
        atom, rank, cute.make_layout(size), cute.group_modes(s_tensor, 0, 2), cute.group_modes(g_tensor, 0, 2))


def producer_role() -> None:
    """The producer warpgroup's half of the register hand-over."""
    import cutlass.cute as cute

    cute.arch.setmaxregister_decrease(PRODUCER_REGS)


def consumer_role(tiled_mma, warp_group, tidx):
    """A consumer warpgroup's half of the register hand-over, and its wgmma slices: returns
    (consumer thread index, the warpgroup's slice for the A/B operands, the thread's slice
    for C)."""
    import cutlass.cute as cute

    cute.arch.setmaxregister_increase(CONSUMER_REGS)
    ctid = tidx - 128
    wg_mma = tiled_mma.get_slice((warp_group - 1) * 128)
    thr_mma = tiled_mma.get_slice(ctid)
    return ctid, wg_mma, thr_mma


def promote_blocks(num_kb: int) -> int:
    """k-blocks (fp8 wgmma instructions of ``WGMMA_K_FP8``) per promotion of a staged k-tile of
    ``num_kb`` of them: ``PROMOTE_K`` worth, or the whole k-tile if it is shorter."""
    chunk = min(num_kb, PROMOTE_K // WGMMA_K_FP8)
    assert num_kb % chunk == 0, (num_kb, chunk)
    return chunk


@functools.lru_cache(maxsize=1)
def _jit_helpers():
    """The @cute.jit helpers (need cutlass at definition); built once."""
    import cutlass
    import cutlass.cute as cute

    @cute.jit
    def _mainloop(tiled_mma: cute.TiledMma, pipe, read, release, k_tiles: int, gemms):
        num_kb = cute.size(gemms[0][1], mode=[2])
        for acc, _, _ in gemms:
            acc.fill(0.0)  # (not ACCUMULATE=False: a helper cannot rebind tiled_mma's state)
        cute.nvgpu.warpgroup.fence()
        for kt in cutlass.range(k_tiles, unroll=1):
            pipe.consumer_wait(read)
            for kb in cutlass.range_constexpr(num_kb):
                coord = (None, None, kb, read.index)
                for acc, op_a, op_b in gemms:
                    cute.gemm(tiled_mma, acc, op_a[coord], op_b[coord], acc)
            cute.nvgpu.warpgroup.commit_group()
            if kt > 0:
                cute.nvgpu.warpgroup.wait_group(1)
                pipe.consumer_release(release)
                release.advance()
            read.advance()
        cute.nvgpu.warpgroup.wait_group(0)
        pipe.consumer_release(release)
        release.advance()
        return read, release

    @cute.jit
    def _mainloop_promoted(tiled_mma: cute.TiledMma, pipe, read, release, k_tiles: int, gemms):
        num_kb = cute.size(gemms[0][1], mode=[2])
        chunk = promote_blocks(num_kb)
        for acc, _, _, _ in gemms:
            acc.fill(0.0)
        for kt in cutlass.range(k_tiles, unroll=1):
            pipe.consumer_wait(read)
            for c0 in cutlass.range_constexpr(0, num_kb, chunk):
                cute.nvgpu.warpgroup.fence()
                for kb in cutlass.range_constexpr(c0, c0 + chunk):
                    coord = (None, None, kb, read.index)
                    # a chunk's first k-block overwrites the temporaries (wgmma's scale-d = 0):
                    # no zeros written into registers an earlier wgmma defined
                    tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, kb > c0)
                    for _, op_a, op_b, tmp in gemms:
                        cute.gemm(tiled_mma, tmp, op_a[coord], op_b[coord], tmp)
                cute.nvgpu.warpgroup.commit_group()
                cute.nvgpu.warpgroup.wait_group(0)
                if c0 + chunk == num_kb:
                    pipe.consumer_release(release)  # the stage is read: the producer may refill it
                    release.advance()
                    read.advance()
                for acc, _, _, tmp in gemms:
                    acc.store(acc.load() + tmp.load())
        return read, release

    @cute.jit
    def _mainloop_promoted_shared(tiled_mma: cute.TiledMma, pipe, read, release, k_tiles: int, gemms, tmp):
        num_kb = cute.size(gemms[0][1], mode=[2])
        chunk = promote_blocks(num_kb)
        for acc, _, _ in gemms:
            acc.fill(0.0)
        for kt in cutlass.range(k_tiles, unroll=1):
            pipe.consumer_wait(read)
            for c0 in cutlass.range_constexpr(0, num_kb, chunk):
                for acc, op_a, op_b in gemms:
                    cute.nvgpu.warpgroup.fence()
                    for kb in cutlass.range_constexpr(c0, c0 + chunk):
                        coord = (None, None, kb, read.index)
                        tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, kb > c0)
                        cute.gemm(tiled_mma, tmp, op_a[coord], op_b[coord], tmp)
                    cute.nvgpu.warpgroup.commit_group()
                    cute.nvgpu.warpgroup.wait_group(0)
                    acc.store(acc.load() + tmp.load())
            pipe.consumer_release(release)
            release.advance()
            read.advance()
        return read, release

    return {"mainloop": _mainloop, "mainloop_promoted": _mainloop_promoted,
            "mainloop_promoted_shared": _mainloop_promoted_shared}


def mainloop(tiled_mma, pipe, read, release, k_tiles: int, gemms):
    """One work unit's ``k_tiles`` k-tiles on the consumer side: every ``(acc, A, B)`` of
    ``gemms`` (wgmma fragments, staged) accumulates from zero; per k-tile all k-blocks of all
    products are one commit group, and each stage is released as soon as the group that read
    it is complete (at most two stages held; any number of k-tiles). The caller sets
    ``ACCUMULATE`` on ``tiled_mma`` once. Returns the advanced (read, release) states."""
    return _jit_helpers()["mainloop"](tiled_mma, pipe, read, release, k_tiles, gemms)


def mainloop_promoted(tiled_mma, pipe, read, release, k_tiles: int, gemms):
    """``mainloop`` with the fp8 products promoted into fp32 every ``PROMOTE_K`` of k
    (DeepGEMM's promotion, what cuBLAS does without fast accumulation): every ``(acc, A, B,
    tmp)`` of ``gemms`` multiplies ``PROMOTE_K`` of k (a 128-byte k-tile; half of a 256-byte
    one) into its temporary ``tmp`` (from zero), and the temporary is added into ``acc`` in fp32
    once its group is complete. Hopper's fp8 wgmma keeps a reduced-precision sum inside the
    accumulator, so without this the error grows with the k summed in it (docs/routed.md, "fp8
    accumulation").

    Per ``PROMOTE_K`` the products are one commit group; the warpgroup waits for it
    (``wait_group(0)``), adds the temporaries, and after a k-tile's last group releases its
    stage. The tensor cores are not
    idle meanwhile: the kernels run two consumer warpgroups that are not held in step (no
    CTA-wide barrier in the loop), so one warpgroup's wgmmas run while the other waits and adds.
    Triton's per-k-tile promotion (``max_num_imprecise_acc``) has the same wait, but its CTA
    barriers keep the warpgroups in step (docs/routed-journal.md, "Ninth session"). An earlier form
    with the adds one product behind the MMAs made ptxas serialise every wgmma (C7514).
    Registers: one temporary per product on top of the accumulators (``can_implement`` counts
    them)."""
    return _jit_helpers()["mainloop_promoted"](tiled_mma, pipe, read, release, k_tiles, gemms)


def mainloop_promoted_shared(tiled_mma, pipe, read, release, k_tiles: int, gemms, tmp):
    """``mainloop_promoted`` with one temporary for all products (``gemms`` = ``((acc, A, B),
    ...)``): each product's ``PROMOTE_K`` of k goes into ``tmp`` and is added into its
    accumulator before the next product is issued (one wait per product and ``PROMOTE_K``). One temporary instead of one per
    product: the registers of 128 gate + 128 up columns a warpgroup (3 x 64 a thread), so that a
    unit spans a whole 128-column group of fp8 y (``routed_fc1_sm90``)."""
    return _jit_helpers()["mainloop_promoted_shared"](tiled_mma, pipe, read, release, k_tiles, gemms, tmp)
