"""The routed path's configs: the default rule and ``choose``.

``choose(problem, device, config=None)`` is the one answer to "which tiles run this routed call":
the op, the tuner and the benchmarks all ask it. In order: a pinned config ("pinned"); the tuned
entry for the problem's key ("cache" / "shipped", ``densemoe.tuning.cache``) unless
``tuned=False``; ``default_config`` ("heuristic"). Every answer passes
``kernels.triton.routed.can_implement``.

The default rule reads the rows an expert gets on average, r = M * top_k / E (uniform routing):

    r <= 16    block_m 16, both GEMMs swap-AB (the weight tile is the MMA's M, an expert's few
               rows its N: no 64-row MMA wasted on 4 tokens)
    r <= 32    block_m 32, swap-AB
    r <= 96    block_m 64
    above      block_m 128, 8 warps (compute-bound: the largest tile that fits)

The numbers are first choices, not measurements: no routed kernel had run on a GPU when they
were written (``docs/routed.md``). The H200 tuning run replaces them with tuned tables.
"""

from __future__ import annotations

import dataclasses

import torch

from densemoe.kernels.common import RoutedProblem
from densemoe.kernels.triton.routed import RoutedConfig, can_implement
from densemoe.ops import choice
from densemoe.ops.choice import Choice

OP = "densemoe.routed_experts"
FP8 = torch.float8_e4m3fn

# (max rows per expert, block_m, swap_ab, warps); the last row takes everything above
ROWS_TABLE = (
    (16, 16, True, 4),
    (32, 32, True, 4),
    (96, 64, False, 4),
    (None, 128, False, 8),
)


def default_config(problem: RoutedProblem) -> RoutedConfig:
    """Deterministic config, no timing (the module docstring's rule)."""
    p = problem
    rows = p.m * p.top_k / max(p.e, 1)
    for max_rows, bm, swap, warps in ROWS_TABLE:
        if max_rows is None or rows <= max_rows:
            break
    fp8 = p.dtype == FP8
    bk = 128 if fp8 else 64  # 128 bytes of a row per k-step
    bk2 = bk
    while p.i % bk2 and bk2 > 16:  # FC2's k-steps tile each expert's I exactly (TMA)
        bk2 //= 2
    if p.block:  # one weight scale per tile and k-step
        bk = bk2 = p.block
    cfg = RoutedConfig(block_m=bm, fc1_block_i=128, fc1_block_k=bk, fc1_swap_ab=swap, fc1_warps=warps,
                       fc1_stages=4 if bm <= 32 else 3, fc2_block_n=128, fc2_block_k=bk2, fc2_swap_ab=swap,
                       fc2_warps=warps, fc2_stages=4 if bm <= 32 else 3)
    ok, why = can_implement(p, cfg)
    assert ok, f"default_config produced an invalid config for {p}: {why}"
    return cfg


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
        return Choice("triton", config, "pinned")
    if tuned:
        hit = choice.tuned("routed", problem, device, "triton", lambda: (False, "no CuTe routed kernel"),
                           parse_config, {"triton": can_implement})
        if hit is not None:
            if deterministic and hit.config.atomic_combine:
                return hit._replace(config=dataclasses.replace(hit.config, atomic_combine=False))
            return hit
    return Choice("triton", default_config(problem), "heuristic")
