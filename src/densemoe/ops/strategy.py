"""How the MoE layer runs a batch: the one owner of that decision.

Strategies (one math, ``docs/architecture.md``):

    "dense"  FC1 and FC2 over all E experts, a per-token, per-expert alpha zeroing what a token
             did not pick. Costs every expert's weights, whatever the batch picked.
    "skip"   the same kernels, each token tile walking only the experts some token of it picked
             (lists built on the GPU, no host sync). Costs the picked experts' weights.

The rule: skip while the share of experts that M tokens are expected to pick under uniform
top-k routing stays at or below ``SKIP_MAX_SHARE``; above it, the dense schedule. The layer
(``experts_forward``), FC1, FC2, ``fused_experts`` and the transformers integration all ask
``resolve_skip``; FC1's tile rule reads ``expected_active``. Where the threshold comes from:
``docs/skipping.md``.

The fp8 pipeline's quantisation of FC1's output (``quantize_y_in_fc1``) is decided here too.
"""

from __future__ import annotations

DEFAULT_TOP_K = 8  # the top-k assumed when the caller does not say (DeepSeek-V3, Qwen3-MoE)
SKIP_MAX_SHARE = 0.87  # skip while at most this share of the experts is expected to be picked
# FC1 quantises its own output (``fc1_fp8_dynamic``, one tile holds all of I) for I up to this;
# 0: never, the layer runs FC1 with a bf16 output and ``quantize_y_fold_alpha`` (docs/layer.md)
FUSED_QUANT_MAX_I = 0

STRATEGIES = ("dense", "skip")


def expected_share(m: int, e: int, top_k: int = DEFAULT_TOP_K) -> float:
    """Expected share of E experts picked by at least one of m tokens (uniform top-k)."""
    return 1.0 - (1.0 - min(1.0, top_k / max(e, 1))) ** max(m, 0)


def expected_active(m: int, e: int, top_k: int = DEFAULT_TOP_K) -> int:
    """Experts some token of an m-token tile picks, at most: m * top_k, at most E."""
    return max(1, min(e, m * top_k))


def skip_by_default(m: int, e: int, top_k: int = DEFAULT_TOP_K) -> bool:
    """The rule behind ``skip=None``: skip while ``expected_share(m, e, top_k) <= SKIP_MAX_SHARE``
    (top-8 of 256 experts: M <= 64; of 128: M <= 31)."""
    return expected_share(m, e, top_k) <= SKIP_MAX_SHARE


def pick(m: int, e: int, top_k: int = DEFAULT_TOP_K) -> str:
    """The strategy for a batch of m tokens over e experts at top-k routing."""
    return "skip" if skip_by_default(m, e, top_k) else "dense"


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
