"""The routed MoE path (tokens grouped by expert) as Triton kernels: the schedule, grouped FC1
with SwiGLU and the fp8 quantisation of its output fused, grouped FC2 with the routing weight
and the scales fused, and the combine.

Semantics (``densemoe.reference.moe_schedule_ref`` and ``routed_experts_ref`` are the twins)::

    # topk_ids [M, k] integer, topk_weights [M, k] float32; pair p = m*k + j (token m, slot j)
    # schedule: the pairs grouped by expert, unpadded
    offsets[e] = #{p : 0 <= ids[p] < e}             # [E+1] int32; offsets[E] = valid pairs
    sorted[offsets[e] : offsets[e+1]] = the pairs p with ids[p] == e          # [M*k] int32
        (in p order up to SMALL_P pairs; above, in the order the placing atomics give)
    # (an id outside [0, E) belongs to no expert: its pair is dropped, contributes nothing)

    # grouped FC1 (rows of y are the sorted positions r, token t = sorted[r] // k)
    for e, r in expert e's rows, i < I:
        s = alpha1[e] * x_scale[t]                          # x_scale: fp8 x only
        g = s * sum_h x[t, h] * w1[e*2I + i, h];  u = s * sum_h x[t, h] * w1[e*2I + I + i, h]
        v = silu(g) * u                                     # fp32
        bf16 out: y[r, i] = bf16(v)
        fp8 out (groups of Q = BLOCK_I columns):  ys[r, i // Q] = amax_{i in group} |v| / 448
              (1 if all zero), y[r, i] = fp8(clamp(v / ys[r, i // Q], +-448))

    # grouped FC2: each pair's row, its routing weight and w2's scale applied
    for e, r in expert e's rows, n < H:
        acc = sum over k-steps kk of BLOCK_K (fp8: each step's partial sum times ys[r, kk // Q]):
              y[r, kk..] . w2[n, e*I + kk..]               # fp32
        rows[sorted[r], n] = acc * w2_scale[e] * topk_weights[sorted[r]]      (bf16, [M*k, H])

    # combine (slot order, fp32): out[m, n] = sum_j rows[m*k + j, n] over the slots j whose id is
    #                                        in [0, E)

Schedule of the GEMMs: expert e's rows are cut into tiles of BLOCK_M rows (the last one ragged);
the units are (tile, column tile), or for FC2 with ``fc2_col_groups`` (tile, group of column
tiles); ``NUM_PROGS`` persistent programs take them in turn. The
number of tiles is read from ``offsets`` on the GPU (no host sync): the grid is fixed whatever
the routing, so CUDA graphs replay with any routing. Each program finds a tile's expert from
the per-expert tile counts it derives from ``offsets`` once. ``SWAP_AB`` makes the weight tile
the MMA's M operand and the tile's rows its N: an expert with 4 tokens fills a 16-wide N instead
of wasting a 64-row M.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from densemoe._runtime import sm_count, supports_tma
from densemoe.kernels.common import SMEM_BYTES, reused_zeros, tma_compatible
from densemoe.kernels.triton.gate_up import gate_up_step
from densemoe.kernels.triton.fp8 import amax_abs, clamp_e4m3, e4m3_scale
from densemoe.kernels.triton.pdl import launch_kwargs, pdl_enter
from densemoe.kernels.triton.quant import quant_groups, quant_groups_meta, quant_row, quant_rows_meta


@dataclasses.dataclass(frozen=True)
class RoutedConfig:
    """Tiles of the routed GEMMs. FC1: BLOCK_M rows of an expert x fc1_block_i columns of I
    (gate and up), fc1_block_k of H per step; FC2: BLOCK_M rows x fc2_block_n columns of H,
    fc2_block_k of I per step. ``block_m`` and ``programs_per_sm`` are both GEMMs' unless
    ``fc2_block_m`` / ``fc2_programs_per_sm`` give FC2 its own (``fc2_part``: each GEMM cuts the
    experts' rows into its own tiles, so the two need not agree; the best FC1 tile and the best
    FC2 tile of a problem often differ). The fp8 output of FC1 has one scale per fc1_block_i
    columns, so fc2_block_k divides it.
    ``atomic_combine``: FC2 adds each pair's weighted row into its token's fp32 output row
    (atomics; the k rows' order varies, so the result may differ in the last bit between runs)
    instead of writing [M*k, H] rows that the combine sums in slot order (deterministic).
    ``tma``: the weight tiles load through TMA descriptors where the device has TMA and the
    tensors allow it (pointer loads otherwise); FC2 then needs fc2_block_k to divide I, so that no
    k-step reads into the next expert's columns.
    ``fused_combine``: FC2 still writes the rows, then counts, per (token, column tile), the pairs
    that have landed; the program that lands a token's last valid pair sums its k rows in slot
    order into the output (the combine kernel's sum, bit for bit, without its launch).
    ``fc2_col_groups`` > 0: an FC2 unit is a tile and one of that many groups of H's column tiles;
    the loop over the group's column tiles is the pipelined one, with each tile's I / fc2_block_k
    k-steps unrolled in it, so the weights of the next column tiles load while this one is
    multiplied and stored. 0: a unit is one column tile, its k-loop pipelined (short where I is:
    two steps at DeepSeek-V3 TP8). The same sums in the same order either way.
    ``fc2_col_major`` (with one column tile a unit): the units run column tile by column tile
    (every tile of column tile 0, then of 1, ...) instead of tile by tile, so a token's k pairs
    land in the same column tile within a short time: the fused combine reads the rows back
    while L2 still holds them, the atomic combine's adds meet in L2 (its fp32 output is M x
    fc2_block_n x 4 bytes per column tile, not M x H x 4). The same bits as the other order
    (fused; atomic: its adds in another order).
    ``fc1_tail_m`` > 0: an expert whose rows pass a whole number of block_m tiles by at most that
    many gets no part-filled tile of its own for them in FC1: its last whole tile also multiplies
    them (a swapped [fc1_block_i, fc1_tail_m] product on the same weight tiles), so their weights
    stream once. Uniform routing leaves about half the experts such a rest; a part-filled tile
    costs about a whole one (it streams the whole weight slab). Each row's k-steps in the same
    order; the tail's MMA has another shape, so its rows may differ from a plain tile's in fp32
    rounding.
    ``fc1_sorted_x``: a gather kernel first copies x's rows into the sorted order ([M*k, H], each
    token's row once per pair; the rows past the valid pairs zero), and FC1 loads a tile's rows
    of that copy through a TMA descriptor (where the device and the copy allow; contiguous
    pointer loads otherwise) instead of gathering them by token with pointer loads, as the dense
    FC1 loads x. The copy costs M*k*H bytes written; the same products in the same order: the
    same bits.
    ``fc2_y_tma``: FC2 loads a tile's rows of y through a TMA descriptor (y's rows are in the
    sorted order, so a tile's are contiguous: no copy needed) instead of pointer loads; the rows
    of the box past the tile's belong to masked outputs (those past the valid pairs were never
    written: they only reach masked rows of the product). Where the device has TMA and tma is on.
    The same products: the same bits.
    ``fc1_cute``: FC1 runs on the CuTe DSL kernel (``kernels/cute/routed_fc1_sm90.py``, chosen
    by the op layer: this module never imports it) on a sorted copy of x, in units of
    ``block_m`` rows (64: each consumer warpgroup its own units; 128: both on one unit):
    ``fc1_block_i`` is its tile of I and fp8 y's scale group, ``fc1_block_k`` its k-tile; FC1's
    other fields are not used (``config_problems`` keeps them at one value, so that one CuTe FC1
    has one config string).
    ``fc2_cute``: FC2 runs on the CuTe DSL kernel (``kernels/cute/routed_fc2_sm90.py``, the op
    layer's choice) in units of ``fc2_block_m`` (or ``block_m``) rows, 64 or 128 (64: each consumer
    warpgroup its own units): ``fc2_block_n`` its tile of H (fp8's 256: two column tiles of 128 a
    unit, the kernel's ``cols`` 2), ``fc2_block_k``
    its k-tile (fp8: FC1's tile of I, one y scale a k-tile); it writes each pair's row for the
    combine (no atomic or fused combine, no column stream or order, no y TMA flag: it loads y by
    TMA anyway), and FC2's other fields stay at one value.
    ``fc1_cute_gather`` (with ``fc1_cute``): the CuTe FC1 loads x's rows straight from x, one TMA
    load a row, instead of from a sorted copy (no copy: M * top_k * H bytes less written and
    read); the same products in the same order: the same bits. Fields added later than a stored
    config string default (``from_str``)."""

    block_m: int = 64
    fc1_block_i: int = 128
    fc1_block_k: int = 128
    fc1_swap_ab: bool = False
    fc1_warps: int = 4
    fc1_stages: int = 3
    fc2_block_n: int = 128
    fc2_block_k: int = 128
    fc2_swap_ab: bool = False
    fc2_warps: int = 4
    fc2_stages: int = 3
    programs_per_sm: int = 1
    flatten: bool = False  # both GEMMs: the k-loop flattened into the persistent loop
    atomic_combine: bool = False  # FC2 adds into the token's fp32 row (no [M*k, H] rows, no fixed order)
    tma: bool = True  # weights through TMA descriptors (Hopper; x rows are gathered: pointer loads)
    fused_combine: bool = False  # FC2's last pair of a token sums its k rows (no combine launch; slot order)
    fc2_col_groups: int = 0  # > 0: FC2's units stream column tiles (this many groups per tile), 0: one each
    fc2_col_major: bool = False  # FC2's units column tile by column tile (a token's k rows close in time)
    fc1_tail_m: int = 0  # > 0: an expert's rest of <= this many rows rides on its last whole FC1 tile
    fc1_sorted_x: bool = False  # FC1 reads x from a copy in the sorted order (TMA where it can), not gathered
    fc2_y_tma: bool = False  # FC2 loads a tile's y rows (contiguous: sorted order) through TMA, not by pointer
    fc1_cute: bool = False  # FC1 on the CuTe DSL kernel (the op layer's choice; FC1's tile of I and k-tile only)
    fc2_cute: bool = False  # FC2 on the CuTe DSL kernel (the op layer's choice; FC2's tiles and k-tile only)
    fc2_block_m: int = 0  # > 0: FC2's tiles of this many rows (0: block_m, FC1's and FC2's)
    fc2_programs_per_sm: int = 0  # > 0: FC2's programs per SM (0: programs_per_sm)
    fc1_cute_gather: bool = False  # the CuTe FC1 gathers x's rows by TMA (no sorted copy of x)

    backend = "triton"  # class attribute, not a field (``ops.choice`` reads it)

    def to_str(self) -> str:
        """``routed:`` and the fields in order, comma-separated (the tuning cache's form)."""
        return "routed:" + ",".join(str(int(v)) for v in dataclasses.astuple(self))

    @classmethod
    def from_str(cls, s: str) -> "RoutedConfig":
        if not s.startswith("routed:"):
            raise ValueError(f"not a routed config: {s!r}")
        vals = [int(v) for v in s[len("routed:"):].split(",")]
        fields = dataclasses.fields(cls)
        if not len(fields) - len(_LATER_FIELDS) <= len(vals) <= len(fields):
            raise ValueError(f"a routed config has {len(fields)} fields, got {len(vals)}: {s!r}")
        return cls(*[bool(v) if f.type in (bool, "bool") else v for f, v in zip(fields, vals)])

    @property
    def deterministic(self) -> bool:
        return not self.atomic_combine

    @property
    def uses_cute(self) -> bool:
        """Whether a GEMM runs on CuTe DSL (``fc1_cute`` / ``fc2_cute``): what needs sm_90 and
        CuTe DSL where the config runs (``ops.choice.tuned`` skips it elsewhere)."""
        return self.fc1_cute or self.fc2_cute

    def fc2_part(self) -> "RoutedConfig":
        """The config FC2 runs: ``block_m`` and ``programs_per_sm`` its own where
        ``fc2_block_m`` / ``fc2_programs_per_sm`` are set (FC2's launch and rules read this)."""
        if not (self.fc2_block_m or self.fc2_programs_per_sm):
            return self
        return dataclasses.replace(self, block_m=self.fc2_block_m or self.block_m,
                                   programs_per_sm=self.fc2_programs_per_sm or self.programs_per_sm,
                                   fc2_block_m=0, fc2_programs_per_sm=0)

    def short(self) -> str:
        return (f"m{self.block_m}/fc1:{'cute-' if self.fc1_cute else ''}{'g-' if self.fc1_cute_gather else ''}"
                f"i{self.fc1_block_i}k{self.fc1_block_k}"
                f"{'s' if self.fc1_swap_ab else ''}"
                f"w{self.fc1_warps}st{self.fc1_stages}{f't{self.fc1_tail_m}' if self.fc1_tail_m else ''}"
                f"{'x' if self.fc1_sorted_x else ''}/fc2:{'cute-' if self.fc2_cute else ''}n{self.fc2_block_n}k{self.fc2_block_k}"
                f"{'s' if self.fc2_swap_ab else ''}w{self.fc2_warps}st{self.fc2_stages}{'y' if self.fc2_y_tma else ''}"
                f"{f'm{self.fc2_block_m}' if self.fc2_block_m else ''}"
                f"{f'p{self.fc2_programs_per_sm}' if self.fc2_programs_per_sm else ''}"
                f"/p{self.programs_per_sm}"
                f"{'/fused' if self.fused_combine else ''}{'/atomic' if self.atomic_combine else ''}"
                f"{f'/g{self.fc2_col_groups}' if self.fc2_col_groups else ''}{'/cm' if self.fc2_col_major else ''}")


# the column stream's y operand loaded once a unit where I is one or two k-steps (``_fc2_unit``'s
# HOIST_Y; ``stream_hoists_y``); a module switch so that a probe can time both in one process
FC2_HOIST_Y = True


def stream_hoists_y(i: int, block_k: int) -> bool:
    """Whether FC2's column stream loads a unit's y tiles once before its column loop (then its
    ring holds only w2's tiles: ``can_implement`` and the tuning space count shared memory so)."""
    return FC2_HOIST_Y and i % block_k == 0 and i // block_k <= 2


# fields appended after tables were stored: a string without them takes their defaults
_LATER_FIELDS = ("fused_combine", "fc2_col_groups", "fc2_col_major", "fc1_tail_m", "fc1_sorted_x", "fc2_y_tma",
                 "fc1_cute", "fc2_cute", "fc2_block_m", "fc2_programs_per_sm", "fc1_cute_gather")
# the column stream unrolls FC2's k-steps per column tile: at most this many (I / fc2_block_k)
MAX_STREAM_STEPS = 8


def can_implement(problem, cfg: RoutedConfig) -> tuple[bool, str]:
    """Whether ``cfg`` runs ``problem`` (a ``RoutedProblem``): (ok, why not). The one validity
    function that the default rules, the tuned-table lookup and the tuner share."""
    bad = config_problems(cfg, problem.dtype == torch.float8_e4m3fn)
    esize = problem.dtype.itemsize
    fc1_stage = (cfg.block_m + cfg.fc1_tail_m + 2 * cfg.fc1_block_i) * cfg.fc1_block_k * esize
    fc2_stage = (cfg.fc2_part().block_m + cfg.fc2_block_n) * cfg.fc2_block_k * esize
    blk = getattr(problem, "block", 0)
    if blk and ((cfg.fc1_block_i, cfg.fc1_block_k, cfg.fc2_block_k) != (blk,) * 3 or cfg.fc2_block_n % blk):
        bad.append(f"block-scaled weights: fc1_block_i, fc1_block_k and fc2_block_k must be {blk} (one weight "
                   f"scale per FC1 tile and per k-step) and fc2_block_n a multiple of {blk} (whole row blocks)")
    if cfg.tma and problem.i % cfg.fc2_block_k:
        bad.append(f"tma: fc2_block_k={cfg.fc2_block_k} must divide I={problem.i} (a TMA k-step must not reach "
                   f"into the next expert)")
    fc2_fixed = 0
    if cfg.fc2_col_groups:
        steps = problem.i // cfg.fc2_block_k
        if problem.i % cfg.fc2_block_k or steps > MAX_STREAM_STEPS:
            bad.append(f"fc2_col_groups: fc2_block_k={cfg.fc2_block_k} must divide I={problem.i} in at most "
                       f"{MAX_STREAM_STEPS} steps (each column tile's k-steps are unrolled)")
        if stream_hoists_y(problem.i, cfg.fc2_block_k):  # y's tiles once a unit, the ring w2's only
            fc2_fixed = steps * cfg.fc2_part().block_m * cfg.fc2_block_k * esize
            fc2_stage = steps * cfg.fc2_block_n * cfg.fc2_block_k * esize
        else:
            fc2_stage = steps * fc2_stage  # a stage holds a column tile's whole k-extent
        if cfg.fc2_col_groups > -(-problem.h // cfg.fc2_block_n):
            bad.append(f"fc2_col_groups={cfg.fc2_col_groups} exceeds H's {-(-problem.h // cfg.fc2_block_n)} "
                       f"column tiles of {cfg.fc2_block_n}")
    if cfg.uses_cute and blk:
        bad.append("fc1_cute / fc2_cute: the CuTe kernels take per-expert scales, not block-scaled weights")
    if fc1_stage * cfg.fc1_stages > SMEM_BYTES - 1024 and not cfg.fc1_cute:
        bad.append(f"FC1's {cfg.fc1_stages} stages of {fc1_stage} B exceed shared memory")
    if fc2_fixed + fc2_stage * cfg.fc2_stages > SMEM_BYTES - 1024 and not cfg.fc2_cute:
        bad.append(f"FC2's {cfg.fc2_stages} stages of {fc2_stage} B exceed shared memory")
    return (not bad, "; ".join(bad))


def config_problems(cfg: RoutedConfig, fp8: bool) -> list[str]:
    """What is wrong with ``cfg`` whatever the shape (empty: nothing)."""
    bad = []
    for name in ("block_m", "fc1_block_i", "fc1_block_k", "fc2_block_n", "fc2_block_k"):
        val = getattr(cfg, name)
        if not isinstance(val, int) or val < 16 or val & (val - 1):
            bad.append(f"{name}={val!r} must be a power of two >= 16")
    if cfg.fc2_block_m and (not isinstance(cfg.fc2_block_m, int) or cfg.fc2_block_m < 16
                            or cfg.fc2_block_m & (cfg.fc2_block_m - 1)):
        bad.append(f"fc2_block_m={cfg.fc2_block_m!r} must be 0 (block_m) or a power of two >= 16")
    if bad:
        return bad
    if fp8 and cfg.fc1_block_i % cfg.fc2_block_k:
        bad.append(f"fc2_block_k={cfg.fc2_block_k} must divide fc1_block_i={cfg.fc1_block_i} (one y scale "
                   f"per fc1_block_i columns, applied per FC2 k-step)")
    for name in ("fc1_warps", "fc2_warps"):
        if getattr(cfg, name) not in (4, 8):
            bad.append(f"{name} must be 4 or 8")
    for name in ("fc1_stages", "fc2_stages"):
        if getattr(cfg, name) not in (1, 2, 3, 4, 5):
            bad.append(f"{name} must be in 1..5")
    if cfg.programs_per_sm not in (1, 2, 3, 4):
        bad.append("programs_per_sm must be in 1..4")
    if cfg.fc2_programs_per_sm not in (0, 1, 2, 3, 4):
        bad.append("fc2_programs_per_sm must be 0 (programs_per_sm) or in 1..4")
    if cfg.fc2_block_m == cfg.block_m or cfg.fc2_programs_per_sm == cfg.programs_per_sm:
        bad.append("fc2_block_m / fc2_programs_per_sm equal to block_m / programs_per_sm: leave them 0 "
                   "(one config, one string)")
    if cfg.fc1_tail_m not in (0, 16, 32):
        bad.append(f"fc1_tail_m={cfg.fc1_tail_m!r} must be 0, 16 or 32")
    elif cfg.fc1_tail_m and (cfg.fc1_tail_m > cfg.block_m or cfg.flatten):
        bad.append(f"fc1_tail_m={cfg.fc1_tail_m} needs block_m >= fc1_tail_m (block_m={cfg.block_m}) and no flatten "
                   f"(a tile with a tail runs a loop of its own)")
    if cfg.fc1_sorted_x and cfg.fc1_tail_m:
        bad.append("fc1_sorted_x with fc1_tail_m: the tail's rows would need a second x descriptor; one at most")
    if cfg.fc1_cute and (cfg.fc1_block_i not in (64, 128) or cfg.block_m not in (64, 128) or cfg.fc1_swap_ab
                         or cfg.fc1_tail_m or cfg.fc1_sorted_x or (cfg.fc1_warps, cfg.fc1_stages) != (4, 3)):
        bad.append("fc1_cute: FC1's tile of I and block_m (its units' rows) must be 64 or 128, and its Triton "
                   "fields at their defaults (fc1_swap_ab, fc1_tail_m, fc1_sorted_x off, fc1_warps 4, "
                   "fc1_stages 3: the CuTe kernel has its own ring and copy of x)")
    if cfg.fc1_cute_gather and not cfg.fc1_cute:
        bad.append("fc1_cute_gather: the CuTe FC1's way to load x; needs fc1_cute")
    if cfg.fc2_cute and (cfg.fc2_block_n not in ((64, 128, 256) if fp8 else (64, 128))
                         or (cfg.fc2_block_m or cfg.block_m) not in (64, 128)
                         or cfg.fc2_swap_ab or cfg.atomic_combine
                         or cfg.fused_combine or cfg.fc2_col_groups or cfg.fc2_col_major or cfg.fc2_y_tma
                         or cfg.flatten or (cfg.fc2_warps, cfg.fc2_stages) != (4, 3) or cfg.fc2_programs_per_sm):
        bad.append("fc2_cute: FC2's tile of H must be 64 or 128 (or, fp8, 256: two column tiles of 128 a unit) and "
                   "its units' rows (fc2_block_m, or block_m) 64 or 128, "
                   "the combine separate (no atomic or fused combine), and FC2's Triton fields at their "
                   "defaults (fc2_swap_ab, fc2_col_groups, fc2_col_major, fc2_y_tma, flatten off, fc2_warps 4, "
                   "fc2_stages 3, fc2_programs_per_sm 0)")
    if cfg.fused_combine and cfg.atomic_combine:
        bad.append("fused_combine and atomic_combine are two ways to combine: one at most")
    if not isinstance(cfg.fc2_col_groups, int) or not 0 <= cfg.fc2_col_groups <= 64:
        bad.append(f"fc2_col_groups={cfg.fc2_col_groups!r} must be in 0..64")
    elif cfg.fc2_col_groups and cfg.flatten:
        bad.append("fc2_col_groups and flatten are two ways to run FC2's loads ahead: one at most")
    elif cfg.fc2_col_groups and cfg.fc2_col_major:
        bad.append("fc2_col_groups and fc2_col_major are two orders of FC2's units: one at most")
    elif cfg.fc2_col_groups and cfg.fused_combine:  # (tests/test_routed_compile.py)
        bad.append("fc2_col_groups with fused_combine: the combine's counters and barrier in the column loop "
                   "stop Triton from pipelining it")
    return bad


# ----------------------------------------------------------------------------------------------
# the schedule


@triton.jit
def _sort_schedule_kernel(ids_ptr, sorted_ptr, offsets_ptr, P, E, P_PAD: tl.constexpr, BINS: tl.constexpr,
                          PDL: tl.constexpr = False):
    pdl_enter(PDL)
    _sort_pairs(ids_ptr, sorted_ptr, offsets_ptr, P, E, P_PAD, BINS)


@triton.jit
def _sort_pairs(ids_ptr, sorted_ptr, offsets_ptr, P, E, P_PAD: tl.constexpr, BINS: tl.constexpr):
    """One program, all P <= P_PAD pairs: the offsets from a histogram of the ids, the pairs by one
    sort of the keys id * P_PAD + p (ids outside [0, E) as E: they sort last and are not stored),
    so each expert's pairs come in pair order."""
    offs = tl.arange(0, P_PAD)
    ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1)  # native width: no id wraps into range
    ids = tl.where((offs < P) & (ids >= 0) & (ids < E), ids, E).to(tl.int32)
    bins = tl.arange(0, BINS)
    cnt = tl.histogram(ids, BINS)  # bin E: the dropped pairs and the padding
    first = tl.cumsum(cnt, axis=0) - cnt
    tl.store(offsets_ptr + bins, first, mask=bins <= E)  # offsets[E]: the valid pairs
    keys = tl.sort(ids * P_PAD + offs)
    tl.store(sorted_ptr + offs, keys % P_PAD, mask=offs < tl.sum(tl.where(bins < E, cnt, 0), axis=0))


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, P, E, CHUNK: tl.constexpr, BINS: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    _count_chunk(tl.program_id(0), ids_ptr, counts_ptr, P, E, CHUNK, BINS)


@triton.jit
def _count_chunk(c, ids_ptr, counts_ptr, P, E, CHUNK: tl.constexpr, BINS: tl.constexpr):
    """counts[c, e] = pairs of chunk c (CHUNK pairs) with id e; ids outside [0, E) go to bin E."""
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
    ids = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
    h = tl.histogram(ids, BINS)
    bins = tl.arange(0, BINS)
    tl.store(counts_ptr + c * BINS + bins, h, mask=bins < E)


@triton.jit
def _place_kernel(ids_ptr, counts_ptr, cursor_ptr, sorted_ptr, offsets_ptr, P, E, N_CHUNKS,
                  CHUNK: tl.constexpr, BINS: tl.constexpr, PDL: tl.constexpr = False):
    """Chunk c: every expert's offset (the counts of all chunks) plus the pairs of earlier chunks
    is where its pairs start; each pair takes the next slot of its expert's cursor (an atomic on
    this program's own cursor row: the order within a chunk and expert is the hardware's)."""
    pdl_enter(PDL)
    c = tl.program_id(0)
    bins = tl.arange(0, BINS)
    total = tl.zeros((BINS,), dtype=tl.int32)
    before = tl.zeros((BINS,), dtype=tl.int32)
    for c2 in range(0, N_CHUNKS):
        row = tl.load(counts_ptr + c2 * BINS + bins, mask=bins < E, other=0)
        total += row
        before += tl.where(c2 < c, row, 0)
    offsets = tl.cumsum(total, axis=0) - total
    tl.store(cursor_ptr + c * BINS + bins, offsets + before)
    if c == 0:
        tl.store(offsets_ptr + bins, offsets, mask=bins < E)
        tl.store(offsets_ptr + E, tl.sum(total, axis=0))
    tl.debug_barrier()  # the cursor row is read back by the atomics below
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
    ok = (offs < P) & (ids >= 0) & (ids < E)
    slot = tl.atomic_add(cursor_ptr + c * BINS + tl.where(ok, ids, 0).to(tl.int32), 1, mask=ok, sem="relaxed")
    tl.store(sorted_ptr + slot, offs, mask=ok)


SMALL_P = 1024  # up to this many pairs: one launch (``_sort_schedule_kernel``), above it two
CHUNK_P = 1024  # pairs per program of the two-launch schedule


@triton.jit
def _quant_schedule_kernel(x_ptr, q_ptr, s_ptr, H, stride_x, stride_q, stride_s, ids_ptr, sorted_ptr, offsets_ptr,
                           counts_ptr, P, E, N_SCHED, PARTS, SORT: tl.constexpr, P_PAD: tl.constexpr,
                           CHUNK: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                           G: tl.constexpr = 0, GROUPS: tl.constexpr = 1, PDL: tl.constexpr = False):
    """The schedule's first launch and x's fp8 quantisation in one grid: programs 0 .. N_SCHED - 1
    sort all pairs (``SORT``: one program) or count a chunk each; the next ones quantise x, a row
    each per token (``quant.quant_row``), or with ``G`` (groups of G columns, block-scaled
    weights) PARTS programs a row (``quant.quant_groups``). The two read different inputs and
    write different outputs."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    if pid < N_SCHED:
        if SORT:
            _sort_pairs(ids_ptr, sorted_ptr, offsets_ptr, P, E, P_PAD, BINS)
        else:
            _count_chunk(pid, ids_ptr, counts_ptr, P, E, CHUNK, BINS)
    else:
        q = pid - N_SCHED
        if G:
            quant_groups((q // PARTS).to(tl.int64), q % PARTS, x_ptr, q_ptr, s_ptr, H, stride_x, stride_q, stride_s,
                         G, GROUPS)
        else:
            quant_row(q.to(tl.int64), x_ptr, q_ptr, s_ptr, H, stride_x, stride_q, BLOCK, ONE_PASS)


def schedule_launch(topk_ids: torch.Tensor, num_experts: int, sorted_pairs: torch.Tensor,
                    offsets: torch.Tensor, small_p: int | None = None) -> None:
    """Fill ``sorted_pairs`` [M*k] int32 and ``offsets`` [E+1] int32 from ``topk_ids`` [M, k]
    (contiguous, any integer dtype).

    Up to ``SMALL_P`` pairs: one program sorts them all (``_sort_schedule_kernel``), each expert's
    pairs in pair order. Above: two launches over chunks of ``CHUNK_P`` pairs (``_count_kernel``,
    then ``_place_kernel``): the offsets are the same, and within one expert the pairs of a chunk
    come in the order the atomics take them. Nothing downstream depends on that order: every row
    of the grouped GEMMs is computed on its own, and FC2 writes it at its pair index."""
    P = topk_ids.numel()
    dev = topk_ids.device
    bins = triton.next_power_of_2(num_experts + 1)
    if P > (SMALL_P if small_p is None else small_p):
        n_chunks = triton.cdiv(P, CHUNK_P)
        counts = torch.empty((n_chunks, bins), dtype=torch.int32, device=dev)
        _count_kernel[(n_chunks,)](topk_ids, counts, P, num_experts, CHUNK=CHUNK_P, BINS=bins, num_warps=4,
                                   **launch_kwargs(dev))
        _place_launch(topk_ids, counts, num_experts, sorted_pairs, offsets)
        return
    _sort_schedule_kernel[(1,)](topk_ids, sorted_pairs, offsets, P, num_experts, P_PAD=_sort_pad(P, num_experts),
                                BINS=bins, num_warps=4, **launch_kwargs(dev))


def _sort_pad(P: int, num_experts: int) -> int:
    """The one-program sort's pair count, a power of two (a ValueError where its keys overflow)."""
    p_pad = max(16, triton.next_power_of_2(max(P, 1)))
    if num_experts >= 2**31 // p_pad:
        raise ValueError(f"moe schedule: E={num_experts} experts times {p_pad} pairs overflow the sort's int32 keys")
    return p_pad


def _place_launch(topk_ids, counts, num_experts: int, sorted_pairs, offsets) -> None:
    """The schedule's second launch (above ``SMALL_P`` pairs), after the chunks' ``counts``."""
    n_chunks, bins = counts.shape
    cursor = torch.empty((n_chunks, bins), dtype=torch.int32, device=counts.device)
    _place_kernel[(n_chunks,)](topk_ids, counts, cursor, sorted_pairs, offsets, topk_ids.numel(), num_experts,
                               n_chunks, CHUNK=CHUNK_P, BINS=bins, num_warps=4, **launch_kwargs(counts.device))


def quant_schedule_launch(x: torch.Tensor, xq: torch.Tensor, sx: torch.Tensor, topk_ids: torch.Tensor,
                          num_experts: int, sorted_pairs: torch.Tensor, offsets: torch.Tensor, group: int = 0,
                          small_p: int | None = None) -> None:
    """``schedule_launch`` with x's fp8 quantisation in its first launch: per token (xq [M, H]
    fp8, sx [M] fp32 <- x [M, H]: ``quant.quant_rows_triton``'s bits) or with ``group`` per token
    and group of that many columns (sx [M, H / group]: ``quant.quant_groups_triton``'s bits);
    x with unit stride along H. One launch up to ``SMALL_P`` pairs, two above, where the separate
    kernels take two and three."""
    M, H = x.shape
    P = topk_ids.numel()
    dev = x.device
    bins = triton.next_power_of_2(num_experts + 1)
    sort = P <= (SMALL_P if small_p is None else small_p)
    n_sched = 1 if sort else triton.cdiv(P, CHUNK_P)
    counts = sorted_pairs if sort else torch.empty((n_sched, bins), dtype=torch.int32, device=dev)
    if group:
        meta = dict(quant_groups_meta(H, group), BLOCK=16, ONE_PASS=True)
        parts = meta.pop("parts")
    else:
        meta, parts = quant_rows_meta(H), 1
    _quant_schedule_kernel[(n_sched + M * parts,)](
        x, xq, sx, H, x.stride(0), xq.stride(0), sx.stride(0), topk_ids, sorted_pairs, offsets, counts, P,
        num_experts, n_sched, parts, SORT=sort, P_PAD=_sort_pad(P, num_experts) if sort else 16, CHUNK=CHUNK_P,
        BINS=bins, **meta, **launch_kwargs(dev))
    if not sort:
        _place_launch(topk_ids, counts, num_experts, sorted_pairs, offsets)


# ----------------------------------------------------------------------------------------------
# tiles of the grouped GEMMs


@triton.jit
def _tile_table(offsets_ptr, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, TAIL_M: tl.constexpr = 0):
    """(inclusive running tile count per expert [E_PAD], tiles per expert [E_PAD], total tiles).
    ``TAIL_M`` > 0: an expert's rest of at most TAIL_M rows past a whole tile is no tile of its
    own, it rides on the expert's last whole tile (``_tile_at``)."""
    ex = tl.arange(0, E_PAD)
    lo = tl.load(offsets_ptr + ex, mask=ex < E, other=0)
    hi = tl.load(offsets_ptr + ex + 1, mask=ex < E, other=0)
    if TAIL_M > 0:
        full = (hi - lo) // BLOCK_M
        rest = hi - lo - full * BLOCK_M
        tiles = full + ((rest > 0) & ((full == 0) | (rest > TAIL_M))).to(tl.int32)
    else:
        tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    run = tl.cumsum(tiles, axis=0)
    return run, tiles, tl.sum(tiles, axis=0)


@triton.jit
def _tile_at(t, run, tiles, offsets_ptr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, TAIL_M: tl.constexpr = 0):
    """Tile t's expert and its rows [r0, r1) of the sorted pairs (``TAIL_M`` > 0: an expert's
    last tile runs to its last row, up to BLOCK_M + TAIL_M rows)."""
    ex = tl.arange(0, E_PAD)
    e = tl.sum((run <= t).to(tl.int32), axis=0)
    first = tl.sum(tl.where(ex == e, run - tiles, 0), axis=0)
    r0 = tl.load(offsets_ptr + e) + (t - first) * BLOCK_M
    if TAIL_M > 0:
        last = tl.sum(tl.where(ex == e, run, 0), axis=0) - 1 == t
        r1 = tl.where(last, tl.load(offsets_ptr + e + 1), r0 + BLOCK_M)
    else:
        r1 = tl.minimum(r0 + BLOCK_M, tl.load(offsets_ptr + e + 1))
    return e, r0, r1


@triton.jit
def _tile_list_kernel(offsets_ptr, tiles_ptr, count_ptr, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr,
                      CHUNK: tl.constexpr, PDL: tl.constexpr = False):
    """Program e writes its expert's tiles of BLOCK_M sorted rows into the list: tiles[t] =
    (e, first row), t from the running count of the experts before it; program 0 the count."""
    pdl_enter(PDL)
    e = tl.program_id(0)
    run, tiles, total = _tile_table(offsets_ptr, E, BLOCK_M, E_PAD)
    ex = tl.arange(0, E_PAD)
    first = tl.sum(tl.where(ex == e, run - tiles, 0), axis=0)
    mine = tl.sum(tl.where(ex == e, tiles, 0), axis=0)
    lo = tl.load(offsets_ptr + e)
    for j0 in range(0, mine, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        ok = j < mine
        tl.store(tiles_ptr + (first + j) * 2, tl.full((CHUNK,), 0, tl.int32) + e, mask=ok)
        tl.store(tiles_ptr + (first + j) * 2 + 1, lo + j * BLOCK_M, mask=ok)
    if e == 0:
        tl.store(count_ptr, total)


def tile_list_launch(offsets: torch.Tensor, num_experts: int, block_m: int, tiles: torch.Tensor,
                     count: torch.Tensor) -> None:
    """The tiles of ``block_m`` sorted rows as a list, for kernels that take one (the CuTe
    routed FC1): ``tiles`` [T, 2] int32 (expert, first row), each expert's in row order, the
    experts in order, T at least the worst case (``max_tiles``); ``count`` [1] int32 the number
    written. On the GPU, no host sync (graph-capturable)."""
    if tiles.dtype != torch.int32 or count.dtype != torch.int32 or not tiles.is_contiguous():
        raise ValueError("tiles and count must be contiguous int32")
    if num_experts == 0:
        count.zero_()
        return
    _tile_list_kernel[(num_experts,)](offsets, tiles, count, num_experts, BLOCK_M=block_m,
                                      E_PAD=triton.next_power_of_2(num_experts), CHUNK=64, num_warps=1,
                                      **launch_kwargs(offsets.device))


@triton.jit
def _fc1_loop(e, it, tok, r_ok, tok_t, t_ok, x_ptr, w_desc, w_ptr, xs_ptr, ws_ptr, H, I, stride_xm, stride_wn,
              stride_xsm, stride_wsr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
              TAIL_M: tl.constexpr, SWAP_AB: tl.constexpr, NUM_STAGES: tl.constexpr, USE_TMA: tl.constexpr,
              W_BLOCK: tl.constexpr, r0=0, x_desc=None, X_SORTED: tl.constexpr = False):
    """FC1's k-loop over H: the tile's rows (tok, r_ok) into (acc_g, acc_u) and, ``TAIL_M`` > 0,
    the rows past them (tok_t, t_ok) into (tail_g, tail_u) [BLOCK_I, TAIL_M] (swapped: the weight
    tile is the M operand), both from the same weight tiles: one weight stream for both.
    ``X_SORTED``: x_ptr / x_desc is the sorted copy of x, whose rows r0.. are the tile's."""
    if X_SORTED:
        x_rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64) * stride_xm
    else:
        x_rows = tok.to(tl.int64) * stride_xm
    offs_i = it * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = offs_i < I
    gate_rows = (e * 2 * I + offs_i).to(tl.int64) * stride_wn
    up_rows = gate_rows + I * stride_wn
    offs_k = tl.arange(0, BLOCK_K)
    if SWAP_AB:
        acc_g = tl.zeros((BLOCK_I, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_I, BLOCK_M), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_I), dtype=tl.float32)
    if TAIL_M > 0:
        t_rows = tok_t.to(tl.int64) * stride_xm
        tail_g = tl.zeros((BLOCK_I, TAIL_M), dtype=tl.float32)
        tail_u = tl.zeros((BLOCK_I, TAIL_M), dtype=tl.float32)
    else:
        tail_g = 0.0
        tail_u = 0.0
    for k0 in tl.range(0, H, BLOCK_K, num_stages=NUM_STAGES):
        kk = k0 + offs_k
        k_ok = kk < H
        if X_SORTED and USE_TMA:  # rows past the tile's belong to masked outputs
            xt = x_desc.load([r0, k0])
        else:
            xt = tl.load(x_ptr + x_rows[:, None] + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_TMA:  # rows past this expert's I belong to masked outputs; columns past H read 0
            wg = w_desc.load([e * 2 * I + it * BLOCK_I, k0])
            wu = w_desc.load([e * 2 * I + I + it * BLOCK_I, k0])
        else:
            wg = tl.load(w_ptr + gate_rows[:, None] + kk[None, :], mask=i_ok[:, None] & k_ok[None, :], other=0.0)
            wu = tl.load(w_ptr + up_rows[:, None] + kk[None, :], mask=i_ok[:, None] & k_ok[None, :], other=0.0)
        scale_g = 0.0
        scale_u = 0.0
        wsg = 0.0
        wsu = 0.0
        if W_BLOCK:  # block-scaled: each step's fp32 partial sums times x's group scale and w's block scale
            wsg = tl.load(ws_ptr + ((e * 2 * I + it * BLOCK_I) // BLOCK_I) * stride_wsr + k0 // BLOCK_K)
            wsu = tl.load(ws_ptr + ((e * 2 * I + I + it * BLOCK_I) // BLOCK_I) * stride_wsr + k0 // BLOCK_K)
            sx = tl.load(xs_ptr + tok.to(tl.int64) * stride_xsm + k0 // BLOCK_K, mask=r_ok, other=0.0)
            scale_g = sx * wsg
            scale_u = sx * wsu
        acc_g, acc_u = gate_up_step(xt, wg, wu, acc_g, acc_u, scale_g, scale_u, SWAP_AB, W_BLOCK)
        if TAIL_M > 0:
            xt_t = tl.load(x_ptr + t_rows[:, None] + kk[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            tsg = 0.0
            tsu = 0.0
            if W_BLOCK:
                sx_t = tl.load(xs_ptr + tok_t.to(tl.int64) * stride_xsm + k0 // BLOCK_K, mask=t_ok, other=0.0)
                tsg = sx_t * wsg
                tsu = sx_t * wsu
            tail_g, tail_u = gate_up_step(xt_t, wg, wu, tail_g, tail_u, tsg, tsu, True, W_BLOCK)
    if SWAP_AB:  # the epilogue works on [rows, columns]
        acc_g = tl.trans(acc_g)
        acc_u = tl.trans(acc_u)
    return acc_g, acc_u, tail_g, tail_u


@triton.jit
def _fc1_epilogue(acc_g, acc_u, e, it, rows, r_ok, tok, alpha1_ptr, xs_ptr, y_ptr, ys_ptr, I, stride_ym, stride_ysm,
                  BLOCK_I: tl.constexpr, HAS_XS: tl.constexpr, OUT_FP8: tl.constexpr, W_BLOCK: tl.constexpr):
    """The scales, SwiGLU, fp8 y and its scales (or bf16 y) of rows [rows, columns] of FC1."""
    offs_i = it * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = offs_i < I
    s = tl.load(alpha1_ptr + e)
    if HAS_XS and not W_BLOCK:
        s = s * tl.load(xs_ptr + tok, mask=r_ok, other=0.0)[:, None]
    g = acc_g * s
    u_ = acc_u * s
    v = g * tl.sigmoid(g) * u_
    if OUT_FP8:  # one scale per (row, BLOCK_I columns): amax / 448, 1 for an all-zero group
        amax = amax_abs(tl.where(i_ok[None, :], v, 0.0), 1)
        sc = e4m3_scale(amax)
        v = clamp_e4m3(tl.math.div_rn(v, sc[:, None]))
        tl.store(ys_ptr + rows.to(tl.int64) * stride_ysm + it, sc, mask=r_ok)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + offs_i[None, :], v.to(y_ptr.dtype.element_ty),
             mask=r_ok[:, None] & i_ok[None, :])


@triton.jit
def _fc1_unit(u, run, tiles, x_ptr, w_ptr, w_desc, alpha1_ptr, xs_ptr, ws_ptr, sorted_ptr, offsets_ptr, y_ptr,
              ys_ptr, H, I, TOP_K, i_tiles, stride_xm, stride_wn, stride_ym, stride_ysm, stride_xsm, stride_wsr,
              HAS_XS: tl.constexpr, OUT_FP8: tl.constexpr, E_PAD: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
              SWAP_AB: tl.constexpr, NUM_STAGES: tl.constexpr, USE_TMA: tl.constexpr, W_BLOCK: tl.constexpr,
              TAIL_M: tl.constexpr = 0, x_desc=None, X_SORTED: tl.constexpr = False):
    """Unit u = (tile u // i_tiles, column tile u % i_tiles): gather the tile's token rows of x,
    stream the expert's gate and up rows over H into two fp32 accumulators, then the epilogue.
    ``TAIL_M`` > 0: a tile with rows past BLOCK_M (an expert's last, ``_tile_at``) runs the loop
    that also multiplies them, the others the plain one."""
    t = u // i_tiles
    it = u % i_tiles
    e, r0, r1 = _tile_at(t, run, tiles, offsets_ptr, BLOCK_M, E_PAD, TAIL_M)
    rows = r0 + tl.arange(0, BLOCK_M)
    r_ok = rows < tl.minimum(r1, r0 + BLOCK_M)
    tok = tl.load(sorted_ptr + rows, mask=r_ok, other=0) // TOP_K
    if TAIL_M > 0:
        if r1 > r0 + BLOCK_M:
            rows_t = r0 + BLOCK_M + tl.arange(0, TAIL_M)
            t_ok = rows_t < r1
            tok_t = tl.load(sorted_ptr + rows_t, mask=t_ok, other=0) // TOP_K
            acc_g, acc_u, tail_g, tail_u = _fc1_loop(
                e, it, tok, r_ok, tok_t, t_ok, x_ptr, w_desc, w_ptr, xs_ptr, ws_ptr, H, I, stride_xm, stride_wn,
                stride_xsm, stride_wsr, BLOCK_M, BLOCK_I, BLOCK_K, TAIL_M, SWAP_AB, NUM_STAGES, USE_TMA, W_BLOCK)
            _fc1_epilogue(acc_g, acc_u, e, it, rows, r_ok, tok, alpha1_ptr, xs_ptr, y_ptr, ys_ptr, I, stride_ym,
                          stride_ysm, BLOCK_I, HAS_XS, OUT_FP8, W_BLOCK)
            _fc1_epilogue(tl.trans(tail_g), tl.trans(tail_u), e, it, rows_t, t_ok, tok_t, alpha1_ptr, xs_ptr, y_ptr,
                          ys_ptr, I, stride_ym, stride_ysm, BLOCK_I, HAS_XS, OUT_FP8, W_BLOCK)
        else:
            _fc1_tile(e, it, rows, r_ok, tok, x_ptr, w_desc, w_ptr, alpha1_ptr, xs_ptr, ws_ptr, y_ptr, ys_ptr, H, I,
                      stride_xm, stride_wn, stride_ym, stride_ysm, stride_xsm, stride_wsr, HAS_XS, OUT_FP8, BLOCK_M,
                      BLOCK_I, BLOCK_K, SWAP_AB, NUM_STAGES, USE_TMA, W_BLOCK)
    else:
        _fc1_tile(e, it, rows, r_ok, tok, x_ptr, w_desc, w_ptr, alpha1_ptr, xs_ptr, ws_ptr, y_ptr, ys_ptr, H, I,
                  stride_xm, stride_wn, stride_ym, stride_ysm, stride_xsm, stride_wsr, HAS_XS, OUT_FP8, BLOCK_M,
                  BLOCK_I, BLOCK_K, SWAP_AB, NUM_STAGES, USE_TMA, W_BLOCK, r0, x_desc, X_SORTED)


@triton.jit
def _fc1_tile(e, it, rows, r_ok, tok, x_ptr, w_desc, w_ptr, alpha1_ptr, xs_ptr, ws_ptr, y_ptr, ys_ptr, H, I,
              stride_xm, stride_wn, stride_ym, stride_ysm, stride_xsm, stride_wsr, HAS_XS: tl.constexpr,
              OUT_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
              SWAP_AB: tl.constexpr, NUM_STAGES: tl.constexpr, USE_TMA: tl.constexpr, W_BLOCK: tl.constexpr,
              r0=0, x_desc=None, X_SORTED: tl.constexpr = False):
    """A tile without a tail: the k-loop, then the epilogue."""
    acc_g, acc_u, _, _ = _fc1_loop(
        e, it, tok, r_ok, tok, r_ok, x_ptr, w_desc, w_ptr, xs_ptr, ws_ptr, H, I, stride_xm, stride_wn,
        stride_xsm, stride_wsr, BLOCK_M, BLOCK_I, BLOCK_K, 0, SWAP_AB, NUM_STAGES, USE_TMA, W_BLOCK, r0, x_desc,
        X_SORTED)
    _fc1_epilogue(acc_g, acc_u, e, it, rows, r_ok, tok, alpha1_ptr, xs_ptr, y_ptr, ys_ptr, I, stride_ym,
                  stride_ysm, BLOCK_I, HAS_XS, OUT_FP8, W_BLOCK)


@triton.jit(do_not_specialize=["P"])
def _fc1_kernel(x_ptr, w_ptr, w_desc, alpha1_ptr, xs_ptr, ws_ptr, sorted_ptr, offsets_ptr, y_ptr, ys_ptr, x_desc,
                P, H, I, E, TOP_K, NUM_PROGS,
                stride_xm, stride_wn, stride_ym, stride_ysm, stride_xsm, stride_wsr,
                HAS_XS: tl.constexpr, OUT_FP8: tl.constexpr, E_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
                SWAP_AB: tl.constexpr, NUM_STAGES: tl.constexpr, FLATTEN: tl.constexpr = False,
                USE_TMA: tl.constexpr = False, W_BLOCK: tl.constexpr = False, TAIL_M: tl.constexpr = 0,
                X_SORTED: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    run, tiles, n_tiles = _tile_table(offsets_ptr, E, BLOCK_M, E_PAD, TAIL_M)
    i_tiles = tl.cdiv(I, BLOCK_I)
    if FLATTEN:  # the compiler flattens the k-loop into this one: loads run ahead across units
        for u in tl.range(tl.program_id(0), n_tiles * i_tiles, NUM_PROGS, flatten=True):
            _fc1_unit(u, run, tiles, x_ptr, w_ptr, w_desc, alpha1_ptr, xs_ptr, ws_ptr, sorted_ptr, offsets_ptr,
                      y_ptr, ys_ptr, H, I, TOP_K, i_tiles, stride_xm, stride_wn, stride_ym, stride_ysm, stride_xsm,
                      stride_wsr, HAS_XS, OUT_FP8, E_PAD, BLOCK_M, BLOCK_I, BLOCK_K, SWAP_AB, NUM_STAGES, USE_TMA,
                      W_BLOCK, TAIL_M, x_desc, X_SORTED)
    else:
        for u in tl.range(tl.program_id(0), n_tiles * i_tiles, NUM_PROGS):
            _fc1_unit(u, run, tiles, x_ptr, w_ptr, w_desc, alpha1_ptr, xs_ptr, ws_ptr, sorted_ptr, offsets_ptr,
                      y_ptr, ys_ptr, H, I, TOP_K, i_tiles, stride_xm, stride_wn, stride_ym, stride_ysm, stride_xsm,
                      stride_wsr, HAS_XS, OUT_FP8, E_PAD, BLOCK_M, BLOCK_I, BLOCK_K, SWAP_AB, NUM_STAGES, USE_TMA,
                      W_BLOCK, TAIL_M, x_desc, X_SORTED)


@triton.jit
def _fc2_a(k0, rows, r_ok, y_rows, offs_k, y_ptr, ys_ptr, I, Q, stride_ysm, HAS_YS: tl.constexpr,
           y_desc=None, r0=0, Y_TMA: tl.constexpr = False):
    """k-step k0's operand of y: the tile's rows (``Y_TMA``: rows r0.. through ``y_desc``; the
    box's rows past the tile's reach only masked outputs) and, fp8, their scales (else 0.0)."""
    kk = k0 + offs_k
    if Y_TMA:
        a = y_desc.load([r0, k0])
    else:
        a = tl.load(y_ptr + y_rows[:, None] + kk[None, :], mask=r_ok[:, None] & (kk < I)[None, :], other=0.0)
    sy = 0.0
    if HAS_YS:
        sy = tl.load(ys_ptr + rows.to(tl.int64) * stride_ysm + k0 // Q, mask=r_ok, other=0.0)
    return a, sy


@triton.jit
def _fc2_mma(acc, a, sy, k0, e, nt, offs_n, n_ok, w_rows, offs_k, w_ptr, w_desc, ws_ptr, I, stride_wsr,
             HAS_YS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
             USE_TMA: tl.constexpr, W_BLOCK: tl.constexpr):
    """k-step k0 with y's operand (a, sy) given: times the expert's w2 columns, added to acc
    (fp8: the step's fp32 partial sum times its y scale, and w2's block scale for block weights)."""
    kk = k0 + offs_k
    if USE_TMA:  # (I % BLOCK_K == 0: a step never reaches the next expert's columns)
        b = w_desc.load([nt * BLOCK_N, e * I + k0])
    else:
        b = tl.load(w_ptr + w_rows[:, None] + kk[None, :], mask=n_ok[:, None] & (kk < I)[None, :], other=0.0)
    if HAS_YS:  # the DeepGEMM promotion: each step's fp32 partial sum times its y scale
        if W_BLOCK and BLOCK_N > BLOCK_K:  # the tile spans BLOCK_N / 128 row blocks of w2: a scale per column
            sw = tl.load(ws_ptr + (offs_n // BLOCK_K).to(tl.int64) * stride_wsr + (e * I + k0) // BLOCK_K,
                         mask=n_ok, other=0.0)
            if SWAP_AB:
                acc += tl.dot(b, tl.trans(a)) * (sw[:, None] * sy[None, :])
            else:
                acc += tl.dot(a, tl.trans(b)) * (sy[:, None] * sw[None, :])
        else:
            if W_BLOCK:  # and w2's scale of this (row block, column block): one per tile
                sy = sy * tl.load(ws_ptr + nt * stride_wsr + (e * I + k0) // BLOCK_K)
            if SWAP_AB:
                acc += tl.dot(b, tl.trans(a)) * sy[None, :]
            else:
                acc += tl.dot(a, tl.trans(b)) * sy[:, None]
    else:
        if SWAP_AB:  # (bf16 y: no fp8 imprecise accumulation to bound)
            acc = tl.dot(b, tl.trans(a), acc)
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _fc2_kstep(acc, k0, e, nt, rows, r_ok, offs_n, n_ok, y_rows, w_rows, offs_k, y_ptr, ys_ptr, w_ptr, w_desc,
               ws_ptr, I, Q, stride_ysm, stride_wsr, HAS_YS: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr, USE_TMA: tl.constexpr, W_BLOCK: tl.constexpr,
               y_desc=None, r0=0, Y_TMA: tl.constexpr = False):
    """One k-step of FC2 at k0: the tile's rows of y (``_fc2_a``) times the expert's w2 columns
    (``_fc2_mma``), added to acc."""
    a, sy = _fc2_a(k0, rows, r_ok, y_rows, offs_k, y_ptr, ys_ptr, I, Q, stride_ysm, HAS_YS, y_desc, r0, Y_TMA)
    return _fc2_mma(acc, a, sy, k0, e, nt, offs_n, n_ok, w_rows, offs_k, w_ptr, w_desc, ws_ptr, I, stride_wsr,
                    HAS_YS, BLOCK_N, BLOCK_K, SWAP_AB, USE_TMA, W_BLOCK)


@triton.jit
def _fc2_epilogue(acc, e, rows, r_ok, nt, offs_n, n_ok, sorted_ptr, tw_ptr, w2s_ptr, out_ptr, stride_om, TOP_K,
                  ids_ptr, cnt_ptr, fin_ptr, stride_fm, E, n_tiles_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SWAP_AB: tl.constexpr, ATOMIC: tl.constexpr, FUSED: tl.constexpr):
    """w2's scale and the routing weight, then the store of the tile's rows (or, ``ATOMIC``, the
    add into the token's fp32 output row; ``FUSED``, the rows then the token's sum where this
    tile lands its last pair)."""
    pair, wt = _fc2_pair_weight(e, rows, r_ok, sorted_ptr, tw_ptr, w2s_ptr)
    _fc2_store(acc, pair, wt, r_ok, nt, offs_n, n_ok, out_ptr, stride_om, TOP_K, ids_ptr, cnt_ptr, fin_ptr,
               stride_fm, E, n_tiles_n, BLOCK_M, BLOCK_N, SWAP_AB, ATOMIC, FUSED)


@triton.jit
def _fc2_pair_weight(e, rows, r_ok, sorted_ptr, tw_ptr, w2s_ptr):
    """The tile's rows' pairs and their factors: the routing weight times w2's scale."""
    pair = tl.load(sorted_ptr + rows, mask=r_ok, other=0)
    return pair, tl.load(tw_ptr + pair, mask=r_ok, other=0.0) * tl.load(w2s_ptr + e)


@triton.jit
def _fc2_store(acc, pair, wt, r_ok, nt, offs_n, n_ok, out_ptr, stride_om, TOP_K, ids_ptr, cnt_ptr, fin_ptr,
               stride_fm, E, n_tiles_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr,
               ATOMIC: tl.constexpr, FUSED: tl.constexpr):
    """``_fc2_epilogue`` with the pairs and their factors given."""
    if SWAP_AB:
        acc = tl.trans(acc)
    v = acc * wt[:, None]
    mask = r_ok[:, None] & n_ok[None, :]
    if ATOMIC:  # out [M, H] fp32, zeroed: the token's k rows meet here (in no fixed order)
        tl.atomic_add(out_ptr + (pair // TOP_K).to(tl.int64)[:, None] * stride_om + offs_n[None, :], v, mask=mask,
                      sem="relaxed")
    else:
        tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :], v.to(out_ptr.dtype.element_ty),
                 mask=mask)
        if FUSED:  # the token's last valid pair to land sums its k rows, in slot order, into fin
            tl.debug_barrier()  # every thread's rows are issued before the release below
            tok = (pair // TOP_K).to(tl.int64)
            seen = tl.atomic_add(cnt_ptr + tok * n_tiles_n + nt, 1, mask=r_ok, sem="acq_rel")
            valid = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for j in range(0, TOP_K):
                ej = tl.load(ids_ptr + tok * TOP_K + j, mask=r_ok, other=-1)
                valid += ((ej >= 0) & (ej < E)).to(tl.int32)
            last = r_ok & (seen + 1 == valid)
            if tl.sum(last.to(tl.int32), axis=0) > 0:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for j in range(0, TOP_K):
                    ej = tl.load(ids_ptr + tok * TOP_K + j, mask=last, other=-1)
                    okj = last & (ej >= 0) & (ej < E)
                    r = tl.load(out_ptr + (tok * TOP_K + j)[:, None] * stride_om + offs_n[None, :],
                                mask=okj[:, None] & n_ok[None, :], other=0.0, cache_modifier=".cg")
                    total += r.to(tl.float32)
                tl.store(fin_ptr + tok[:, None] * stride_fm + offs_n[None, :], total.to(fin_ptr.dtype.element_ty),
                         mask=last[:, None] & n_ok[None, :])
                tl.debug_barrier()
                # the counter back at zero: the next launch reuses it (all k pairs have landed)
                tl.store(cnt_ptr + tok * n_tiles_n + nt, 0, mask=last)


@triton.jit
def _fc2_columns(nt, e, H, I, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr):
    """Column tile nt of H: its columns, which exist, expert e's w2 row offsets, a zero accumulator."""
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = offs_n.to(tl.int64) * stride_wn + e * I
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return offs_n, offs_n < H, w_rows, acc


@triton.jit
def _fc2_unit(u, run, tiles, y_ptr, ys_ptr, w_ptr, w_desc, w2s_ptr, ws_ptr, sorted_ptr, offsets_ptr, tw_ptr,
              out_ptr, H, I, Q, TOP_K, n_tiles_n, stride_ym, stride_ysm, stride_wn, stride_om, stride_wsr,
              ids_ptr, cnt_ptr, fin_ptr, stride_fm, E, n_groups, n_tiles,
              HAS_YS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr, NUM_STAGES: tl.constexpr, ATOMIC: tl.constexpr,
              USE_TMA: tl.constexpr, W_BLOCK: tl.constexpr, FUSED: tl.constexpr, I_STEPS: tl.constexpr,
              COL_MAJOR: tl.constexpr, y_desc=None, Y_TMA: tl.constexpr = False, HOIST_Y: tl.constexpr = False):
    """``I_STEPS`` = 0: unit u = (tile u // n_tiles_n, column tile u % n_tiles_n), its k-loop over
    I pipelined. ``I_STEPS`` > 0 (= I / BLOCK_K, the column stream): unit u = (tile u // n_groups,
    group u % n_groups of the column tiles); the loop over the group's column tiles is the
    pipelined one, each tile's I_STEPS k-steps unrolled in it, so the next tiles' weights load
    while this one multiplies and stores (FC2's k-loop is short where I is: 2 steps at TP8).
    The same k-steps in the same order either way: the same bits. ``COL_MAJOR`` (I_STEPS = 0):
    unit u = (tile u % n_tiles, column tile u // n_tiles). ``HOIST_Y`` (I_STEPS 1 or 2): the
    unit's y rows, their scales, pairs and factors, the same for every column tile, load once
    before the column loop, so its ring holds only w2's tiles."""
    if I_STEPS == 0:
        if COL_MAJOR:
            t = u % n_tiles
            c0 = u // n_tiles
        else:
            t = u // n_tiles_n
            c0 = u % n_tiles_n
        c1 = c0 + 1
    else:
        t = u // n_groups
        per = tl.cdiv(n_tiles_n, n_groups)
        c0 = (u % n_groups) * per
        c1 = tl.minimum(c0 + per, n_tiles_n)
    e, r0, r1 = _tile_at(t, run, tiles, offsets_ptr, BLOCK_M, E_PAD)
    rows = r0 + tl.arange(0, BLOCK_M)
    r_ok = rows < r1
    y_rows = rows.to(tl.int64) * stride_ym
    offs_k = tl.arange(0, BLOCK_K)
    if I_STEPS == 0:
        nt = c0
        offs_n, n_ok, w_rows, acc = _fc2_columns(nt, e, H, I, stride_wn, BLOCK_M, BLOCK_N, SWAP_AB)
        for k0 in tl.range(0, I, BLOCK_K, num_stages=NUM_STAGES):
            acc = _fc2_kstep(acc, k0, e, nt, rows, r_ok, offs_n, n_ok, y_rows, w_rows, offs_k, y_ptr, ys_ptr, w_ptr,
                             w_desc, ws_ptr, I, Q, stride_ysm, stride_wsr, HAS_YS, BLOCK_N, BLOCK_K, SWAP_AB, USE_TMA,
                             W_BLOCK, y_desc, r0, Y_TMA)
        _fc2_epilogue(acc, e, rows, r_ok, nt, offs_n, n_ok, sorted_ptr, tw_ptr, w2s_ptr, out_ptr, stride_om, TOP_K,
                      ids_ptr, cnt_ptr, fin_ptr, stride_fm, E, n_tiles_n, BLOCK_M, BLOCK_N, SWAP_AB, ATOMIC, FUSED)
    elif HOIST_Y:
        a0, sy0 = _fc2_a(0, rows, r_ok, y_rows, offs_k, y_ptr, ys_ptr, I, Q, stride_ysm, HAS_YS, y_desc, r0, Y_TMA)
        if I_STEPS == 2:
            a1, sy1 = _fc2_a(BLOCK_K, rows, r_ok, y_rows, offs_k, y_ptr, ys_ptr, I, Q, stride_ysm, HAS_YS, y_desc, r0,
                             Y_TMA)
        else:
            a1, sy1 = a0, sy0
        pair, wt = _fc2_pair_weight(e, rows, r_ok, sorted_ptr, tw_ptr, w2s_ptr)
        for nt in tl.range(c0, c1, num_stages=NUM_STAGES):
            offs_n, n_ok, w_rows, acc = _fc2_columns(nt, e, H, I, stride_wn, BLOCK_M, BLOCK_N, SWAP_AB)
            acc = _fc2_mma(acc, a0, sy0, 0, e, nt, offs_n, n_ok, w_rows, offs_k, w_ptr, w_desc, ws_ptr, I, stride_wsr,
                           HAS_YS, BLOCK_N, BLOCK_K, SWAP_AB, USE_TMA, W_BLOCK)
            if I_STEPS == 2:
                acc = _fc2_mma(acc, a1, sy1, BLOCK_K, e, nt, offs_n, n_ok, w_rows, offs_k, w_ptr, w_desc, ws_ptr, I,
                               stride_wsr, HAS_YS, BLOCK_N, BLOCK_K, SWAP_AB, USE_TMA, W_BLOCK)
            _fc2_store(acc, pair, wt, r_ok, nt, offs_n, n_ok, out_ptr, stride_om, TOP_K, ids_ptr, cnt_ptr, fin_ptr,
                       stride_fm, E, n_tiles_n, BLOCK_M, BLOCK_N, SWAP_AB, ATOMIC, FUSED)
    else:
        for nt in tl.range(c0, c1, num_stages=NUM_STAGES):
            offs_n, n_ok, w_rows, acc = _fc2_columns(nt, e, H, I, stride_wn, BLOCK_M, BLOCK_N, SWAP_AB)
            for ks in tl.static_range(I_STEPS):
                acc = _fc2_kstep(acc, ks * BLOCK_K, e, nt, rows, r_ok, offs_n, n_ok, y_rows, w_rows, offs_k, y_ptr,
                                 ys_ptr, w_ptr, w_desc, ws_ptr, I, Q, stride_ysm, stride_wsr, HAS_YS, BLOCK_N, BLOCK_K,
                                 SWAP_AB, USE_TMA, W_BLOCK, y_desc, r0, Y_TMA)
            _fc2_epilogue(acc, e, rows, r_ok, nt, offs_n, n_ok, sorted_ptr, tw_ptr, w2s_ptr, out_ptr, stride_om,
                          TOP_K, ids_ptr, cnt_ptr, fin_ptr, stride_fm, E, n_tiles_n, BLOCK_M, BLOCK_N, SWAP_AB, ATOMIC,
                          FUSED)


@triton.jit(do_not_specialize=["P"])
def _fc2_kernel(y_ptr, ys_ptr, w_ptr, w_desc, w2s_ptr, ws_ptr, sorted_ptr, offsets_ptr, tw_ptr, out_ptr, y_desc,
                P, H, I, E, NUM_PROGS, Q, TOP_K,
                stride_ym, stride_ysm, stride_wn, stride_om, stride_wsr,
                ids_ptr, cnt_ptr, fin_ptr, stride_fm, n_groups,
                HAS_YS: tl.constexpr, E_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SWAP_AB: tl.constexpr, NUM_STAGES: tl.constexpr, ATOMIC: tl.constexpr = False,
                FLATTEN: tl.constexpr = False, USE_TMA: tl.constexpr = False, W_BLOCK: tl.constexpr = False,
                FUSED: tl.constexpr = False, K_PAD: tl.constexpr = 8, I_STEPS: tl.constexpr = 0,
                COL_MAJOR: tl.constexpr = False, Y_TMA: tl.constexpr = False, HOIST_Y: tl.constexpr = False,
                PDL: tl.constexpr = False):
    pdl_enter(PDL)
    run, tiles, n_tiles = _tile_table(offsets_ptr, E, BLOCK_M, E_PAD)
    n_tiles_n = tl.cdiv(H, BLOCK_N)
    if FUSED:  # a token none of whose pairs is valid gets no last pair: its output row is zero here
        slots = tl.arange(0, K_PAD)
        zeros = tl.zeros((BLOCK_N,), dtype=fin_ptr.dtype.element_ty)
        for t in range(tl.program_id(0), P // TOP_K, NUM_PROGS):
            ids = tl.load(ids_ptr + (t * TOP_K + slots).to(tl.int64), mask=slots < TOP_K, other=-1)
            if tl.sum(((ids >= 0) & (ids < E)).to(tl.int32), axis=0) == 0:
                for n0 in range(0, H, BLOCK_N):
                    cols = n0 + tl.arange(0, BLOCK_N)
                    tl.store(fin_ptr + cols.to(tl.int64) + t * stride_fm, zeros, mask=cols < H)
    if I_STEPS == 0:
        n_units = n_tiles * n_tiles_n
    else:  # the column stream: a unit is a tile and a group of its column tiles
        n_units = n_tiles * n_groups
    if FLATTEN:  # FC2's k-loop is short (I / BLOCK_K steps): flattened, loads run ahead across units
        for u in tl.range(tl.program_id(0), n_units, NUM_PROGS, flatten=True):
            _fc2_unit(u, run, tiles, y_ptr, ys_ptr, w_ptr, w_desc, w2s_ptr, ws_ptr, sorted_ptr, offsets_ptr, tw_ptr,
                      out_ptr, H, I, Q, TOP_K, n_tiles_n, stride_ym, stride_ysm, stride_wn, stride_om, stride_wsr,
                      ids_ptr, cnt_ptr, fin_ptr, stride_fm, E, n_groups, n_tiles,
                      HAS_YS, E_PAD, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, NUM_STAGES, ATOMIC, USE_TMA, W_BLOCK, FUSED,
                      I_STEPS, COL_MAJOR, y_desc, Y_TMA, HOIST_Y)
    else:
        for u in tl.range(tl.program_id(0), n_units, NUM_PROGS):
            _fc2_unit(u, run, tiles, y_ptr, ys_ptr, w_ptr, w_desc, w2s_ptr, ws_ptr, sorted_ptr, offsets_ptr, tw_ptr,
                      out_ptr, H, I, Q, TOP_K, n_tiles_n, stride_ym, stride_ysm, stride_wn, stride_om, stride_wsr,
                      ids_ptr, cnt_ptr, fin_ptr, stride_fm, E, n_groups, n_tiles,
                      HAS_YS, E_PAD, BLOCK_M, BLOCK_N, BLOCK_K, SWAP_AB, NUM_STAGES, ATOMIC, USE_TMA, W_BLOCK, FUSED,
                      I_STEPS, COL_MAJOR, y_desc, Y_TMA, HOIST_Y)


@triton.jit
def _combine_kernel(rows_ptr, ids_ptr, out_ptr, H, E, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    PDL: tl.constexpr = False):
    """out[m, n-block] = sum over the slots j with a valid id of rows[m*k + j, n-block], fp32,
    in slot order."""
    pdl_enter(PDL)
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < H
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + m * TOP_K + j + offs * 0)  # the slot's id, one per lane
        r = tl.load(rows_ptr + (m * TOP_K + j) * H + offs, mask=ok & (e >= 0) & (e < E), other=0.0)
        acc += r.to(tl.float32)
    tl.store(out_ptr + m * H + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sorted_rows_kernel(x_ptr, sorted_ptr, offsets_ptr, out_ptr, P, H, E, TOP_K, stride_xm, stride_om,
                        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    """out[r] = x[sorted[r] // TOP_K] for the valid pairs r < offsets[E]; zeros for the rows past
    them up to P (no tile's valid row reads them; zero so that nothing reads unwritten memory)."""
    pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    valid = rows < tl.load(offsets_ptr + E)
    tok = tl.load(sorted_ptr + rows, mask=valid, other=0) // TOP_K
    c_ok = cols < H
    v = tl.load(x_ptr + tok.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=valid[:, None] & c_ok[None, :],
                other=0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], v,
             mask=(rows < P)[:, None] & c_ok[None, :])


def sorted_rows_launch(x: torch.Tensor, sorted_pairs: torch.Tensor, offsets: torch.Tensor, top_k: int,
                       out: torch.Tensor) -> None:
    """out [M*k, H] = x's rows in the sorted order (``_sorted_rows_kernel``)."""
    P, H = out.shape
    E = offsets.numel() - 1
    block_h = min(512, triton.next_power_of_2(max(H, 16)))
    _sorted_rows_kernel[(triton.cdiv(max(P, 1), 16), triton.cdiv(H, block_h))](
        x, sorted_pairs, offsets, out, P, H, E, top_k, x.stride(0), out.stride(0), BLOCK_R=16, BLOCK_H=block_h,
        num_warps=4, **launch_kwargs(x.device))


def _descriptor(t: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def _num_programs(device: torch.device, cfg: RoutedConfig, max_units: int) -> int:
    return max(1, min(max_units, sm_count(device) * cfg.programs_per_sm))


def fc1_launch(x, w1, alpha1, x_scale, sorted_pairs, offsets, y, y_scale, top_k: int, cfg: RoutedConfig,
               w_block_scale=None) -> None:
    """Grouped FC1 into y [M*k, I] (sorted rows) and, for fp8 y, y_scale [M*k, cdiv(I, Q)].
    ``w_block_scale`` [E*2I/128, H/128]: block-scaled w1, x_scale then [M, H/128] (per group)."""
    P = sorted_pairs.numel()
    H = x.shape[1]
    E = alpha1.shape[0]
    I = w1.shape[0] // (2 * E)
    # worst case of tiles: every expert's last tile ragged, and at most one tile per row
    max_tiles = min(P, (P + E * (cfg.block_m - 1)) // cfg.block_m)
    units = max(1, max_tiles * triton.cdiv(I, cfg.fc1_block_i))
    progs = _num_programs(x.device, cfg, units)
    fp8_out = y.dtype == torch.float8_e4m3fn
    use_tma = cfg.tma and supports_tma(x.device) and tma_compatible(w1)
    x_src, x_desc = x, x
    if cfg.fc1_sorted_x:  # the tile's rows contiguous in a sorted copy, loaded as the dense FC1 loads x
        x_src = torch.empty((max(P, 1), H), dtype=x.dtype, device=x.device)
        sorted_rows_launch(x, sorted_pairs, offsets, top_k, x_src[:P])
        use_tma = use_tma and tma_compatible(x_src)
        x_desc = _descriptor(x_src, [cfg.block_m, cfg.fc1_block_k]) if use_tma else x_src
    w_desc = _descriptor(w1, [cfg.fc1_block_i, cfg.fc1_block_k]) if use_tma else w1
    blk = w_block_scale is not None
    _fc1_kernel[(progs,)](
        x_src, w1, w_desc, alpha1, x_scale if x_scale is not None else alpha1, w_block_scale if blk else alpha1,
        sorted_pairs, offsets, y, y_scale if fp8_out else alpha1, x_desc, P, H, I, E, top_k, progs,
        x_src.stride(0), w1.stride(0), y.stride(0), y_scale.stride(0) if fp8_out else 0,
        x_scale.stride(0) if blk else 0, w_block_scale.stride(0) if blk else 0,
        HAS_XS=x_scale is not None, OUT_FP8=fp8_out, E_PAD=triton.next_power_of_2(E),
        BLOCK_M=cfg.block_m, BLOCK_I=cfg.fc1_block_i, BLOCK_K=cfg.fc1_block_k, SWAP_AB=cfg.fc1_swap_ab,
        NUM_STAGES=cfg.fc1_stages, FLATTEN=cfg.flatten, USE_TMA=use_tma, W_BLOCK=blk, TAIL_M=cfg.fc1_tail_m,
        X_SORTED=cfg.fc1_sorted_x, num_warps=cfg.fc1_warps,
        **launch_kwargs(x.device))


def fc2_launch(y, y_scale, w2, w2_scale, sorted_pairs, offsets, topk_weights, rows, group: int,
               cfg: RoutedConfig, top_k: int, w_block_scale=None, topk_ids=None, out=None) -> None:
    """Grouped FC2 into rows [M*k, H] (pair order), weights and scales applied; with
    ``cfg.atomic_combine`` added into rows = the fp32 output [M, H] (zeroed by the caller); with
    ``cfg.fused_combine`` also each token's k rows summed into ``out`` [M, H] (``topk_ids`` [M, k]
    contiguous: which slots count). FC2's own tiles and programs: ``cfg.fc2_part()``."""
    cfg = cfg.fc2_part()
    P = sorted_pairs.numel()
    H = w2.shape[0]
    E = w2_scale.shape[0]
    I = w2.shape[1] // E
    max_tiles = min(P, (P + E * (cfg.block_m - 1)) // cfg.block_m)
    groups = cfg.fc2_col_groups
    units = max(1, max_tiles * (groups or triton.cdiv(H, cfg.fc2_block_n)))
    progs = _num_programs(y.device, cfg, units)
    has_ys = y_scale is not None
    use_tma = cfg.tma and I % cfg.fc2_block_k == 0 and supports_tma(y.device) and tma_compatible(w2)
    w_desc = _descriptor(w2, [cfg.fc2_block_n, cfg.fc2_block_k]) if use_tma else w2
    y_tma = cfg.fc2_y_tma and use_tma and tma_compatible(y)
    y_desc = _descriptor(y, [cfg.block_m, cfg.fc2_block_k]) if y_tma else y
    blk = w_block_scale is not None
    fused = cfg.fused_combine
    if fused:  # per (token, column tile) counters, left at zero by the kernel (this stream's buffer)
        n_tiles_n = triton.cdiv(H, cfg.fc2_block_n)
        cnt = reused_zeros(max(1, (P // max(top_k, 1)) * n_tiles_n), y.device).view(torch.int32)
    _fc2_kernel[(progs,)](
        y, y_scale if has_ys else w2_scale, w2, w_desc, w2_scale, w_block_scale if blk else w2_scale, sorted_pairs,
        offsets, topk_weights, rows, y_desc, P, H, I, E, progs, group, top_k,
        y.stride(0), y_scale.stride(0) if has_ys else 0, w2.stride(0), rows.stride(0),
        w_block_scale.stride(0) if blk else 0,
        topk_ids if fused else sorted_pairs, cnt if fused else sorted_pairs, out if fused else rows,
        out.stride(0) if fused else 0, max(groups, 1),
        HAS_YS=has_ys, I_STEPS=I // cfg.fc2_block_k if groups else 0, COL_MAJOR=cfg.fc2_col_major, E_PAD=triton.next_power_of_2(E), FUSED=fused, K_PAD=triton.next_power_of_2(max(top_k, 1)),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.fc2_block_n, BLOCK_K=cfg.fc2_block_k, SWAP_AB=cfg.fc2_swap_ab,
        NUM_STAGES=cfg.fc2_stages, ATOMIC=cfg.atomic_combine, FLATTEN=cfg.flatten, USE_TMA=use_tma, W_BLOCK=blk,
        Y_TMA=y_tma, HOIST_Y=bool(groups) and stream_hoists_y(I, cfg.fc2_block_k), num_warps=cfg.fc2_warps,
        **launch_kwargs(y.device))


def combine_launch(rows: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor, num_experts: int) -> None:
    M, k = topk_ids.shape
    H = out.shape[1]
    block_n = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(M, triton.cdiv(H, block_n))](rows, topk_ids, out, H, num_experts, TOP_K=k, BLOCK_N=block_n,
                                                  num_warps=4, **launch_kwargs(out.device))
