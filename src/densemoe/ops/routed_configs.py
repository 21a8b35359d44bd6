"""The routed path's configs: the default rule and ``choose``.

``choose(problem, device, config=None)`` is the one answer to "which tiles run this routed call":
the op, the tuner and the benchmarks all ask it. In order: a pinned config ("pinned"); the tuned
entry for the problem's key ("cache" / "shipped", ``densemoe.tuning.cache``) unless
``tuned=False``; ``default_config`` ("heuristic"). Every answer passes ``can_implement`` (the
Triton kernels' rules and, for ``fc1_cute`` / ``fc2_cute``, the CuTe kernels'). A tuned config
with either on a device where CuTe does not run (not sm_90, or CuTe DSL not installed) runs the
same tiles with the Triton kernels; a pinned one raises.

The default rule reads the rows an expert gets on average, r = M * top_k / E (uniform routing).
It is the pattern of the H200 tuning run of 2026-12-05 (fp8, DeepSeek-V3 TP8 and Qwen3-30B-A3B,
``bench/results/tune_h200_2026-12-05_routed_*_fp8.md``), for the calls no table covers:

    r <= 1/8   block_m 16, swap-AB; FC1 tiles of 64 columns of I (more tiles for the few
               experts' rows), FC2 tiles of 256 x 64, 5-stage rings, one program per SM
    r <= 16    block_m 16, swap-AB (the weight tile is the MMA's M, an expert's few rows its N);
               FC2 tiles 256 wide, two programs per SM, 3-stage rings
    r <= 64    block_m 32, swap-AB, the same FC2 tiles and two programs per SM
    above      block_m 64, not swapped, two programs per SM, rings of 2 (FC1) and 4 (FC2)

FC2's wide tiles and the second program per SM keep more of FC2's weight bytes in flight: it was
the slowest launch before (docs/routed.md). Block-scaled weights keep FC1's tile and both k-steps at
the block (128) and FC2's tile at whole blocks (128 or 256 wide).
"""

from __future__ import annotations

import dataclasses

import torch

from densemoe.kernels.common import RoutedProblem
from densemoe.kernels.cute import routed_fc1_sm90 as cute_fc1
from densemoe.kernels.cute import routed_fc2_sm90 as cute_fc2
from densemoe.kernels.triton import routed as kern
from densemoe.kernels.triton.routed import RoutedConfig
from densemoe.ops import choice
from densemoe.ops.choice import Choice

OP = "densemoe.routed_experts"
FP8 = torch.float8_e4m3fn

# (max rows per expert, block_m, swap_ab, fc1_block_i, fc2_block_n, programs_per_sm, fc1_stages,
# fc2_stages); the last row takes everything above
ROWS_TABLE = (
    (1 / 8, 16, True, 64, 256, 1, 5, 5),
    (16, 16, True, 128, 256, 2, 3, 3),
    (64, 32, True, 128, 256, 2, 3, 3),
    (None, 64, False, 128, 128, 2, 2, 4),
)


def cute_fc1_config(cfg: RoutedConfig) -> "cute_fc1.RoutedFc1CuteConfig":
    """The CuTe FC1 tactic of a config with ``fc1_cute``: its tile of I, k-tile and units of
    ``block_m`` rows, the deepest ring, one CTA per SM."""
    return cute_fc1.RoutedFc1CuteConfig(tile_i=cfg.fc1_block_i, tile_k=cfg.fc1_block_k, tile_m=cfg.block_m,
                                        gather=cfg.fc1_cute_gather)


