"""How the MoE layer runs a batch: the one owner of that decision.

Strategies (one math, ``docs/architecture.md``):

    "skip"   the dense kernels, each token tile walking only the experts some token of it picked
             (lists built on the GPU, no host sync). Costs the picked experts' weights and every
             expert-slot of a tile's rows in FLOPs.
    "dense"  FC1 and FC2 over all E experts, a per-token, per-expert alpha zeroing what a token
             did not pick. Costs every expert's weights and E / top_k times the routed FLOPs.
    "routed" the top-k (token, expert) pairs grouped by expert, each expert's GEMMs on its own
             rows only, each token's k rows combined (``densemoe.ops.routed``). Costs the picked
             experts' weights and the routed FLOPs, plus the grouping and the combine.

The rule (``pick``), for a batch of m tokens over e experts at top-k:

1. a recorded choice: the strategy the tuner measured fastest for this shape, dtype, device and
   M bucket (key ``strategy|...`` in ``densemoe.tuning.cache``: the user's cache, then the
   shipped tables), when a device is given;
2. else "skip" while the share of experts m tokens are expected to pick under uniform top-k
   routing stays at or below ``SKIP_MAX_SHARE`` (measured on the H100, ``docs/skipping.md``);
3. else "routed" where the caller can run it (it needs the top-k ids), else "dense". Past the
   skipping range every expert is picked, so dense and routed read the same bytes and routed
   does top_k / E of the FLOPs; which is faster there before the tuner has measured it is
   open (``docs/routed.md``).

``resolve`` turns a caller's ``strategy=`` (and the older ``skip=``) into one of the three; the
layer (``experts_forward``), ``DenseMoE``, ``fused_experts`` and the transformers integration
ask it. FC1 and FC2, which only know skip and dense, ask ``resolve_skip``; FC1's tile rule reads
``expected_active``.

The fp8 pipeline's quantisation of FC1's output (``quantize_y_in_fc1``) is decided here too.
"""

from __future__ import annotations

import torch

from densemoe.tuning import cache

DEFAULT_TOP_K = 8  # the top-k assumed when the caller does not say (DeepSeek-V3, Qwen3-MoE)
SKIP_MAX_SHARE = 0.87  # skip while at most this share of the experts is expected to be picked
# FC1 quantises its own output (``fc1_fp8_dynamic``, one tile holds all of I) for I up to this;
# 0: never, the layer runs FC1 with a bf16 output and ``quantize_y_fold_alpha`` (docs/layer.md)
FUSED_QUANT_MAX_I = 0

STRATEGIES = ("skip", "dense", "routed")


def expected_share(m: int, e: int, top_k: int = DEFAULT_TOP_K) -> float:
    """Expected share of E experts picked by at least one of m tokens (uniform top-k)."""
    return 1.0 - (1.0 - min(1.0, top_k / max(e, 1))) ** max(m, 0)


def expected_picked(m: int, e: int, top_k: int = DEFAULT_TOP_K) -> float:
    """Distinct experts m tokens pick between them under uniform top-k, expected: E x
    ``expected_share`` (the typical routing draw of the benchmarks and the tuner)."""
    return e * expected_share(m, e, top_k)


def expected_active(m: int, e: int, top_k: int = DEFAULT_TOP_K) -> int:
    """Experts some token of an m-token tile picks, at most: m * top_k, at most E."""
    return max(1, min(e, m * top_k))


def skip_by_default(m: int, e: int, top_k: int = DEFAULT_TOP_K) -> bool:
    """The rule behind ``skip=None``: skip while ``expected_share(m, e, top_k) <= SKIP_MAX_SHARE``
    (top-8 of 256 experts: M <= 64; of 128: M <= 31)."""
    return expected_share(m, e, top_k) <= SKIP_MAX_SHARE


def pick(m: int, e: int, top_k: int = DEFAULT_TOP_K, *, problem=None, device=None,
         routed_ok: bool = True) -> str:
    """The strategy for a batch of m tokens over e experts at top-k routing (the module's rule).
    ``problem`` (a ``RoutedProblem``) and ``device``: where to look for a recorded choice;
    ``routed_ok``: whether the caller can run "routed" (it has the top-k ids)."""
    if problem is not None and device is not None:
        rec = recorded(problem, device)
        if rec is not None and (routed_ok or rec != "routed"):
            return rec
    if skip_by_default(m, e, top_k):
        return "skip"
    return "routed" if routed_ok else "dense"


