"""FC1 (dense-MoE gate/up projection with SwiGLU fused) for Hopper (sm_90a) in NVIDIA's CuTe DSL.

Semantics: the contract of the Triton kernel (``densemoe.kernels.triton.fc1``;
``densemoe.reference.fc1_ref`` is the executable twin)::

    # x:          [M, H]     fp8 e4m3 or bf16, K-major, contiguous
    # w1:         [E*2I, H]  same dtype, K-major, contiguous (expert e: rows e*2I .. e*2I+I-1
    #                        are gate, rows e*2I+I .. e*2I+2I-1 are up: the checkpoint layout)
    # alpha1:     [E]        float32
    # x_scale:    [M]        float32, optional (1 when absent)
    # alpha_post: [M, E]     float32, optional (1 when absent), unit column stride
    # y:          [M, E*I]   bf16 / fp16 / fp32, or fp8 e4m3 with a one-element out_scale
    for m, e, i:
        s = alpha1[e] * x_scale[m]                                   # fp32
        g = s * sum(x[m, k] * w1[e*2I + i, k] for k in range(H))     # wgmma, fp32 accumulate
        u = s * sum(x[m, k] * w1[e*2I + I + i, k] for k in range(H))
        v = silu(g) * u * alpha_post[m, e]                            # fp32
        y[m, e*I + i] = v.to(y.dtype)         # fp8: clamp(v / out_scale, +-448) then round

A plain dense GEMM (N = E*2I, K = H, no per-expert scale along K) with a SwiGLU epilogue that
pairs gate row i with up row I+i of the same expert.

Kernel.

* Work unit = (token tile, expert, tile of I): ``tile_i`` gate rows at ``e*2I + i0`` and the
  ``tile_i`` up rows at ``e*2I + I + i0`` (``tile_i`` divides I, so a unit never straddles two
  experts), times ``tile_m`` tokens, over all of K = H. Units are numbered weight-tile-major,
  token-tile-fastest: ``u = weight_tile * m_tiles + token_tile`` with ``weight_tile = e * (I /
  tile_i) + i0 / tile_i``. The persistent CTAs (``ctas``, default one per SM) take units
  ``cta, cta + G, cta + 2G, ...``: the CTAs running at the same time hold consecutive units, i.e.
  the same few weight tiles against every token tile, so each weight byte comes from DRAM once
  (the other token tiles find it in L2) and x (M * H bytes: a few MB) stays in L2. (With
  clusters the same order holds for groups of tiles: see Clusters below.)
* Two TMA loads per stage fetch the weight tile from the checkpoint layout as it is (no
  re-layout of w1): the gate rows into one shared-memory buffer and the up rows into another
  (same swizzled layout), plus a third load for the token tile. Rows past M read as zeros
  (TMA fills out-of-bounds rows), so a ragged last token tile needs no mask until the store.
* Warp specialisation as in ``fc2_sm90`` (the shared pieces are in ``hopper``): warpgroup 0 is
  the producer (one warp issues the TMA loads into a ``stages``-deep ring guarded by mbarriers,
  ``PipelineTmaAsync``, and gives its registers away with ``setmaxnreg``); warpgroups 1.. are
  consumers issuing wgmma. Each k-tile runs the gate and the up wgmmas into two fp32
  accumulators with identical layouts, so the SwiGLU pairing is element-wise in registers. A
  stage is released as soon as the wgmmas that read it are complete (one commit group in
  flight).
* fp8 promotion (``promote=1``): each k-tile's gate and up products go into two temporaries,
  are waited for and added into the fp32 accumulators (``hopper.mainloop_promoted``), as the
  Triton kernels' per-k-tile promotion does; with two consumer warpgroups not held in step, one
  warpgroup's wgmmas run while the other waits and adds. Without it the wgmmas sum all of H inside their
  accumulators at Hopper's reduced fp8 precision (cuBLAS's fast accumulation).
* Orientation (``swap_ab``): 1 = weights are wgmma's M operand (64 rows per consumer atom) and
  tokens its N (``tile_m`` 16..256: M = 1 costs a 16-wide token tile); 0 = tokens are wgmma's M
  (``tile_m = 64 * consumers``, or ``128 * consumers``: two 64-row atoms per consumer, so that
  M = 256 is one token tile and each weight byte goes to the SMs once) and the weight tile its
  N (``tile_i`` up to 256).
* Clusters (``cluster_n`` x ``cluster_m`` CTAs, at most 4; the construction of ``fc2_sm90``, in ``hopper``).
  The work list is then one of *cluster units*: (weight-tile group ``wg``, token-tile group
  ``mg``), numbered ``wg * m_groups + mg`` (weight-group major, as above), where a weight-tile
  group is ``cluster_n`` consecutive tiles of I (``wt = wg * cluster_n + rank_n``; neighbours
  may belong to two experts) and a token-tile group ``cluster_m`` consecutive token tiles
  (``mt = mg * cluster_m + rank_m``). Cluster ``c`` of ``G`` takes cluster units ``c, c + G,
  ...``, and *every CTA of the cluster walks that same list*: at each step the CTAs of a row
  (same ``rank_m``) hold the same token tile, which each loads ``tile_m / cluster_n`` rows of
  and multicasts to the row, and the CTAs of a column (same ``rank_n``) hold the same weight
  tile, whose gate and up rows each loads ``tile_i / cluster_m`` of and multicasts to the
  column. A consumer warp releases a stage to every CTA of its row and column (the ones that
  write into its ring), so the empty barriers count ``(cluster_n + cluster_m - 1) * warps``.
  Tail: where the tiles of I (``E * I / tile_i``) are not a multiple of ``cluster_n``, or the
  token tiles not a multiple of ``cluster_m``, the last group is padded with tiles past the
  end of w1 (rows >= E * 2I) or of x (rows >= M). A CTA on such a padding unit runs the full
  protocol like its partners (the same k-tiles, its TMA slices, which still multicast its share
  of the shared operand; TMA fills out-of-bounds boxes with zeros and still signals their
  bytes) and only skips the epilogue. So all CTAs of a cluster issue and consume exactly the
  same number of stages: no CTA waits on a barrier that a partner never arrives on, and none
  exits while a partner still multicasts into it (``producer_tail`` waits for every stage's
  release, remote ones included). The launch is rounded to whole clusters and capped by the
  device's ``max_active_clusters`` for the size (clusters must fit in a GPC).
* Epilogue (per unit, after its last wgmma): ``alpha1[e] * x_scale[m]`` and ``alpha_post[m,
  e]`` are read per token column this thread holds (L2-resident), then ``silu(g) * u * post``
  in fp32, converted and stored straight to global memory, masked to rows < M.

Constraints live in ``can_implement``; ``densemoe.ops.fc1`` uses this kernel only where it is
asked for (backend="cute", a pinned ``Fc1CuteConfig`` or a tuned entry) and falls back to (or,
when forced, names why it cannot leave) Triton otherwise.
"""