def cute_fc2_config(cfg: RoutedConfig) -> "cute_fc2.RoutedFc2CuteConfig":
    """The CuTe FC2 tactic of a config with ``fc2_cute``: its tile of H (``fc2_block_n`` 256: two
    column tiles of 128 a unit, ``cols`` 2), k-tile and units of ``fc2_block_m`` (or ``block_m``)
    rows, the indices loaded ahead, the deepest ring, one CTA per SM."""
    tile_n = min(cfg.fc2_block_n, 128)
    return cute_fc2.RoutedFc2CuteConfig(tile_n=tile_n, tile_k=cfg.fc2_block_k, tile_m=cfg.fc2_block_m or cfg.block_m,
                                        cols=max(1, cfg.fc2_block_n // tile_n))


def can_implement(problem: RoutedProblem, cfg: RoutedConfig) -> tuple[bool, str]:
    """The one validity function of the routed configs (the default rule, the tuned-table lookup,
    the space and the tuner): ``kernels.triton.routed.can_implement``, and with ``fc1_cute`` the
    CuTe FC1's own rules (``routed_fc1_sm90.can_implement``). Shape rules only: whether this
    device runs CuTe is ``choose``'s question."""
    ok, why = kern.can_implement(problem, cfg)
    if ok and cfg.fc1_cute:
        y_dtype = FP8 if problem.dtype == FP8 else torch.bfloat16
        ok, why = cute_fc1.can_implement(problem.h, problem.e, problem.i, problem.dtype, y_dtype,
                                         cute_fc1_config(cfg), problem.m * problem.top_k)
        why = f"fc1_cute: {why}" if not ok else ""
    if ok and cfg.fc2_cute:
        ok, why = cute_fc2.can_implement(problem.h, problem.e, problem.i, problem.dtype, cfg.fc1_block_i,
                                         cute_fc2_config(cfg), problem.m * problem.top_k)
        why = f"fc2_cute: {why}" if not ok else ""
    return ok, why


def cute_fc1_runs_on(device) -> tuple[bool, str]:
    """Whether the CuTe routed kernels (FC1 and FC2) run on ``device`` (sm_90 and CuTe DSL installed)."""
    from densemoe.kernels.cute import hopper

    return hopper.device_ok(torch.device(device))


def default_config(problem: RoutedProblem) -> RoutedConfig:
    """Deterministic config, no timing (the module docstring's rule)."""
    p = problem
    rows = p.m * p.top_k / max(p.e, 1)
    for max_rows, bm, swap, bi, bn, pps, s1, s2 in ROWS_TABLE:
        if max_rows is None or rows <= max_rows:
            break
    bn = min(bn, max(128, 1 << (p.h - 1).bit_length()))  # no 256-wide FC2 tile on a small H
    fp8 = p.dtype == FP8
    bk = 128 if fp8 else 64  # 128 bytes of a row per k-step
    bk2 = min(bk, bi) if fp8 else bk  # fp8: one y scale per fc1_block_i columns per k-step
    while p.i % bk2 and bk2 > 16:  # FC2's k-steps tile each expert's I exactly (TMA)
        bk2 //= 2
    if p.block:  # one weight scale per FC1 tile and per k-step; FC2's tile whole row blocks
        bi = bk = bk2 = p.block
        bn = max(p.block, bn - bn % p.block)
    cfg = RoutedConfig(block_m=bm, fc1_block_i=bi, fc1_block_k=bk, fc1_swap_ab=swap, fc1_warps=4, fc1_stages=s1,
                       fc2_block_n=bn, fc2_block_k=bk2, fc2_swap_ab=swap, fc2_warps=4, fc2_stages=s2,
                       programs_per_sm=pps)
    ok, why = can_implement(p, cfg)
    assert ok, f"default_config produced an invalid config for {p}: {why}"
    return cfg


# the validity function by backend, as the dense ops' ``FITS`` (every routed config is "triton")
FITS = {"triton": can_implement}


def parse_config(text: str) -> RoutedConfig:
    return RoutedConfig.from_str(text)


def choose(problem: RoutedProblem, device, *, config: RoutedConfig | None = None, tuned: bool = True) -> Choice:
    """The config that runs ``problem`` on ``device`` (module docstring). A pinned config that
    cannot run the problem is a ValueError naming why. Under
    ``torch.use_deterministic_algorithms(True)`` a tuned config runs without ``atomic_combine``
    (its k additions per token come in no fixed order) and a pinned one with it is a RuntimeError."""
    device = torch.device(device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    if config is not None:
        if not isinstance(config, RoutedConfig):
            raise TypeError(f"{OP}: config must be a RoutedConfig, got {type(config).__name__}")
        ok, why = can_implement(problem, config)
        if not ok:
            raise ValueError(f"{OP}: config {config.short()} cannot run this call: {why}")
        if deterministic and config.atomic_combine:
            raise RuntimeError(f"{OP}: atomic_combine=True is not deterministic, and "
                               "torch.use_deterministic_algorithms(True) is on")
        if config.uses_cute:
            ok, why = cute_fc1_runs_on(device)
            if not ok:
                raise ValueError(f"{OP}: config {config.short()} runs a GEMM on CuTe, which cannot run here: {why}")
        return Choice("triton", config, "pinned")
    if tuned:
        # the entry's best; where it runs a GEMM on CuTe and CuTe cannot run here (tuned where
        # it can), the entry's fastest config without CuTe (the tuner's "no_cute" slot)
        hit = choice.tuned("routed", problem, device, "triton", lambda: cute_fc1_runs_on(device), parse_config,
                           FITS, slots=("best", "no_cute"))
        if hit is not None:
            if deterministic and hit.config.atomic_combine:
                hit = hit._replace(config=dataclasses.replace(hit.config, atomic_combine=False))
            return hit
    return Choice("triton", default_config(problem), "heuristic")