def recorded(problem, device) -> str | None:
    """The strategy the tuner recorded for ``problem`` (a ``RoutedProblem``: its shape, dtype,
    top_k, M bucket and weight scales: per expert, or its block) on ``device``, or None."""
    p = problem
    return _recorded(type(p), int(p.m), p.h, p.e, p.i, p.top_k, p.dtype, p.out_dtype, int(getattr(p, "block", 0)),
                     str(device))


def _recorded(kind, m: int, h: int, e: int, i: int, top_k: int, dtype, out_dtype, block: int,
              device: str) -> str | None:
    if not cache.tuned_lookups_enabled():
        return None
    # the block is part of the key: block-scaled weights cross over elsewhere (docs/routed.md)
    problem = kind(m, h, e, i, top_k, dtype, out_dtype, block)
    entry, _ = cache.lookup(cache.make_key("strategy", cache.device_name(torch.device(device)), problem))
    best = (entry or {}).get("best") or {}
    name = best.get("config")
    return name if name in STRATEGIES else None


# Under torch.compile the lookup (a file read) runs at trace time and its answer is a constant:
# what ``torch._dynamo.assume_constant_result`` sets, without importing dynamo with densemoe.
_recorded._dynamo_marked_constant = True


def resolve(op: str, strategy, skip, m: int, e: int, *, top_k: int = DEFAULT_TOP_K,
            routed_blocker: str | None = None, skip_blocker: str | None = None,
            dense_blocker: str | None = None, problem=None, device=None) -> str:
    """A caller's ``strategy`` ("skip", "dense", "routed" or None) and ``skip`` (None, True,
    False: the older switch) -> the strategy to run. ``strategy=None, skip=None``: ``pick``, or,
    where a blocker rules its answer out, the next that can run (skip -> dense -> routed;
    routed -> dense); ``skip=True`` is "skip", ``skip=False`` "dense" (with ``strategy=None``);
    both given and disagreeing is a ValueError. A forced strategy that a blocker rules out, or
    none that can run, is a ValueError naming ``op`` and why."""
    if strategy is not None and (not isinstance(strategy, str) or strategy not in STRATEGIES):
        raise ValueError(f"{op}: strategy must be None or one of {STRATEGIES}, got {strategy!r}")
    if skip is not None and skip not in (True, False):
        raise TypeError(f"{op}: skip must be None, True or False, got {skip!r}")
    if skip is not None:
        from_skip = "skip" if skip else "dense"
        if strategy is not None and strategy != from_skip:
            raise ValueError(f"{op}: strategy={strategy!r} and skip={skip!r} disagree (skip is the older "
                             f"switch: pass strategy alone)")
        strategy = from_skip
    blockers = {"routed": routed_blocker, "skip": skip_blocker, "dense": dense_blocker}
    if strategy is None:
        chosen = pick(m, e, top_k, problem=problem, device=device, routed_ok=routed_blocker is None)
        order = {"skip": ("skip", "dense", "routed"), "dense": ("dense", "routed"), "routed": ("routed", "dense")}[chosen]
        for name in order:
            if blockers[name] is None:
                return name
        raise ValueError(f"{op}: no strategy can run here: " + "; ".join(f"{n}: {blockers[n]}" for n in order))
    if blockers[strategy] is not None:
        raise ValueError(f"{op}: strategy={strategy!r} cannot run here: {blockers[strategy]}")
    return strategy


def resolve_skip(op: str, skip, m: int, e: int, *, top_k: int = DEFAULT_TOP_K,
                 blocker: str | None = None) -> bool:
    """``skip`` as a caller gave it -> whether to skip. None: the rule (``pick``), off where
    ``blocker`` says why skipping cannot run here; True: skip (a ValueError naming ``op`` and the
    blocker if it cannot); False: the dense path. Anything else is a TypeError."""
    if skip is None:
        return blocker is None and pick(m, e, top_k) == "skip"
    if skip not in (True, False):
        raise TypeError(f"{op}: skip must be None, True or False, got {skip!r}")
    if skip and blocker is not None:
        raise ValueError(f"{op}: skip=True (expert skipping) cannot run here: {blocker}")
    return bool(skip)


def quantize_y_in_fc1(inter: int) -> bool:
    """Whether the fp8 layer quantises FC1's output in FC1's epilogue (``fc1_fp8_dynamic``)
    rather than in a separate pass (``quantize_y_fold_alpha``)."""
    return inter <= FUSED_QUANT_MAX_I