import dataclasses
import functools

import torch

from densemoe.kernels.cute import hopper
from densemoe.kernels.cute.hopper import (  # shared with FC2; re-exported, the package and tests use them
    MAX_ACC_REGS,
    SMEM_BYTES,
    SMEM_RESERVE,
    cutlass_dtype,
    cute_available,
    max_active_clusters,
    ptr,
)
from densemoe.kernels.common import Fc1Problem

_SCALE_CHUNK = 8  # token columns whose factors the epilogue reads at once (swap_ab: 16 registers)
_INDEX_LIMIT = 2**31  # the kernel's tensor coordinates are 32-bit
FP8 = torch.float8_e4m3fn

__all__ = ["Fc1CuteConfig", "can_implement", "compile_fc1", "runtime_ok", "fc1_cute", "cute_available",
           "units_of", "unit_tiles", "launch_clusters", "launch_ctas"]


def unit_tiles(cu, m_groups, rank_n, rank_m, cluster_n: int, cluster_m: int):
    """(weight tile, token tile) of the CTA at (rank_n, rank_m) of its cluster on cluster unit
    ``cu``: weight-tile group major, token-tile group fastest. The kernel traces this very
    function with its 32-bit values; the host calls it with ints (tests check the schedule).
    A weight tile >= E * I / tile_i or a token tile >= ceil(M / tile_m) is padding."""
    wg = cu // m_groups
    return wg * cluster_n + rank_n, (cu - wg * m_groups) * cluster_m + rank_m


