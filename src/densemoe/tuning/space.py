"""The search spaces of the tunable ops: every tactic described once, filtered by each backend's
``can_implement``, the op's default rule's choice always included.

The space depends on the problem (shape, dtypes, M bucket) only, never on timing, so it is the
same on every machine; configs a device cannot run at all (CuTe DSL missing, not sm_90) are
dropped by the tuner at run time and reported, not here. The spaces are sized so that one
(shape, dtype) sweep compiles a few hundred kernels: compile caches are keyed by config, not M,
so a config shared by several buckets compiles once.

The routed path (``routed_space``) has one backend (Triton) and a smaller space: a few dozen
``RoutedConfig``s per problem, chosen by the rows an expert gets on average (M * top_k / E).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch

from densemoe.kernels.common import SMEM_BYTES, Fc1Problem, Fc2Problem, RoutedProblem
from densemoe.kernels.cute import fc1_sm90 as cute_fc1
from densemoe.kernels.cute import fc2_sm90 as cute_fc2
from densemoe.kernels.cute.fc2_sm90 import Fc2CuteConfig
from densemoe.kernels.triton.fc1 import Fc1TritonConfig
from densemoe.kernels.triton.fc1 import can_implement as fc1_can_implement
from densemoe.kernels.triton.fc2 import Fc2TritonConfig
from densemoe.kernels.triton.fc2 import can_implement as triton_can_implement
from densemoe.kernels.triton.routed import RoutedConfig, stream_hoists_y
from densemoe.ops import fc1_configs, fc2_configs, routed_configs
from densemoe.ops.strategy import expected_picked

BACKENDS = ("triton", "cute")
# routed_space offers FC2's atomic combine (fp32 atomics into the token rows: the last bit of a
# result may then change between runs, docs/routed.md); False keeps every tuned entry on the
# deterministic rows-then-combine path
ROUTED_ATOMIC = True


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _token_tiles(m: int, choices: tuple[int, ...], keep: int) -> list[int]:
    """The ``keep`` largest token tiles not above max(16, next power of two of M): the tile that
    covers M in one piece and the smaller ones that split it."""
    top = max(choices[0], _pow2_at_least(m))
    fit = [c for c in choices if c <= top]
    return fit[-keep:]


def triton_space(problem: Fc2Problem, num_sms: int = 132) -> list[Fc2TritonConfig]:
    """Triton FC2 tactics for ``problem``: token tile x column tile x k-tile x operand swap x
    split of the experts x programs per SM; warps and pipeline depth follow from the tile."""
    p = problem
    out: list[Fc2TritonConfig] = []
    bytes_per = p.dtype.itemsize
    k_tiles = sorted({kb // bytes_per for kb in (128, 256) if p.i % (kb // bytes_per) == 0}) or [32]
    swaps = ([True] if p.m <= 128 else []) + ([False] if p.m >= 64 else [])
    for swap in swaps:
        tokens = _token_tiles(p.m, (16, 32, 64, 128) if swap else (64, 128, 256), keep=2)
        for bm, bn, bk, cps in itertools.product(tokens, (64, 128, 256), k_tiles, (1, 2)):
            warps = 8 if bm * bn >= 128 * 128 else 4
            stage = (bm + bn) * bk * bytes_per
            stages = max(2, min(6, (SMEM_BYTES // cps - 1024) // stage))
            tiles = -(-p.m // bm) * -(-p.n // bn)
            for split in sorted({0, 1, max(1, min(num_sms * cps // tiles, p.e))}):
                cfg = Fc2TritonConfig(bm, bn, bk, warps, stages, swap, True, split, cps)
                if triton_can_implement(p, cfg)[0] and cfg not in out:
                    out.append(cfg)
    return out


def cute_space(problem: Fc2Problem) -> list[Fc2CuteConfig]:
    """CuTe DSL FC2 tactics for ``problem``. Swap-AB (tokens as wgmma N) up to M = 256: token
    tile x weight tile x consumers x temporaries x cluster x k-tile. Tokens as wgmma M from
    M = 64: 64 or 128 token rows x 128/192 columns x temporaries x token-tile cluster x lockstep.
    fp8: every tactic promotes each k-tile into fp32 (``Fc2CuteConfig.promote``, the Triton FC2's
    precision), which takes the one temporary (no ``acc_buffers=2``)."""
    p = problem
    out: list[Fc2CuteConfig] = []
    k128 = 128 // p.dtype.itemsize
    promote = int(p.dtype == torch.float8_e4m3fn)
    bufs = (1,) if promote else (1, 2)

    def add(cfg: Fc2CuteConfig) -> None:
        if cute_fc2.can_implement(p, cfg)[0] and cfg not in out:
            out.append(cfg)

    if p.m <= 256:
        tm_fit = min(128, max(16, -(-p.m // 16) * 16))
        for tm in sorted({tm_fit, _pow2_at_least(tm_fit)} & set(range(16, 257, 16))):
            for (tn, cons), ab, (cn, cm), k in itertools.product(
                    ((64, 1), (128, 1), (128, 2), (256, 2)), bufs, ((1, 1), (2, 1), (1, 2)), (k128, 2 * k128)):
                if cm > 1 and -(-p.m // tm) < 2:
                    continue  # a token-tile cluster needs two token tiles
                add(Fc2CuteConfig(tile_n=tn, tile_m=tm, tile_k=k, consumers=cons, acc_buffers=ab,
                                  cluster_n=cn, cluster_m=cm, promote=promote))
    if p.m >= 64:
        cons = 1 if p.m <= 64 else 2
        for tn, ab, cm, ls in itertools.product((128, 192), bufs, (1, 2), (0, 1)):
            if cm > 1 and -(-p.m // (64 * cons)) < 2:
                continue
            add(Fc2CuteConfig(tile_n=tn, tile_m=64 * cons, tile_k=k128, consumers=cons, acc_buffers=ab,
                              cluster_m=cm, swap_ab=0, lockstep=ls, promote=promote))
    return out


def fc2_space(problem: Fc2Problem, backends=BACKENDS, num_sms: int = 132) -> list:
    """Every FC2 tactic of the given backends for ``problem``, in a fixed order, each one passing
    its backend's ``can_implement``; the backend's heuristic choice is always included."""
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}")
    out: list = []
    if "triton" in backends:
        space = triton_space(problem, num_sms)
        h = fc2_configs.default_config(problem, num_sms)
        out += ([h] if h not in space else []) + space
    if "cute" in backends:
        space = cute_space(problem)
        try:
            h = fc2_configs.default_cute_config(problem)
        except ValueError:  # no CuTe config fits this problem at all
            h = None
        out += ([h] if h is not None and h not in space else []) + space
    return out


def fc1_space(problem: Fc1Problem, backends=("triton",), num_sms: int = 132) -> list:
    """FC1 tactics, in a fixed order, each passing its backend's ``can_implement``.

    Triton: orientation x token tile x tile of I x k-tile x warps; the pipeline depth is 4 (3
    where 4 stages of both operands would not fit shared memory), and also the depth at which
    two programs share an SM where that is 2 or more and shallower; above M = 128 the tokens-as-M
    tiles also as one persistent program per SM; the heuristic's choice first.
    CuTe DSL (sm_90a), always the deepest ring and one CTA per SM (whole clusters):
    swap-AB up to M = 128 (token tile from ``_token_tiles``, tile of I 64/128, k-tile 128/256
    bytes, 1 or 2 consumer warpgroups) and tokens as wgmma's M from M = 64 (64 or 128 tokens,
    tile of I 64/128, both k-tiles); then the same with ``cluster_n=2`` (the token tile
    multicast to two CTAs on neighbouring tiles of I; swap-AB: tile of I 64 with one consumer
    or 128 with two; tokens as M: two consumers above M = 64); above M = 128 also 256-token
    tiles (two 64-row atoms per consumer, tile of I 64/96) alone, with ``cluster_n=2`` and,
    where there are two or more such tiles, ``cluster_m=2``, and the 128-token tiles with
    ``cluster_m=2`` (the weight tile multicast to two token tiles) and with both. fp8: all of
    them with ``promote=1`` where its temporaries fit, and tokens as wgmma's M at 128 tokens x
    64 or 96 rows of I (alone and with ``cluster_n=2``). At most 30 CuTe tactics per M bucket."""
    p = problem
    out: list = []
    ks = sorted({kb // p.dtype.itemsize for kb in (128, 256)})
    if "triton" in backends:
        swaps = ([1] if p.m <= 128 else []) + ([0] if p.m >= 32 else [])
        for swap in swaps:
            tokens = _token_tiles(p.m, (16, 32, 64, 128) if swap else (32, 64, 128), keep=2)
            for bm, bi, bk, warps in itertools.product(tokens, (64, 128), ks, (4, 8)):
                stage = (bm + 2 * bi) * bk * p.dtype.itemsize
                stages = 4 if 4 * stage <= 200 * 1024 else 3
                two = min(4, 100 * 1024 // stage)  # the depth at which two programs share an SM
                cands = [Fc1TritonConfig(bm, bi, bk, warps, stages, swap, 1)]
                if 2 <= two < stages:
                    cands.append(Fc1TritonConfig(bm, bi, bk, warps, two, swap, 1))
                if not swap and p.m > 128:
                    cands.append(Fc1TritonConfig(bm, bi, bk, warps, stages, swap, 1, persistent=1))
                for cfg in cands:
                    if fc1_can_implement(p, cfg)[0] and cfg not in out:
                        out.append(cfg)
        h = fc1_configs.default_config(p)
        out = ([h] if h not in out else []) + out
    if "cute" in backends:
        C = cute_fc1.Fc1CuteConfig
        cands = []
        swap_tokens = _token_tiles(p.m, (16, 32, 64, 128), keep=2) if p.m <= 128 else []
        for tm, ti, tk, cons in itertools.product(swap_tokens, (64, 128), ks, (1, 2)):
            cands.append(C(tile_i=ti, tile_m=tm, tile_k=tk, consumers=cons, swap_ab=1))
        if p.m >= 64:
            for cons, ti, tk in itertools.product((1, 2) if p.m > 64 else (1,), (64, 128), ks):
                cands.append(C(tile_i=ti, tile_m=64 * cons, tile_k=tk, consumers=cons, swap_ab=0))
        # clusters: cluster_n=2 (the token tile read from L2 once per two tiles of I)
        for tm, (ti, cons), tk in itertools.product(swap_tokens, ((64, 1), (128, 2)), ks):
            cands.append(C(tile_i=ti, tile_m=tm, tile_k=tk, consumers=cons, swap_ab=1, cluster_n=2))
        if p.m >= 64:
            cons = 2 if p.m > 64 else 1
            for ti, tk in itertools.product((64, 128), ks):
                cands.append(C(tile_i=ti, tile_m=64 * cons, tile_k=tk, consumers=cons, swap_ab=0, cluster_n=2))
        if p.m > 128:
            # 256 tokens per tile (two atoms per consumer): M <= 256 is one token tile
            two_big = -(-p.m // 256) >= 2
            for ti, tk in itertools.product((64, 96), ks):
                for cn, cm in ((1, 1), (2, 1)) + (((1, 2),) if two_big else ()):
                    cands.append(C(tile_i=ti, tile_m=256, tile_k=tk, consumers=2, swap_ab=0, cluster_n=cn,
                                   cluster_m=cm))
            # 128-token tiles with the weight tile multicast to two token tiles (and both)
            for ti, tk in itertools.product((64, 128), ks):
                cands.append(C(tile_i=ti, tile_m=128, tile_k=tk, consumers=2, swap_ab=0, cluster_m=2))
            for tk in ks:
                cands.append(C(tile_i=128, tile_m=128, tile_k=tk, consumers=2, swap_ab=0, cluster_n=2, cluster_m=2))
        if p.dtype == torch.float8_e4m3fn:
            # fp8: every CuTe tactic promotes each k-tile's products into fp32 (the Triton
            # kernels' precision; ``Fc1CuteConfig.promote``); the temporaries double the
            # accumulators, so some tiles above no longer fit, and these do: tokens as wgmma's
            # M at 128 tokens x 64 or 96 rows of I, swap-AB at 128 rows of I up to 64 tokens
            cands = [dataclasses.replace(c, promote=1) for c in cands]
            if p.m >= 64:
                for ti, tk, cn in itertools.product((64, 96), ks, (1, 2)):
                    cands.append(C(tile_i=ti, tile_m=128, tile_k=tk, consumers=2, swap_ab=0, cluster_n=cn, promote=1))
        for cfg in cands:
            if cute_fc1.can_implement(p, cfg)[0] and cfg not in out:
                out.append(cfg)
    return out


def routed_rows(problem: RoutedProblem) -> float:
    """The rows an expert gets on average under uniform top-k routing: M * top_k / E."""
    return problem.m * problem.top_k / max(problem.e, 1)


def _deepest(stage_bytes: int, programs: int, cap: int, fixed: int = 0) -> int:
    """The deepest ring (at most ``cap``) whose stages fit shared memory, beside ``fixed`` bytes
    a program, with ``programs`` programs per SM; 0 when not even two fit."""
    fits = ((SMEM_BYTES - 1024) // programs - fixed) // stage_bytes
    return min(cap, fits) if fits >= 2 else 0


def _column_groups(problem: RoutedProblem, block_m: int, block_n: int, programs: int, per_program: int) -> int:
    """Groups of FC2's column tiles for the column stream: about ``per_program`` units (tiles x
    groups) a program over the tiles uniform top-k is expected to cut (the experts some token
    picks, each cut into block_m-row tiles), at least two column tiles a group (one where H has
    one), no group empty. Few units a program leave a ragged last round; many refill the ring
    more often."""
    p = problem
    active = max(1.0, expected_picked(p.m, p.e, p.top_k))
    tiles = active * math.ceil(p.m * p.top_k / active / block_m)
    cols = -(-p.h // block_n)
    want = max(1, min(max(1, cols // 2), math.ceil(per_program * programs / tiles), 64))
    per = -(-cols // want)  # column tiles a group
    return -(-cols // per)


# FC1's fields of a routed config (``with_fc1_of``); the rest are FC2's, or both GEMMs' (flatten, tma)
FC1_FIELDS = ("block_m", "fc1_block_i", "fc1_block_k", "fc1_swap_ab", "fc1_warps", "fc1_stages", "programs_per_sm",
              "fc1_tail_m", "fc1_sorted_x", "fc1_cute", "fc1_cute_gather")
# the split configs (128-row FC1, 64-row FC2) take the first this many distinct FC2s of the 64-row base
MAX_FC2_PARTS = 10


def _fc2_key(cfg: RoutedConfig) -> tuple:
    """What FC2 runs in ``cfg``: every field but FC1's (its own block_m and programs resolved)."""
    f2 = cfg.fc2_part()
    return (f2.block_m, f2.programs_per_sm) + tuple(getattr(f2, f.name) for f in dataclasses.fields(f2)
                                                     if f.name not in FC1_FIELDS)


