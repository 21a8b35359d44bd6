"""FC1's configs: the default rules of both backends, where "auto" takes CuTe, and ``choose``.

``choose(problem, device, ...)`` is the one answer to "which backend and config runs this FC1
call": the op, the tuner and the benchmarks all ask it. In order:

1. a pinned config (source "pinned");
2. the tuned entry for the problem's key (source "cache" / "shipped"; ``densemoe.tuning.cache``),
   unless ``tuned=False``;
3. the deterministic rules here (source "heuristic"): ``default_cute_config`` where the CuTe
   backend is forced or ``cute_preferred`` says it measured faster, else ``default_config``.

With a routing mask (``routing=True``) the Triton kernel runs (the tuned Triton entry, else
``default_config``); with expert skipping (``skip=True``), the pinned config or
``default_skip_config``. An fp8 output with a dynamic per-(token, expert) scale takes
``default_config_dynamic``. Every rule returns a config its backend's ``can_implement`` accepts.
Where the numbers come from: ``docs/tuning.md`` (the tuner's picks) and ``docs/skipping.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from densemoe._runtime import sm_count
from densemoe.kernels.common import Fc1Problem
from densemoe.kernels.cute import fc1_sm90 as cute_fc1
from densemoe.kernels.cute import hopper
from densemoe.kernels.cute.fc1_sm90 import Fc1CuteConfig
from densemoe.kernels.triton.fc1 import Fc1TritonConfig, can_implement
from densemoe.ops import choice
from densemoe.ops.choice import Choice
from densemoe.ops.strategy import expected_active

OP = "densemoe.fc1"
BACKENDS = ("auto", "triton", "cute")

# Where "auto" takes CuTe with no tuned entry: (H, E, I, dtype) -> M buckets (lo, hi] (hi None: no
# upper bound), from a GPU run that times both backends' defaults. Empty: no default-vs-default
# win was measured (the CuTe kernel's one tuned win is carried by the shipped table).
CUTE_WINS: dict = {}


def default_config(problem: Fc1Problem) -> Fc1TritonConfig:
    """Deterministic Triton config, no timing: the tuner's picks as one rule. Swap-AB (weights as
    the MMA's M, 64-row weight tiles) with the smallest token tile that holds M up to M = 128,
    256-byte k-tiles, 4 stages; 128-token tiles take 128-element k-tiles and 3 stages; above,
    128 tokens x 128 columns per tile, 8 warps."""
    p = problem
    es = p.dtype.itemsize
    if p.m <= 128 and p.i >= 64:
        bm = 16 if p.m <= 16 else 32 if p.m <= 32 else 64 if p.m <= 64 else 128
        cfg = Fc1TritonConfig(bm, 64, 256 // es, 4, 4, 1, 1) if bm <= 64 else Fc1TritonConfig(128, 64, 128, 4, 3, 1, 1)
    else:
        bi = 128 if p.i >= 128 else max(16, 1 << (max(p.i, 1) - 1).bit_length())
        cfg = Fc1TritonConfig(128 if p.m > 64 else 64, bi, 128 // es, 8, 4, 0, 1)
    ok, why = can_implement(p, cfg)
    assert ok, f"default_config produced an invalid config for {p}: {why}"
    return cfg


def default_skip_config(problem: Fc1Problem, num_sms: int = 132) -> Fc1TritonConfig:
    """Deterministic config with expert skipping (persistent programs).

    * The tile of I: the largest of 64 / 32 / 16 rows that still gives a fifth of the SMs a unit
      when ``strategy.expected_active`` experts are picked. Below 64 rows (up to 64 tokens) the
      tokens are the MMA's M in 16-token tiles; otherwise the dense rule's tile, as one
      persistent program per SM.
    * ``split_k=4`` where even four times the expected units fit in one program per SM (M = 1 at
      top-8): each unit's k-range is cut in four, the parts meeting in the reused workspace.
    * ``stream_k=1`` where uniform routing would give more units than programs and the token
      tile is 16 rows (M = 8-16 at top-8 of 256): a short last wave is cut by k-steps over every
      program instead of a few programs taking a second whole unit. With larger token tiles the
      cut units' partial sums cost more than the balance gains, so off.
    """
    p = problem
    es = p.dtype.itemsize
    act = expected_active(p.m, p.e)
    bi = 16
    for cand in (64, 32):
        if act * -(-p.i // cand) >= 0.2 * num_sms:
            bi = cand
            break
    if p.m <= 64 and bi < 64:
        bk = 256 // es
        stage = (16 + 2 * bi) * bk * es
        cfg = Fc1TritonConfig(16, bi, bk, 4, max(2, min(6, 120 * 1024 // stage)), 0, 1, persistent=1)
    else:
        cfg = dataclasses.replace(default_config(p), persistent=1)
    units = -(-p.m // cfg.block_m) * act * -(-p.i // cfg.block_i)
    if 4 * units <= num_sms and -(-p.h // cfg.block_k) >= 4:
        cfg = dataclasses.replace(cfg, split_k=4)
    elif units > num_sms and cfg.block_m == 16:
        cfg = dataclasses.replace(cfg, stream_k=1)
    ok, why = can_implement(p, cfg)
    assert ok, f"default_skip_config produced an invalid config for {p}: {why}"
    return cfg


def default_config_dynamic(problem: Fc1Problem) -> Fc1TritonConfig:
    """The rule for an fp8 output with a dynamic per-(token, expert) scale, where one tile must
    hold all of an expert's I (I <= 256): swap-AB with 16/32/64-token tiles up to M = 64, tokens
    as the MMA's M (64 per tile) above; 128-byte k-tiles, 3 stages (not tuned). Raises
    ValueError when no tile holds I."""
    p = problem
    bi = max(64, 1 << (max(p.i, 1) - 1).bit_length())
    bk = 128 // p.dtype.itemsize
    if p.m <= 64:
        bm = 16 if p.m <= 16 else 32 if p.m <= 32 else 64
        cfg = Fc1TritonConfig(bm, bi, bk, 4 if bm * bi <= 16 * 256 else 8, 3, 1, 1)
    else:
        cfg = Fc1TritonConfig(64, bi, bk, 8, 3, 0, 1)
    ok, why = can_implement(p, cfg, dynamic_scale=True)
    if not ok:
        raise ValueError(f"no FC1 tile holds I={p.i} for a dynamic fp8 scale: {why}")
    return cfg


def default_cute_config(problem: Fc1Problem) -> Fc1CuteConfig:
    """Deterministic CuTe config, no timing (a starting point from FC2's CuTe table and the
    register budget; the tuner's CuTe picks are in ``docs/tuning.md``).

    Up to 128 tokens: swap-AB (weights are wgmma's M, tokens its N) with the token tile the
    smallest of 16/32/64/128 that covers M, 128 gate + 128 up rows per unit (two consumer
    warpgroups from 64 tokens up, one below); above 128 tokens: tokens as wgmma's M, 128 tokens
    x 128 gate + 128 up rows, two consumers. The tile of I shrinks to 64 (then 32 unswapped)
    where 128 does not divide I. k-tile 128 bytes per row (deepest ring). One CTA per SM.
    fp8: ``promote=1`` (each k-tile's products added into fp32, the Triton kernels' precision);
    its temporaries double the accumulator registers, so where the tile above does not fit
    them, the next that does (ending with tokens as wgmma's M, 128 tokens x 64 rows of I).
    Raises ValueError when no CuTe config fits (H not a multiple of 128 bytes, I not a
    multiple of 64 / 32, M too large for 32-bit indices).
    """
    p = problem
    tk = 128 // p.dtype.itemsize
    promote = int(p.dtype == torch.float8_e4m3fn)
    if p.m <= 128:
        tm = next(t for t in (16, 32, 64, 128) if p.m <= t)
        cons = 2 if tm >= 64 else 1
        cands = [Fc1CuteConfig(tile_i=ti, tile_m=tm, tile_k=tk, consumers=c, swap_ab=1, promote=promote)
                 for ti, c in ((128, cons), (64, 1))]
    else:
        cands = []
    cands += [Fc1CuteConfig(tile_i=ti, tile_m=128, tile_k=tk, consumers=2, swap_ab=0, promote=promote)
              for ti in (128, 64, 32)]
    why = ""
    for cfg in cands:
        ok, why = cute_fc1.can_implement(p, cfg)
        if ok:
            return cfg
    raise ValueError(f"no CuTe FC1 config fits H={p.h} E={p.e} I={p.i} {p.dtype} M={p.m}: {why}")


def cute_preferred(problem: Fc1Problem) -> bool:
    """The measured rule: does "auto" prefer the CuTe backend for this problem (no tuned entry)?"""
    p = problem
    return any(lo < p.m and (hi is None or p.m <= hi) for lo, hi in CUTE_WINS.get((p.h, p.e, p.i, p.dtype), ()))


def parse_config(text: str) -> Fc1TritonConfig | Fc1CuteConfig:
    """A config from its ``to_str`` form (either backend)."""
    return Fc1CuteConfig.from_str(text) if text.startswith("fc1-cute:") else Fc1TritonConfig.from_str(text)


def choose(problem: Fc1Problem, device, *, backend: str = "auto", config=None, skip: bool = False,
           routing: bool = False, cute_check: Callable[[], tuple[bool, str]] | None = None,
           tuned: bool = True) -> Choice:
    """The backend and config that run ``problem`` on ``device`` (module docstring).

    backend: "auto", "triton" or "cute" (forced; raises ValueError naming why when the CuTe
    kernel cannot run). config: a pinned config object, or None. skip: expert skipping;
    routing: a routing mask is applied (both Triton only). cute_check: () -> (ok, why), whether
    the CuTe kernel can run the call's tensors (the op passes ``runtime_ok`` over them); default
    ``hopper.device_ok``. tuned: False skips the tuned tables (the heuristic's own choice)."""
    device = torch.device(device)
    check = cute_check or (lambda: hopper.device_ok(device))
    if skip:
        if config is not None:
            return Choice("triton", config, "pinned")
        return Choice("triton", default_skip_config(problem, sm_count(device)), "heuristic")
    if routing:
        if config is not None:
            return Choice("triton", config, "pinned")
        hit = _tuned(problem, device, "triton", check) if tuned else None
        return hit or Choice("triton", default_config(problem), "heuristic")
    if config is not None:
        return choice.pinned(OP, config, check)
    hit = _tuned(problem, device, backend, check) if tuned else None
    return hit or _heuristic(problem, backend, check)


def _heuristic(problem: Fc1Problem, backend: str, check) -> Choice:
    """The deterministic rules alone: no tuned table, no timing."""
    if backend == "cute" or (backend == "auto" and cute_preferred(problem)):
        ok, why = check()
        if ok:
            try:
                return Choice("cute", default_cute_config(problem), "heuristic")
            except ValueError as exc:
                why = str(exc)
        if backend == "cute":
            raise ValueError(f"{OP}: backend='cute' cannot run this call: {why}")
    return Choice("triton", default_config(problem), "heuristic")


# each backend's validity function, by the backend's name (a tuned entry's configs are checked with it)
FITS = {"triton": can_implement, "cute": cute_fc1.can_implement}


def _tuned(problem, device: torch.device, backend: str, check) -> Choice | None:
    return choice.tuned("fc1", problem, device, backend, check, parse_config, FITS)