@dataclasses.dataclass(frozen=True)
class Fc1CuteConfig:
    """One tactic of the CuTe DSL FC1 kernel (sm_90a). Every field is a compile-time choice
    except ``ctas``, which only sizes the launch.

    tile_i:    gate rows per unit (and as many up rows): the unit covers rows e*2I + i0 ..
               + tile_i and e*2I + I + i0 .. + tile_i of one expert; must divide I.
               swap_ab=1: wgmma M, a multiple of 64 * consumers in [64, 256];
               swap_ab=0: wgmma N, a multiple of 32 in [32, 256]
    tile_m:    tokens per unit. swap_ab=1: wgmma N, a multiple of 16 in [16, 256];
               swap_ab=0: wgmma M, 64 * consumers or 128 * consumers (two 64-row atoms each)
    tile_k:    k-tile in elements: 128 or 256 bytes per row (fp8 128/256, bf16 64/128);
               must divide H
    stages:    depth of the shared-memory load ring (0 = as deep as shared memory allows, <= 16)
    consumers: consumer warpgroups (1 or 2)
    swap_ab:   1: weights are wgmma's M operand, tokens its N (small M); 0: tokens are wgmma's M
    ctas:      persistent CTAs launched (0 = one per SM; rounded down to whole clusters, never
               more clusters than there are cluster units, nor than the device holds at once)
    cluster_n: CTAs per cluster along the weight tiles (1, 2, 4): they take neighbouring tiles of
               I (possibly of two experts) of the same token tile, which is TMA-multicast to all
               of them (each CTA loads tile_m / cluster_n of its rows)
    cluster_m: CTAs per cluster along the token tiles (1, 2, 4): they take neighbouring token
               tiles of the same weight tile, whose gate and up rows are multicast (each CTA
               loads tile_i / cluster_m of them); cluster_n * cluster_m <= 4
    promote:   fp8 only. 0: the wgmmas accumulate all of H in their accumulators (Hopper's fp8
               accumulation keeps a reduced-precision sum there: cuBLAS's fast accumulation);
               1: each k-tile's gate and up products go into temporaries that are added into
               the fp32 accumulators once complete (``hopper.mainloop_promoted``), the precision of the Triton kernels and of cuBLAS without fast
               accumulation; twice the accumulator registers
    """

    tile_i: int = 64
    tile_m: int = 16
    tile_k: int = 128
    stages: int = 0
    consumers: int = 1
    swap_ab: int = 1
    ctas: int = 0
    cluster_n: int = 1
    cluster_m: int = 1
    promote: int = 0

    backend = "cute"

    def to_str(self) -> str:
        return "fc1-cute:" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_str(s: str) -> "Fc1CuteConfig":
        """Inverse of ``to_str``; fields a string lacks (e.g. the cluster sizes or
        ``promote``, in strings written before they existed) take their defaults."""
        body = s.removeprefix("fc1-cute:")
        return Fc1CuteConfig(**{k: int(v) for k, v in (kv.split("=") for kv in body.split(",") if kv)})

    @property
    def cluster_size(self) -> int:
        return self.cluster_n * self.cluster_m

    def m_atoms(self) -> int:
        """64-row wgmma atoms per consumer warpgroup along the tokens (unswapped: 1 or 2)."""
        return 1 if self.swap_ab else max(1, self.tile_m // (64 * self.consumers))

    def stage_bytes(self, dtype: torch.dtype) -> int:
        """Shared memory of one ring stage: gate tile + up tile + token tile."""
        return (2 * self.tile_i + self.tile_m) * self.tile_k * dtype.itemsize

    def resolved_stages(self, dtype: torch.dtype) -> int:
        if self.stages:
            return self.stages
        return min(16, (SMEM_BYTES - SMEM_RESERVE) // self.stage_bytes(dtype))

    def acc_regs(self) -> int:
        """fp32 registers per consumer thread for the two accumulators (and, ``promote``, their
        two temporaries)."""
        return (2 if self.promote else 1) * 2 * self.tile_i * self.tile_m // (128 * self.consumers)

    def scale_regs(self) -> int:
        """fp32 registers per consumer thread for the epilogue's per-token factors: two
        values per token column, read ``_SCALE_CHUNK`` columns at a time (unswapped: two token
        rows per 64-row atom)."""
        return 2 * min(_SCALE_CHUNK, self.tile_m // 4 if self.swap_ab else 2 * self.m_atoms())


def can_implement(problem: Fc1Problem, config: Fc1CuteConfig) -> tuple[bool, str]:
    """Whether ``config`` can run ``problem`` on the CuTe sm_90a kernel; the reason if not.

    Shape and config rules only (no device queries): ``runtime_ok`` adds the tensors' rules
    (device, contiguity, alignment, CuTe DSL installed).
    """
    c, p = config, problem
    if p.dtype not in (FP8, torch.bfloat16):
        return False, f"input dtype {p.dtype} not supported (fp8 e4m3 or bf16)"
    if p.out_dtype not in (torch.bfloat16, torch.float16, torch.float32, FP8):
        return False, f"out dtype {p.out_dtype} not supported (bf16, fp16, fp32 or fp8 e4m3)"
    if c.consumers not in (1, 2):
        return False, f"consumers={c.consumers} not in (1, 2)"
    if c.swap_ab not in (0, 1):
        return False, f"swap_ab={c.swap_ab} not in (0, 1)"
    if c.promote not in (0, 1):
        return False, f"promote={c.promote} not in (0, 1)"
    if c.promote and p.dtype != FP8:
        return False, "promote=1 is for fp8 inputs (bf16 wgmma accumulates in fp32 already)"
    if c.swap_ab:
        if c.tile_i not in (64, 128, 192, 256) or c.tile_i % (64 * c.consumers):
            return False, f"tile_i={c.tile_i} must be 64/128/192/256 and a multiple of 64 * consumers (wgmma M)"
        if not (16 <= c.tile_m <= 256 and c.tile_m % 16 == 0):
            return False, f"tile_m={c.tile_m} must be a multiple of 16 in [16, 256] (wgmma N)"
    else:
        if c.tile_m not in (64 * c.consumers, 128 * c.consumers):
            return False, (f"tile_m={c.tile_m} must be 64 * consumers or 128 * consumers without swap_ab "
                           f"(one or two wgmma M atoms each)")
        if not (32 <= c.tile_i <= 256 and c.tile_i % 32 == 0):
            return False, f"tile_i={c.tile_i} must be a multiple of 32 in [32, 256] (wgmma N) without swap_ab"
    if p.i % c.tile_i:
        return False, f"tile_i={c.tile_i} does not divide I={p.i} (a unit's gate and up rows are one expert's)"
    row_bytes = c.tile_k * p.dtype.itemsize
    if row_bytes not in (128, 256):
        return False, f"tile_k={c.tile_k} must give 128 or 256 bytes per row for {p.dtype} (128B swizzle atoms)"
    if p.h % c.tile_k:
        return False, f"tile_k={c.tile_k} does not divide H={p.h}"
    regs = c.acc_regs() + c.scale_regs()
    if regs > MAX_ACC_REGS:
        return False, (f"gate and up accumulators{' with their temporaries' if c.promote else ''} and the token "
                       f"factors need {regs} fp32 registers per thread (limit {MAX_ACC_REGS})")
    stages = c.resolved_stages(p.dtype)
    if stages < 2:
        return False, f"stages={stages} must be >= 2"
    smem = stages * c.stage_bytes(p.dtype) + SMEM_RESERVE
    if smem > SMEM_BYTES:
        return False, f"{stages} stages need {smem} B of shared memory (limit {SMEM_BYTES})"
    if c.cluster_n not in (1, 2, 4) or c.cluster_m not in (1, 2, 4) or c.cluster_size > 4:
        return False, (f"cluster ({c.cluster_n}, {c.cluster_m}) must be 1, 2 or 4 along each of weight "
                       f"tiles and token tiles, at most 4 CTAs")
    if c.tile_m % (8 * c.cluster_n):
        return False, (f"cluster_n={c.cluster_n} multicasts tile_m / cluster_n = {c.tile_m / c.cluster_n:g} "
                       f"token rows per CTA; must be a multiple of 8")
    if c.tile_i % (8 * c.cluster_m):
        return False, (f"cluster_m={c.cluster_m} multicasts tile_i / cluster_m = {c.tile_i / c.cluster_m:g} "
                       f"gate (and up) rows per CTA; must be a multiple of 8")
    if c.ctas < 0 or (c.ctas and c.ctas % c.cluster_size):
        return False, f"ctas={c.ctas} must be 0 or a positive multiple of the cluster size ({c.cluster_size})"
    for what, n in (("w1 (E*2I*H)", 2 * p.e * p.i * p.h), ("x (M*H)", p.m * p.h), ("y (M*E*I)", p.m * p.e * p.i)):
        if n >= _INDEX_LIMIT:
            return False, f"{what} has {n} elements: the kernel's indices are 32-bit (< 2**31); split the batch"
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

    log2e = 1.4426950408889634

    class Fc1Sm90:
        def __init__(self, cfg: Fc1CuteConfig, ab_dtype, out_dtype, h: int, e: int, i: int):
            self.cfg = cfg
            self.ab_dtype = ab_dtype
            self.out_dtype = out_dtype
            self.out_fp8 = out_dtype.width == 8
            self.H, self.E, self.I = h, e, i
            self.tile_i, self.tile_m, self.tile_k = cfg.tile_i, cfg.tile_m, cfg.tile_k
            self.kt = h // cfg.tile_k  # k-tiles per unit
            self.i_tiles = i // cfg.tile_i  # units per expert and token tile
            self.w_tiles = e * self.i_tiles
            self.consumers = cfg.consumers
            self.swap = bool(cfg.swap_ab)
            self.promote = bool(cfg.promote)
            self.cluster = (cfg.cluster_n, cfg.cluster_m)
            self.num_mcast_x = cfg.cluster_n  # token tile shared by CTAs on other weight tiles
            self.num_mcast_w = cfg.cluster_m  # gate / up tiles shared by CTAs on other token tiles
            self.w_groups = -(-self.w_tiles // cfg.cluster_n)  # weight-tile groups (last one padded)
            # token factors per consumer thread: one per token column it holds (swap_ab: the
            # accumulator's N), or one per accumulator row it holds (2 per 64-row atom)
            self.scale_n = cfg.tile_m // 4 if self.swap else 2 * cfg.m_atoms()
            self.scale_chunk = min(self.scale_n, _SCALE_CHUNK)  # read this many at a time
            self.threads = 128 * (1 + cfg.consumers)
            self.stages = cfg.resolved_stages(FP8 if ab_dtype.width == 8 else torch.bfloat16)

        # ---------------------------------------------------------------- host side
        @cute.jit
        def __call__(self, w_ptr: cute.Pointer, x_ptr: cute.Pointer, alpha1_ptr: cute.Pointer,
                     xs_ptr: cute.Pointer, post_ptr: cute.Pointer, oscale_ptr: cute.Pointer,
                     y_ptr: cute.Pointer, m: Int32, has_xs: Int32, has_post: Int32, ld_post: Int32,
                     ld_y: Int32, num_clusters: Int32, stream):
            H, E, I = self.H, self.E, self.I
            mW = cute.make_tensor(w_ptr, cute.make_layout((E * 2 * I, H), stride=(H, 1)))
            mX = cute.make_tensor(x_ptr, cute.make_layout((m, H), stride=(H, 1)))
            mAlpha1 = cute.make_tensor(alpha1_ptr, cute.make_layout(E))
            mXs = cute.make_tensor(xs_ptr, cute.make_layout(m))
            mPost = cute.make_tensor(post_ptr, cute.make_layout((m, E), stride=(ld_post, 1)))
            mOscale = cute.make_tensor(oscale_ptr, cute.make_layout(1))
            mY = cute.make_tensor(y_ptr, cute.make_layout((m, E * I), stride=(ld_y, 1)))

            self.tiled_mma = hopper.tiled_mma(self.ab_dtype, self.consumers, self.tile_m if self.swap else self.tile_i)
            w_layout = hopper.smem_layout(self.ab_dtype, self.tile_k, self.tile_i, self.stages)
            x_layout = hopper.smem_layout(self.ab_dtype, self.tile_k, self.tile_m, self.stages)
            tma_w, tma_tw = hopper.tma_atom(mW, w_layout, self.tile_i, self.tile_k, self.num_mcast_w)
            tma_x, tma_tx = hopper.tma_atom(mX, x_layout, self.tile_m, self.tile_k, self.num_mcast_x)

            @cute.struct
            class SharedStorage:
                pipe_mbar: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
                sG: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(w_layout)], 1024]
                sU: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(w_layout)], 1024]
                sX: cute.struct.Align[cute.struct.MemRange[self.ab_dtype, cute.cosize(x_layout)], 1024]

            self.shared_storage = SharedStorage
            hopper.launch(self.kernel(tma_w, tma_tw, tma_x, tma_tx, mAlpha1, mXs, mPost, mOscale, mY, m, has_xs,
                                      has_post, self.tiled_mma, w_layout, x_layout),
                          num_clusters, self.cluster, self.threads, stream)

        # ---------------------------------------------------------------- device side
        @cute.kernel
        def kernel(self, tma_w: cute.CopyAtom, mW: cute.Tensor, tma_x: cute.CopyAtom, mX: cute.Tensor,
                   mAlpha1: cute.Tensor, mXs: cute.Tensor, mPost: cute.Tensor, mOscale: cute.Tensor,
                   mY: cute.Tensor, m: Int32, has_xs: Int32, has_post: Int32, tiled_mma: cute.TiledMma,
                   w_smem_layout: cute.ComposedLayout, x_smem_layout: cute.ComposedLayout):
            tile_i, tile_m, tile_k = self.tile_i, self.tile_m, self.tile_k
            KT, IT = self.kt, self.i_tiles
            cn, cm = self.cluster
            tidx, _, _ = cute.arch.thread_idx()
            warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
            if warp_idx == 0:
                cute.nvgpu.cpasync.prefetch_descriptor(tma_w)
                cute.nvgpu.cpasync.prefetch_descriptor(tma_x)

            # ---- cluster coordinates and multicast masks (mode 0 = cluster_n, CTAs on neighbouring
            # weight tiles; mode 1 = cluster_m, on neighbouring token tiles)
            cta_layout, ccoord, w_mask, x_mask, cluster_id, num_clusters = hopper.cluster_coords(self.cluster)

            # ---- shared memory and the load pipeline
            smem = cutlass.memory.SmemAllocator()
            storage = smem.allocate(self.shared_storage)
            w_one = cute.slice_(w_smem_layout, (None, None, 0))
            x_one = cute.slice_(x_smem_layout, (None, None, 0))
            # every CTA receives whole tiles (its own slices and its partners' multicasts)
            tx_bytes = 2 * cute.size_in_bytes(self.ab_dtype, w_one) + cute.size_in_bytes(self.ab_dtype, x_one)
            # each consumer warp releases a stage to every CTA that multicasts into it: the CTAs
            # of its row and of its column of the cluster (itself counted once)
            mcast_size = self.num_mcast_w + self.num_mcast_x - 1
            pipe = hopper.load_pipeline(storage.pipe_mbar.data_ptr(), self.stages, tx_bytes, cta_layout, self.cluster,
                                        mcast_size, self.consumers)
            sG = hopper.staged_tensor(storage.sG, w_smem_layout)
            sU = hopper.staged_tensor(storage.sU, w_smem_layout)
            sX = hopper.staged_tensor(storage.sX, x_smem_layout)

            # ---- global tiles: (rows, tile_k, row tiles, k tiles)
            gW = cute.local_tile(mW, (tile_i, tile_k), (None, None))
            gX = cute.local_tile(mX, (tile_m, tile_k), (None, None))
            # the weight tiles' slices by rank along cluster_m, the token tile's along cluster_n
            tGsG, tWgW = hopper.tma_slices(tma_w, ccoord[1], cm, sG, gW)
            tUsU, _ = hopper.tma_slices(tma_w, ccoord[1], cm, sU, gW)
            tXsX, tXgX = hopper.tma_slices(tma_x, ccoord[0], cn, sX, gX)

            # ---- the work list: cluster units cluster_id, cluster_id + G, ... (weight-tile group
            # major, token-tile group fastest); every CTA of a cluster walks the same list
            m_tiles = (m + tile_m - 1) // tile_m
            m_groups = (m_tiles + cm - 1) // cm
            cunits = m_groups * self.w_groups

            pipeline.pipeline_init_wait(cluster_shape_mn=self.cluster)
            warp_group = cute.arch.make_warp_uniform(tidx // 128)

            if warp_group == 0:  # ------------------------------------------ producer
                hopper.producer_role()
                if warp_idx == 0:
                    state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
                    for cu in range(cluster_id, cunits, num_clusters):
                        # padding: wt past the weight tiles (rows past w1), mt past M: zeros
                        wt, mt = unit_tiles(cu, m_groups, ccoord[0], ccoord[1], cn, cm)
                        e = wt // IT
                        gate_tile = wt + e * IT  # row tile of w1: (e*2I + it*tile_i) / tile_i
                        up_tile = gate_tile + IT  # I rows further down
                        for kt in cutlass.range(KT, unroll=1):
                            pipe.producer_acquire(state)
                            bar = pipe.producer_get_barrier(state)
                            cute.copy(tma_w, tWgW[(None, gate_tile, kt)], tGsG[(None, state.index)],
                                      tma_bar_ptr=bar, mcast_mask=w_mask)
                            cute.copy(tma_w, tWgW[(None, up_tile, kt)], tUsU[(None, state.index)],
                                      tma_bar_ptr=bar, mcast_mask=w_mask)
                            cute.copy(tma_x, tXgX[(None, mt, kt)], tXsX[(None, state.index)],
                                      tma_bar_ptr=bar, mcast_mask=x_mask)
                            pipe.producer_commit(state)
                            state.advance()
                    pipe.producer_tail(state)
            else:  # --------------------------------------------------------- consumers
                ctid, wg_mma, thr_mma = hopper.consumer_role(tiled_mma, warp_group, tidx)
                # wgmma operands of the gate product (gA, gB) and of the up product (uA, uB)
                if cutlass.const_expr(self.swap):
                    gA = tiled_mma.make_fragment_A(wg_mma.partition_A(sG))
                    uA = tiled_mma.make_fragment_A(wg_mma.partition_A(sU))
                    gB = tiled_mma.make_fragment_B(wg_mma.partition_B(sX))
                    uB = gB
                    cC = cute.make_identity_tensor((tile_i, tile_m))  # (weight row, token)
                else:
                    gA = tiled_mma.make_fragment_A(wg_mma.partition_A(sX))
                    uA = gA
                    gB = tiled_mma.make_fragment_B(wg_mma.partition_B(sG))
                    uB = tiled_mma.make_fragment_B(wg_mma.partition_B(sU))
                    cC = cute.make_identity_tensor((tile_m, tile_i))  # (token, weight row)
                tCcC = thr_mma.partition_C(cC)
                acc_g = cute.make_rmem_tensor(tCcC.shape, Float32)
                acc_u = cute.make_rmem_tensor(tCcC.shape, Float32)
                s_tok = cute.make_rmem_tensor((self.scale_chunk,), Float32)
                p_tok = cute.make_rmem_tensor((self.scale_chunk,), Float32)
                read = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                release = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
                inv_os = Float32(1.0)
                if cutlass.const_expr(self.out_fp8):
                    inv_os = Float32(1.0) / mOscale[0]
                tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
                if cutlass.const_expr(self.promote):
                    tmp_g = cute.make_rmem_tensor(tCcC.shape, Float32)
                    tmp_u = cute.make_rmem_tensor(tCcC.shape, Float32)
                for cu in range(cluster_id, cunits, num_clusters):
                    if cutlass.const_expr(self.promote):
                        # each k-tile's gate and up products into temporaries, added in fp32
                        read, release = hopper.mainloop_promoted(tiled_mma, pipe, read, release, self.kt,
                                                                 ((acc_g, gA, gB, tmp_g), (acc_u, uA, uB, tmp_u)))
                    else:
                        # the gate and the up products of each k-block in one commit group
                        read, release = hopper.mainloop(tiled_mma, pipe, read, release, self.kt,
                                                        ((acc_g, gA, gB), (acc_u, uA, uB)))
                    wt, mt = unit_tiles(cu, m_groups, ccoord[0], ccoord[1], cn, cm)
                    # a padding unit (past the weight tiles or the token tiles): computed on
                    # zeros, not stored
                    if wt < self.w_tiles:
                        if mt < m_tiles:
                            e = wt // IT
                            it = wt - e * IT
                            self._epilogue(acc_g, acc_u, s_tok, p_tok, tCcC, mAlpha1, mXs, mPost, mY, e,
                                           e * self.I + it * tile_i, mt * tile_m, m, has_xs, has_post, inv_os)

        @cute.jit
        def _epilogue(self, acc_g: cute.Tensor, acc_u: cute.Tensor, s_tok: cute.Tensor, p_tok: cute.Tensor,
                      tCcC: cute.Tensor, mAlpha1: cute.Tensor, mXs: cute.Tensor, mPost: cute.Tensor, mY: cute.Tensor,
                      e: Int32, col_base: Int32, m_base: Int32, m: Int32, has_xs: Int32, has_post: Int32,
                      inv_os: Float32):
            """y[tokens, col_base + rows] = silu(g * s) * (u * s) * post for this thread's values.

            The token factors (s = alpha1[e] * x_scale[token], post = alpha_post[token, e]) are read
            ``scale_chunk`` token columns at a time (all loads of a chunk issued together, one L2
            latency per chunk), then every accumulator value of those columns is finished."""
            a1 = mAlpha1[e]
            atoms = cute.size(acc_g, mode=[1])
            chunk = self.scale_chunk
            for c0 in cutlass.range_constexpr(-(-self.scale_n // chunk)):
                for j in cutlass.range_constexpr(min(chunk, self.scale_n - c0 * chunk)):
                    c = c0 * chunk + j
                    if cutlass.const_expr(self.swap):
                        # value mode ((2, 2, tile_m/8), atoms, 1): the token column is set by v0, v2
                        tok = tCcC[((c % 2, 0, c // 2), 0, 0)][1]
                    else:
                        # value mode ((2, 2, tile_i/8), m_atoms, 1): the token row is set by v1
                        # and the atom
                        tok = tCcC[((0, c % 2, 0), c // 2, 0)][0]
                    row = cutlass.min(m_base + tok, m - 1)  # rows past M: clamped, never stored
                    xs = Float32(1.0)
                    if has_xs != 0:
                        xs = mXs[row]
                    post = Float32(1.0)
                    if has_post != 0:
                        post = mPost[row, e]
                    s_tok[j] = a1 * xs
                    p_tok[j] = post
                for j in cutlass.range_constexpr(min(chunk, self.scale_n - c0 * chunk)):
                    c = c0 * chunk + j
                    if cutlass.const_expr(self.swap):
                        for a_ in cutlass.range_constexpr(atoms):
                            for v1 in cutlass.range_constexpr(2):
                                self._finish(acc_g, acc_u, s_tok[j], p_tok[j], tCcC, mY, ((c % 2, v1, c // 2), a_, 0),
                                             col_base, m_base, m, inv_os)
                    else:
                        for v2 in cutlass.range_constexpr(self.tile_i // 8):
                            for v0 in cutlass.range_constexpr(2):
                                self._finish(acc_g, acc_u, s_tok[j], p_tok[j], tCcC, mY,
                                             ((v0, c % 2, v2), c // 2, 0), col_base, m_base, m, inv_os)

        @cute.jit
        def _finish(self, acc_g: cute.Tensor, acc_u: cute.Tensor, s: Float32, post: Float32, tCcC: cute.Tensor,
                    mY: cute.Tensor, crd: cutlass.Constexpr, col_base: Int32, m_base: Int32, m: Int32,
                    inv_os: Float32):
            """One output value: SwiGLU of the paired gate and up accumulators, converted, stored."""
            g = acc_g[crd] * s
            up = acc_u[crd] * s
            sig = Float32(1.0) / (Float32(1.0) + cute.math.exp2(g * (-log2e), fastmath=True))
            val = g * sig * up * post
            if cutlass.const_expr(self.out_fp8):
                # NaN kept (nan=True: IEEE minimum / maximum), as torch.clamp and the Triton kernels
                val = cute.arch.fmin(cute.arch.fmax(val * inv_os, Float32(-448.0), nan=True), Float32(448.0), nan=True)
            if cutlass.const_expr(self.swap):
                col, tok = tCcC[crd][0], tCcC[crd][1]
            else:
                tok, col = tCcC[crd][0], tCcC[crd][1]
            r = m_base + tok
            if r < m:
                mY[r, col_base + col] = val.to(self.out_dtype)

    return Fc1Sm90


@functools.lru_cache(maxsize=1)
def _kernel_class():
    return _build_kernel_class()


@functools.lru_cache(maxsize=1024)  # a tuning sweep compiles a few hundred; each holds one small module
def compile_fc1(config: Fc1CuteConfig, dtype: torch.dtype, out_dtype: torch.dtype, h: int, e: int, i: int):
    """Compile (once per static key) and return the launchable function.

    The key is static only: config, dtypes and the model shape (H, E, I). M, the optional
    inputs' presence (x_scale, alpha_post: runtime flags) and the number of clusters are
    runtime arguments, so every token count shares one compiled kernel per config (the cluster
    shape, a static field of the config, is part of the key).
    """
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    ok, why = can_implement(Fc1Problem(1, h, e, i, dtype, out_dtype), config)
    if not ok:
        raise ValueError(f"CuTe FC1 config {config} cannot run H={h} E={e} I={i} {dtype}: {why}")
    cls = _kernel_class()
    ab = cutlass_dtype(dtype)
    od = cutlass.Float8E4M3FN if out_dtype == FP8 else cutlass_dtype(out_dtype)
    gmem = cute.AddressSpace.gmem
    f32 = cutlass.Float32
    kern = cls(config, ab, od, h, e, i)
    args = (make_ptr(ab, 16, gmem, assumed_align=16), make_ptr(ab, 16, gmem, assumed_align=16),
            make_ptr(f32, 16, gmem, assumed_align=4), make_ptr(f32, 16, gmem, assumed_align=4),
            make_ptr(f32, 16, gmem, assumed_align=4), make_ptr(f32, 16, gmem, assumed_align=4),
            make_ptr(od, 16, gmem, assumed_align=od.width // 8),
            cutlass.Int32(1), cutlass.Int32(1), cutlass.Int32(1), cutlass.Int32(e), cutlass.Int32(e * i),
            cutlass.Int32(1), cuda.CUstream(0))
    return hopper.compile_kernel(kern, *args)


def runtime_ok(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, out: torch.Tensor, *,
               x_scale: torch.Tensor | None = None, alpha_post: torch.Tensor | None = None,
               out_scale: torch.Tensor | None = None) -> tuple[bool, str]:
    """Whether these tensors can take the CuTe path (beyond ``can_implement``)."""
    ok, why = hopper.device_ok(x.device)
    if not ok:
        return False, why
    for name, t in (("x", x), ("w1", w1)):
        if not t.is_contiguous() or t.data_ptr() % 16:
            return False, f"{name} must be contiguous and 16-byte aligned for the CuTe kernel (TMA)"
    for name, t in (("alpha1", alpha1), ("x_scale", x_scale)):
        if t is not None and t.numel() > 1 and t.stride(0) != 1:
            return False, f"{name} must be contiguous for the CuTe kernel"
    if alpha_post is not None and alpha_post.numel() and (alpha_post.stride(1) != 1 or (
            alpha_post.shape[0] > 1 and alpha_post.stride(0) < alpha_post.shape[1])):
        return False, "alpha_post needs unit column stride and non-overlapping rows for the CuTe kernel"
    if out.numel() and (out.stride(1) != 1 or (out.shape[0] > 1 and out.stride(0) < out.shape[1])):
        return False, "out needs unit column stride and non-overlapping rows for the CuTe kernel"
    return True, ""


def units_of(problem: Fc1Problem, config: Fc1CuteConfig) -> int:
    """Cluster work units of one call: (token-tile group of ``cluster_m`` token tiles) x
    (weight-tile group of ``cluster_n`` tiles of I, the last group padded); without clusters
    simply token tiles x experts x tiles of I."""
    p, c = problem, config
    m_groups = -(-(-(-p.m // c.tile_m)) // c.cluster_m)
    w_groups = -(-(p.e * (p.i // c.tile_i)) // c.cluster_n)
    return m_groups * w_groups


def launch_clusters(problem: Fc1Problem, config: Fc1CuteConfig, num_sms: int,
                    max_clusters: int | None = None) -> int:
    """Persistent clusters launched: ``ctas`` (or one CTA per SM) in whole clusters, never more
    than there are cluster units nor than ``max_clusters`` (the device's limit for this
    cluster size; default SMs / size)."""
    c = config
    size = c.cluster_size
    return max(1, min((c.ctas or num_sms) // size, units_of(problem, c), max_clusters or num_sms // size))


def launch_ctas(problem: Fc1Problem, config: Fc1CuteConfig, num_sms: int, max_clusters: int | None = None) -> int:
    """Persistent CTAs launched: ``launch_clusters`` times the cluster size."""
    return launch_clusters(problem, config, num_sms, max_clusters) * config.cluster_size


def fc1_cute(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, y: torch.Tensor,
             config: Fc1CuteConfig, *, x_scale: torch.Tensor | None = None,
             alpha_post: torch.Tensor | None = None, out_scale: torch.Tensor | None = None) -> None:
    """Launch: y [M, E*I] <- FC1(x [M, H], w1 [E*2I, H], alpha1 [E]) (inputs checked by the op)."""
    import cuda.bindings.driver as cuda
    import cutlass

    from densemoe._runtime import sm_count

    M, H = x.shape
    E = alpha1.shape[0]
    I = w1.shape[0] // (2 * E)
    problem = Fc1Problem(M, H, E, I, x.dtype, y.dtype)
    ok, why = can_implement(problem, config)
    if not ok:
        raise ValueError(f"config {config} cannot run {problem}: {why}")
    if y.dtype == FP8 and out_scale is None:
        raise ValueError("an fp8 output needs out_scale")
    if M == 0 or E == 0 or I == 0:
        return
    fn = compile_fc1(config, x.dtype, y.dtype, H, E, I)
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    cap = max_active_clusters(dev, config.cluster_size) if config.cluster_size > 1 else None
    clusters = launch_clusters(problem, config, sm_count(x.device), cap)
    ab = cutlass_dtype(x.dtype)
    od = cutlass.Float8E4M3FN if y.dtype == FP8 else cutlass_dtype(y.dtype)
    f32 = cutlass.Float32
    dummy = alpha1  # never read when its flag is 0
    xs = x_scale if x_scale is not None else dummy
    post = alpha_post if alpha_post is not None else dummy
    osc = out_scale if out_scale is not None else dummy
    ld_post = alpha_post.stride(0) if alpha_post is not None else E
    stream = cuda.CUstream(torch.cuda.current_stream(x.device).cuda_stream)
    fn(ptr(w1, ab), ptr(x, ab), ptr(alpha1, f32, 4), ptr(xs, f32, 4), ptr(post, f32, 4), ptr(osc, f32, 4),
       ptr(y, od, y.element_size()), cutlass.Int32(M), cutlass.Int32(x_scale is not None),
       cutlass.Int32(alpha_post is not None), cutlass.Int32(ld_post), cutlass.Int32(y.stride(0)),
       cutlass.Int32(clusters), stream)
