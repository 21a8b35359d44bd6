"""FC2's configs: the default rules of both backends, where "auto" takes CuTe, and ``choose``.

``choose(problem, device, ...)`` is the one answer to "which backend and config runs this FC2
call": the op, the tuner and the benchmarks all ask it. In order:

1. a pinned config (source "pinned");
2. the tuned entry for the problem's key (source "cache": the user's tuned cache, "shipped":
   the package's tables; ``densemoe.tuning.cache``), unless ``tuned=False``;
3. the deterministic rules here (source "heuristic"): ``default_cute_config`` where the CuTe
   backend can run and ``cute_preferred`` says it measured faster (or it is forced), else
   ``default_config`` (Triton).

With expert skipping (``skip=True``) the Triton kernel runs: the pinned config or
``default_skip_config``. Every rule returns a config its backend's ``can_implement`` accepts.
The tables' numbers come from the tuner's picks and benchmark sweeps on an H100
(``docs/tuning.md``, ``docs/fc2-triton.md``, ``docs/fc2-cute.md``, ``docs/skipping.md``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from densemoe._runtime import sm_count
from densemoe.kernels.common import SMEM_BYTES, Fc2Problem
from densemoe.kernels.cute import fc2_sm90 as cute_fc2
from densemoe.kernels.cute import hopper
from densemoe.kernels.cute.fc2_sm90 import Fc2CuteConfig
from densemoe.kernels.triton.fc2 import Fc2TritonConfig, can_implement
from densemoe.ops import choice
from densemoe.ops.choice import Choice

OP = "densemoe.fc2"
BACKENDS = ("auto", "triton", "cute")
FP8 = torch.float8_e4m3fn

# Triton tiles by M: (max M, block_m, block_n, num_warps, swap_ab, ctas_per_sm, split or None =
# by waves). Swap-AB keeps the token tile as the MMA's N while M is small; from 65 tokens a
# 64x128 tile with tokens as the MMA's M; at 129-192 two programs per SM with stream-K; past 192
# tokens the kernel is compute-bound and a 128x128 tile wins.
TILE_TABLE = (
    (16, 16, 64, 4, True, 1, None),
    (32, 32, 64, 4, True, 1, None),
    (64, 64, 64, 4, True, 1, None),
    (128, 64, 128, 4, False, 1, None),
    (192, 64, 128, 4, False, 2, 0),  # stream-K, two programs per SM
    (None, 128, 128, 8, False, 1, None),
)

# CuTe tiles by M: (max M, k-tile bytes per row, Fc2CuteConfig fields). Up to M = 128 tokens are
# wgmma's N (swap-AB); above, tokens are wgmma's M in a 128 x 192 tile with the experts visited
# in lock step across clusters; cluster_m = 2 (weights multicast to two token tiles) when the
# number of 128-token tiles is even, else 1 (cluster_m=0 below: chosen by the tile count).
CUTE_TABLE = (
    (16, 256, dict(tile_n=128, tile_m=16, consumers=1, acc_buffers=2, cluster_n=2, cluster_m=1)),
    (32, 256, dict(tile_n=64, tile_m=32, consumers=1, acc_buffers=1, cluster_n=2, cluster_m=1)),
    (64, 256, dict(tile_n=64, tile_m=64, consumers=1, acc_buffers=1, cluster_n=2, cluster_m=1)),
    (96, 256, dict(tile_n=64, tile_m=96, consumers=1, acc_buffers=1, cluster_n=1, cluster_m=1)),
    (128, 256, dict(tile_n=64, tile_m=128, consumers=1, acc_buffers=1, cluster_n=1, cluster_m=1)),
    (None, 128, dict(tile_n=192, tile_m=128, consumers=2, acc_buffers=1, cluster_n=1, cluster_m=0,
                     swap_ab=0, lockstep=1)),
)

# Where "auto" takes CuTe with no tuned entry: (N, E, I, dtype) -> M buckets (lo, hi] (hi None:
# no upper bound). At every point of CUTE_WINS_SOURCE (each backend's default timed in one run)
# where one default is at least 3% faster, the table picks it; inside that band either may stand.
# tests/test_fc2_cute.py checks the table against the file point by point. Above the measured
# M = 512, CuTe stays chosen where it won up to 512 (both backends compute-bound, CuTe's lead
# growing with M). Unmeasured shapes stay on Triton.
CUTE_WINS_SOURCE = "bench/results/fc2_h100_2026-11-26_tuned.json.gz"
CUTE_WINS = {
    (7168, 256, 256, FP8): ((192, None),),
    (7168, 256, 256, torch.bfloat16): ((128, None),),
    (7168, 256, 512, FP8): ((128, None),),
    (7168, 256, 512, torch.bfloat16): ((128, None),),
    (2048, 128, 768, FP8): ((256, None),),
    (2048, 128, 768, torch.bfloat16): ((256, None),),
}


def default_config(problem: Fc2Problem, num_sms: int = 132) -> Fc2TritonConfig:
    """Deterministic Triton config, no timing: the same problem always gets the same config.

    Tile shape from ``TILE_TABLE`` by M; the largest k-tile that divides I (256 B per row);
    the deepest load ring (at most 6) that fits shared memory; and the split of each column
    tile's experts: below one wave of ``num_sms * ctas_per_sm`` tiles, as many expert ranges as
    keep the launch within the wave; above it, stream-K (split=0) when the last wave would be
    less than half full, else one program per tile.
    """
    p = problem
    for max_m, bm, bn, warps, swap, cps, forced_split in TILE_TABLE:
        if max_m is None or p.m <= max_m:
            break
    block_k = (256 if p.dtype == FP8 else 128) // cps
    while p.i % block_k:
        block_k //= 2
    slots = num_sms * cps
    tiles = max(1, -(-p.m // bm) * -(-p.n // bn))
    if forced_split is not None:
        split = forced_split
    elif tiles < slots:
        split = max(1, min(slots // tiles, p.e))
    else:
        rem = tiles % slots
        split = 0 if 0 < rem <= slots // 2 else 1
    stage = (bm + bn) * block_k * p.dtype.itemsize
    stages = max(2, min(6, (SMEM_BYTES // cps - 1024) // stage))
    config = Fc2TritonConfig(bm, bn, block_k, warps, stages, swap, True, split, cps)
    ok, why = can_implement(p, config)
    assert ok, f"default_config produced an invalid config for {p}: {why}"
    return config


def default_skip_config(problem: Fc2Problem, num_sms: int = 132) -> Fc2TritonConfig:
    """The Triton config with expert skipping: the dense rule's tile; each column tile's picked
    experts in one program up to M = 2 (no workspace, no atomics), in two halves above; up to
    M = 2 also a deeper ring (8 stages) where it fits."""
    cfg = dataclasses.replace(default_config(problem, num_sms), split=1 if problem.m <= 2 else 2)
    if problem.m <= 2:
        deeper = dataclasses.replace(cfg, num_stages=max(cfg.num_stages, 8))
        if can_implement(problem, deeper)[0]:
            cfg = deeper
    return cfg


def default_cute_config(problem: Fc2Problem) -> Fc2CuteConfig:
    """Deterministic CuTe config: tile by M from ``CUTE_TABLE``, deepest ring, one wave; fp8
    promotes each k-tile (``promote=1``, one temporary: the Triton FC2's precision).
    Raises ValueError when no CuTe config fits (an expert's k-slice below 128 bytes)."""
    p = problem
    if (p.i * p.dtype.itemsize) % 128:
        raise ValueError(f"the CuTe kernel needs I * element size to be a multiple of 128 bytes "
                         f"(k-tiles of 128B swizzle atoms); I={p.i} {p.dtype} gives {p.i * p.dtype.itemsize}")
    for max_m, k_bytes, fields in CUTE_TABLE:
        if max_m is None or p.m <= max_m:
            break
    tk = k_bytes // p.dtype.itemsize
    while p.i % tk and tk * p.dtype.itemsize > 128:
        tk //= 2
    if fields["cluster_m"] == 0:
        fields = dict(fields, cluster_m=2 if -(-p.m // fields["tile_m"]) % 2 == 0 else 1)
    cfg = Fc2CuteConfig(tile_k=tk, **fields)
    if p.dtype == torch.float8_e4m3fn:
        cfg = dataclasses.replace(cfg, promote=1, acc_buffers=1)
    if not cute_fc2.can_implement(p, cfg)[0]:  # e.g. too few stages for two temporaries
        cfg = dataclasses.replace(cfg, acc_buffers=1)
    ok, why = cute_fc2.can_implement(p, cfg)
    assert ok, f"default_cute_config produced an invalid config for {p}: {why}"
    return cfg


def cute_preferred(problem: Fc2Problem) -> bool:
    """The measured rule: does "auto" prefer the CuTe backend for this problem (``CUTE_WINS``)?"""
    p = problem
    return any(lo < p.m and (hi is None or p.m <= hi) for lo, hi in CUTE_WINS.get((p.n, p.e, p.i, p.dtype), ()))


def parse_config(text: str) -> Fc2TritonConfig | Fc2CuteConfig:
    """A config from its ``to_str`` form (either backend)."""
    return Fc2CuteConfig.from_str(text) if text.startswith("cute:") else Fc2TritonConfig.from_str(text)


def choose(problem: Fc2Problem, device, *, backend: str = "auto", config=None, skip: bool = False,
           cute_check: Callable[[], tuple[bool, str]] | None = None, tuned: bool = True) -> Choice:
    """The backend and config that run ``problem`` on ``device`` (module docstring).

    backend: "auto", "triton" or "cute" (forced; raises ValueError naming why when the CuTe
    kernel cannot run). config: a pinned config object, or None. skip: expert skipping (Triton).
    cute_check: () -> (ok, why), whether the CuTe kernel can run the call's tensors (the op passes
    ``runtime_ok`` over them); default ``hopper.device_ok``. tuned: False skips the tuned tables
    (the heuristic's own choice, as the tuner and the benchmarks compare against)."""
    device = torch.device(device)
    if skip:
        if config is not None:
            return Choice("triton", config, "pinned")
        return Choice("triton", default_skip_config(problem, sm_count(device)), "heuristic")
    check = cute_check or (lambda: hopper.device_ok(device))
    if config is not None:
        return choice.pinned(OP, config, check)
    hit = _tuned(problem, device, backend, check) if tuned else None
    return hit or _heuristic(problem, device, backend, check)


def _heuristic(problem: Fc2Problem, device: torch.device, backend: str, check) -> Choice:
    """The deterministic rules alone: no tuned table, no timing."""
    if backend in ("auto", "cute"):
        ok, why = check()
        if ok:
            try:
                cfg = default_cute_config(problem)
            except ValueError as exc:
                ok, why = False, str(exc)
        if ok and (backend == "cute" or cute_preferred(problem)):
            return Choice("cute", cfg, "heuristic")
        if backend == "cute":
            raise ValueError(f"{OP}: backend='cute' cannot run this call: {why}")
    return Choice("triton", default_config(problem, sm_count(device)), "heuristic")


# each backend's validity function, by the backend's name (a tuned entry's configs are checked with it)
FITS = {"triton": can_implement, "cute": cute_fc2.can_implement}


def _tuned(problem, device: torch.device, backend: str, check) -> Choice | None:
    return choice.tuned("fc2", problem, device, backend, check, parse_config, FITS)