def with_fc1_of(fc2: RoutedConfig, fc1: RoutedConfig) -> RoutedConfig:
    """``fc2``'s FC2 (its tiles, programs, combine and flags) after ``fc1``'s FC1 (its fields,
    ``FC1_FIELDS``): FC2's block_m and programs per SM go to ``fc2_block_m`` /
    ``fc2_programs_per_sm`` where they differ from FC1's (0 where they agree: one config, one
    string). The shared fields (fc1_block_i's y scale group, flatten, tma) are ``fc2``'s."""
    f2 = fc2.fc2_part()
    new = dataclasses.replace(f2, **{n: getattr(fc1, n) for n in FC1_FIELDS if n != "fc1_block_i"})
    return dataclasses.replace(new, fc2_block_m=f2.block_m if f2.block_m != new.block_m else 0,
                               fc2_programs_per_sm=f2.programs_per_sm if f2.programs_per_sm != new.programs_per_sm else 0)


def routed_space(problem: RoutedProblem, backends=("triton",), num_sms: int = 132) -> list[RoutedConfig]:
    """Routed tactics for ``problem`` (Triton only; [] when "triton" is not in ``backends``), in
    a fixed order, each passing ``kernels.triton.routed.can_implement``, the default rule's
    config (``routed_configs.default_config``) first. ``num_sms`` sizes the column stream's
    groups (below); the programs themselves come from ``programs_per_sm`` at launch.

    Pruned by r = M * top_k / E, the rows an expert gets on average:

    * token tile ``block_m``: the two largest of 16/32/64/128 not above max(16, next power of
      two of r); swap-AB (the expert's rows as the MMA's N) at 16 and 32, both ways at 64 while
      r <= 64, not swapped at 128 (but for three configs at the end: swapped 128-row tiles with
      FC1 tiles of 64 (one and two programs an SM) and 128 columns of I, the form the dense
      FC1's table picks at 128-256 tokens, and the 64-column ones on the sorted copy of x);
    * per (block_m, swap), every FC1 tile of I (64/128/256, not above I's next power of two) with
      every FC2 tile of H (64/128/256, likewise): the two kernels run one after the other, so
      their tiles are independent choices; a tile whose fp32 accumulators would need more than
      128 registers a thread at 8 warps is left out (FC1: block_m * fc1_block_i > 16384, FC2:
      block_m * fc2_block_n > 32768);
    * k-tiles: 128 for fp8 (FC2's also divides fc1_block_i: one y scale per fc1_block_i
      columns), 64 for bf16; at most the next power of two of H (FC1); FC2's divides I (halved
      until it does: one k-step, one expert, as its TMA descriptor needs);
    * warps: 4 while the fp32 accumulators take at most 128 registers a thread (FC1: gate and
      up, block_m * fc1_block_i <= 8192; FC2: block_m * fc2_block_n <= 16384), else 8; the ring
      is the deepest that fits shared memory, at most 5 stages for tiles of <= 32 rows
      (bandwidth-bound: more loads in flight) and 4 above; one program per SM;
    * at the middle tiles (fc1_block_i and fc2_block_n 128 where the shape allows) seven more:
      two programs per SM (each ring as deep as fits half the shared memory), 8 warps in both
      kernels (where the rule gave 4), a 3-stage ring, k-tiles of 256 bytes (fp8: 256, FC2's at
      most fc1_block_i; bf16: 128), which FC1's dense tuning picked for bandwidth-bound calls on
      the H100, both k-loops flattened into the persistent loops (``flatten``), the weights
      through pointer loads instead of TMA descriptors (``tma=False``), and FC2's atomic combine
      (``atomic_combine``: no [M*k, H] rows; not bit-deterministic; ``ROUTED_ATOMIC``), and the
      combine fused into FC2 (``fused_combine``: the same bits as the combine, no launch of its
      own), at the middle tiles and at the widest FC2 tile with two programs per SM.
    * where an expert gets 8 rows or more on average: the fused and the atomic combine at the
      middle tiles with FC2's units column tile by column tile (``fc2_col_major``).
    * FC2's column stream (``fc2_col_groups``, the same bits): the middle and the widest FC2 tile
      with one program per SM and groups for about eight units a program, the widest with groups
      for about two, the middle with two programs per SM (``_column_groups``; tiles halved down
      to 64 columns where a whole-I stage does not fit twice).

    * FC1's tails (``fc1_tail_m`` 16 and 32: an expert's rest of that many rows rides on its last
      whole tile) at the middle tiles for the unswapped tiles of 64 and 128 rows, FC1 at 8 warps
      (at 4 the tail's accumulators spill). On an H100 (eighth session) they took FC1 on uniform
      routing 2-11% below the plain tiles at M = 2048-4096 (docs/routed.md).
    * FC1 on the sorted copy of x (``fc1_sorted_x``: x through TMA, as the dense FC1 loads it) at
      the middle tiles of 64 and more rows, one and two programs an SM.
    * FC2 with its y rows through TMA (``fc2_y_tma``) at the middle tiles, and at the widest FC2
      tile with two programs an SM.
    * FC2 extras at the middle FC1 tile: flattened and two programs per SM together, the widest
      FC2 tile of H flattened, with two, three or four programs per SM (rings as deep as fit their
      share of shared memory), and flattened with two; with fp8 y in groups of 256 (fc1_block_i
      256) FC2's k-step 256, flattened. (The H200's fp8 tuning of 2026-12-05 picked the widest
      tile with two programs per SM at M = 4-2048; three and four were not in its space.)

    * FC1 on the CuTe kernel (``fc1_cute``) from 16 rows an expert, in units of the unswapped
      bases' block_m rows (64 where every base is swapped): its tiles of I 128 and 64 and k-tiles
      of 128 and 256 bytes, with the bases' FC2 at one and two programs an SM (not with
      block-scaled weights); each on a sorted copy of x, and those of tile 128 also gathering
      x's rows by TMA (``fc1_cute_gather``, no copy).
    * FC2 on the CuTe kernel (``fc2_cute``) from 32 rows an expert (not with block-scaled
      weights): units of 64 and of 128 rows, and for fp8 128 and 256 columns a unit, beside the
      gathering CuTe FC1s of 256-byte k-tiles and one Triton FC1 of the bases (at most six, fp8
      twelve).
    * FC1 and FC2 on tiles of their own from 32 rows an expert where 64-row unswapped tiles are:
      the 128-row FC1 (Triton at 8 warps, one program an SM; CuTe with 256-byte k-tiles, on the
      copy and gathering) before
      ``MAX_FC2_PARTS`` distinct FC2s of the 64-row base (``with_fc1_of``, ``fc2_block_m`` /
      ``fc2_programs_per_sm``), the column stream's first, then those of two or more programs
      an SM.

    Block-scaled weights (``problem.block``): FC1's tile and both k-steps are the block and FC2's
    tile whole blocks (128 or 256: ``can_implement``), so FC2's width, the token tile, warps,
    rings, programs per SM and the flags vary.

    At most 37 configs per (block_m, swap) and three of those, five swapped 128-row ones, so at
    most 117 with the default; with the CuTe FC1s (8 per unswapped base, two bases), the CuTe FC2s
    (at most twelve) and the split ones (two FC1s before ``MAX_FC2_PARTS`` FC2s) at most 171.
    """
    if "triton" not in backends:
        return []
    p = problem
    fp8 = p.dtype == torch.float8_e4m3fn
    esize = p.dtype.itemsize
    rows = routed_rows(p)
    bis = [b for b in (64, 128, 256) if b <= max(64, _pow2_at_least(p.i))]
    bns = [b for b in (64, 128, 256) if b <= max(64, _pow2_at_least(p.h))]
    if getattr(p, "block", 0):  # block-scaled weights: FC1's tile and the k-steps one scale block, FC2's whole blocks
        bis = [p.block]
        bns = [b for b in bns if b % p.block == 0] or [p.block]
    k1_max = max(64, _pow2_at_least(p.h))
    k2_max = max(64, _pow2_at_least(p.i))
    out: list[RoutedConfig] = []

    def make(bm, swap, bi, bn, k1=None, k2=None, pps=1, warps=None, stages=None, **flags):
        k1 = min(k1 or (128 if fp8 else 64), k1_max)
        k2 = min(k2 or (128 if fp8 else 64), k2_max, bi if fp8 else k2_max)
        while k2 > 16 and p.i % k2:  # a k-step never straddles two experts' I (TMA needs it)
            k2 //= 2
        w1 = 4 if bm * bi <= 8192 else 8
        w2 = 4 if bm * bn <= 16384 else 8
        if warps is not None:
            w1, w2 = warps
        cap = 5 if bm <= 32 else 4
        s1 = _deepest((bm + flags.get("fc1_tail_m", 0) + 2 * bi) * k1 * esize, pps, cap)
        # a stage of FC2's column stream holds all of a column tile's k-steps (w2's only where the
        # unit's y tiles load once before the column loop, stream_hoists_y: those tiles, and the
        # 10-11 KB more that Triton 3.9 allocates beside them on sm_90a, once a program)
        steps = p.i // k2 if flags.get("fc2_col_groups") else 1
        if flags.get("fc2_col_groups") and stream_hoists_y(p.i, k2):
            s2 = _deepest(bn * k2 * esize * steps, pps, cap, fixed=bm * k2 * esize * steps + 12 * 1024)
        else:
            s2 = _deepest((bm + bn) * k2 * esize * steps, pps, cap)
        if stages is not None:
            s1, s2 = min(s1, stages), min(s2, stages)
        if s1 < 2 or s2 < 2:
            return None
        return RoutedConfig(block_m=bm, fc1_block_i=bi, fc1_block_k=k1, fc1_swap_ab=swap, fc1_warps=w1,
                            fc1_stages=s1, fc2_block_n=bn, fc2_block_k=k2, fc2_swap_ab=swap, fc2_warps=w2,
                            fc2_stages=s2, programs_per_sm=pps, **flags)

    def add(cfg):
        if cfg is not None and cfg not in out and routed_configs.can_implement(p, cfg)[0]:
            out.append(cfg)

    bases = []
    for bm in _token_tiles(max(1, math.ceil(rows)), (16, 32, 64, 128), keep=2):
        for swap in ((True,) if bm <= 32 else (True, False) if bm == 64 and rows <= 64 else (False,)):
            bases.append((bm, swap))
    for bm, swap in bases:
        tiles = [(bi, bn) for bi, bn in itertools.product(bis, bns) if bm * bi <= 16384 and bm * bn <= 32768]
        for bi, bn in tiles:
            add(make(bm, swap, bi, bn))
        if not tiles:
            continue
        bi = 128 if any(t[0] == 128 for t in tiles) else tiles[0][0]  # the middle tiles
        bn = 128 if (bi, 128) in tiles else max(t[1] for t in tiles if t[0] == bi)
        mid = make(bm, swap, bi, bn)
        add(make(bm, swap, bi, bn, pps=2))
        if mid is not None:
            add(make(bm, swap, bi, bn, warps=(8, 8)))
            if max(mid.fc1_stages, mid.fc2_stages) > 3:
                add(make(bm, swap, bi, bn, stages=3))
        if bm >= 64 and not swap and mid is not None:  # FC1's tails, 8 warps (4 spill with them)
            for tail in (16, 32):
                add(make(bm, swap, bi, bn, warps=(8, mid.fc2_warps), fc1_tail_m=tail))
        if bm >= 64:  # FC1 on the sorted copy of x, through TMA as the dense FC1 loads x
            add(make(bm, swap, bi, bn, fc1_sorted_x=True))
            add(make(bm, swap, bi, bn, pps=2, fc1_sorted_x=True))
        add(make(bm, swap, bi, bn, k1=256, k2=256) if fp8 else make(bm, swap, bi, bn, k1=128, k2=128))
        add(make(bm, swap, bi, bn, flatten=True))
        add(make(bm, swap, bi, bn, tma=False))
        # FC2 was the slowest launch on the H200 (bench/results/routed_stages_h200_2026-12-05.log:
        # 0.96-1.4 TB/s at TP8 M = 64-512, short k-loops of 128 x 128 tiles): more of its weight
        # bytes in flight per SM, the changes that do it together
        wide = max(t[1] for t in tiles if t[0] == bi)
        for n, kw in ((bn, dict(flatten=True, pps=2)), (wide, dict(flatten=True)), (wide, dict(pps=2)),
                      (wide, dict(flatten=True, pps=2)), (wide, dict(pps=3)), (wide, dict(pps=4))):
            add(make(bm, swap, bi, n, **kw))
        if fp8 and any(t[0] == 256 for t in tiles):  # y groups of 256: FC2's k-step 256 (TP8: all of I)
            add(make(bm, swap, 256, max(t[1] for t in tiles if t[0] == 256), k2=256, flatten=True))
        if ROUTED_ATOMIC:
            add(make(bm, swap, bi, bn, atomic_combine=True))
        # FC2's y rows through TMA (a tile's rows are contiguous): the middle tiles, the wide with two programs an SM
        add(make(bm, swap, bi, bn, fc2_y_tma=True))
        add(make(bm, swap, bi, wide, pps=2, fc2_y_tma=True))
        # the combine fused into FC2 (no combine launch; the same bits): the middle and the wide tiles
        add(make(bm, swap, bi, bn, fused_combine=True))
        add(make(bm, swap, bi, wide, pps=2, fused_combine=True))
        # FC2's units column tile by column tile, where the rows (or the atomic adds) are many: a
        # token's k pairs meet while L2 still holds their rows / fp32 sums
        if rows >= 8:
            add(make(bm, swap, bi, bn, fused_combine=True, fc2_col_major=True))
            if ROUTED_ATOMIC:
                add(make(bm, swap, bi, bn, atomic_combine=True, fc2_col_major=True))
        # FC2's column stream: its pipelined loop runs over column tiles, not over the few k-steps
        # of a short I, so the next tiles' weights load under this one's MMA and stores
        # (a tile narrower, down to 64, where a whole-I stage of it does not fit twice: Qwen3's I = 768)
        for n, pps, per_program in ((bn, 1, 8), (wide, 1, 8), (wide, 1, 2), (bn, 2, 8)):
            cfg = None
            while cfg is None and n >= 64:
                groups = _column_groups(p, bm, n, num_sms * pps, per_program)
                cfg = make(bm, swap, bi, n, pps=pps, fc2_col_groups=groups)
                n //= 2
            add(cfg)
    if any(bm == 128 for bm, _ in bases):
        # 128 tokens as the MMA's N, the weight rows as its M: the dense FC1's tuned form at 128 and
        # more tokens a weight tile on the H100 (``bench/probes/routed_fc1_vs_dense.py``)
        bn = 128 if 128 in bns else bns[-1]
        for bi, kw in ((64, {}), (64, dict(pps=2)), (128, {}), (64, dict(fc1_sorted_x=True)),
                       (64, dict(pps=2, fc1_sorted_x=True))):
            if bi in bis:
                add(make(128, True, bi, bn, **kw))
    if rows >= 16 and not getattr(p, "block", 0):
        # FC1 on the CuTe kernel (``fc1_cute``: units of the base's block_m rows, 64 or 128, two
        # consumer warpgroups not in step, fp8 promoted per k-tile): tiles of I 128 and 64, k-tiles
        # of 128 and 256 bytes, beside the FC2 of the unswapped bases' middle tiles, one and two
        # programs an SM; where every base is swapped (16-64 rows an expert), beside an unswapped
        # FC2 of 64 rows (its weights are read once an expert either way)
        for bm in [bm for bm, swap in bases if not swap] or [64]:
            bn = 128 if 128 in bns else bns[-1]
            for bi, k1 in itertools.product((128, 64), (1, 2)):
                for pps in (1, 2):
                    base = make(bm, False, bi, bn, pps=pps, k2=min(128 if fp8 else 64, bi))
                    if base is not None:
                        # x from a sorted copy, or gathered by TMA a row: with tiles of I 128 only (at 64 a
                        # unit's MMA halves for the same row loads; docs/routed-journal.md, "Thirteenth session")
                        for gather in (False, True) if bi == 128 else (False,):
                            add(dataclasses.replace(base, fc1_cute=True, fc1_block_k=k1 * (128 if fp8 else 64),
                                                    fc1_warps=4, fc1_stages=3, fc1_swap_ab=False,
                                                    fc1_cute_gather=gather))
    if rows >= 32 and not getattr(p, "block", 0):
        # FC2 on the CuTe kernel (``fc2_cute``; units of 64 rows a warpgroup or 128 for both, the
        # indices loaded a unit ahead): on an H100 (fifteenth session, routed_fc2_cute.log) 13-15%
        # faster than the table's Triton FC2 at Qwen3-30B-A3B M = 2048-4096, 13-20% slower at
        # DeepSeek-V3 TP8; beside the CuTe FC1s the tables pick at large M (x gathered, 256-byte
        # k-tiles) and one of the bases' Triton FC1s; fp8 also 256 columns a unit (two column tiles
        # of 128: y's k-tile, its scales and the unit's indices loaded once for both)
        fc1s = [c for c in out if c.fc1_cute and c.fc1_cute_gather and c.fc1_block_i == 128
                and c.fc1_block_k * esize == 256 and c.programs_per_sm == 1] + \
            [c for c in out if not c.fc1_cute and not c.fc1_swap_ab and c.block_m in (64, 128) and c.fc1_block_i == 128
             and not c.fc2_col_groups and not c.flatten and not c.fc2_block_m and c.programs_per_sm == 1][:1]
        for f1, rows_fc2, width in itertools.product(fc1s, (64, 128), (128, 256) if fp8 else (128,)):
            add(dataclasses.replace(f1, fc2_cute=True, fc2_block_n=width, fc2_block_k=128 if fp8 else 64,
                                    fc2_swap_ab=False, fc2_warps=4, fc2_stages=3, fc2_col_groups=0,
                                    fc2_col_major=False, fc2_y_tma=False, flatten=False, atomic_combine=False,
                                    fused_combine=False, fc2_programs_per_sm=0,
                                    fc2_block_m=0 if rows_fc2 == f1.block_m else rows_fc2))
    if rows >= 32 and (64, False) in bases:
        # FC1 and FC2 on tiles of their own (``fc2_block_m``): 128-row FC1s (Triton at 8 warps,
        # one program an SM; CuTe) beside the 64-row FC2s above. On the H200 (twelfth session,
        # routed_fc1_cute.log) the 128-row Triton FC1 took 304.5 us at TP8 M = 2048 where the
        # table's 64-row one took 372.7, and the table's FC2 is a 64-row one
        tri = make(128, False, 128, 128, warps=(8, 4))
        fc1_parts = [] if tri is None else [tri]
        if tri is not None and not getattr(p, "block", 0):
            for gather in (False, True):
                fc1_parts.append(dataclasses.replace(tri, fc1_cute=True, fc1_block_k=2 * (128 if fp8 else 64),
                                                     fc1_warps=4, fc1_stages=3, fc1_cute_gather=gather))
        seen = set()
        # the FC2s the H200 tables pick at these M first: the column stream, then two or more programs an SM
        for c in sorted(out, key=lambda c: (not c.fc2_col_groups, c.fc2_part().programs_per_sm < 2)):
            key = _fc2_key(c)
            if (c.block_m, c.fc1_swap_ab, c.fc1_block_i, c.fc1_cute, c.fc2_block_m, c.flatten) != (64, False, 128, False, 0, False) \
                    or c.fc2_swap_ab or key in seen or len(seen) >= MAX_FC2_PARTS:
                continue
            seen.add(key)
            for f1 in fc1_parts:
                add(with_fc1_of(c, f1))
    default = routed_configs.default_config(p)
    return [default] + [c for c in out if c != default]


def describe(cfg) -> str:
    """Short human form of a config for tables: only the fields that differ from the defaults."""
    fields = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
              if f.default is dataclasses.MISSING or getattr(cfg, f.name) != f.default]
    return f"{cfg.backend}:" + ",".join(fields)
