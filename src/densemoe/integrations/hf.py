"""Hugging Face transformers (5.x): densemoe as an ``experts_implementation``, and DenseMoE layers
built from transformers' MoE blocks.

- ``register_hf()``: registers ``"densemoe"`` (bf16 kernels) and ``"densemoe_fp8"`` (fp8 kernels)
  in transformers' ``ExpertsInterface``; ``import densemoe`` does it through ``_hf_hook``.
- ``layer_args(block, dtype)``: what ``DenseMoE.from_hf`` builds a layer from
  (``MixtralSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock``, ``DeepseekV3MoE``).

densemoe never imports transformers itself, except in ``register_hf``.
"""

from __future__ import annotations

import torch
from torch import nn

from densemoe.experts import experts_forward
from densemoe.weights import PreparedWeights, prepare_weights

SUPPORTED_BLOCKS = ("MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "DeepseekV3MoE")


def check_experts(experts: nn.Module) -> None:
    """Raise NotImplementedError for transformers experts modules densemoe cannot run."""
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        raise NotImplementedError(f"{type(experts).__name__}: transposed or interleaved gate/up layouts are not supported")
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise NotImplementedError(f"{type(experts).__name__}: experts with biases or without a gate are not supported")
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise NotImplementedError(f"{type(experts).__name__}: activation {act!r} is not supported (SwiGLU only)")


def expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(gate_up_proj [E, 2I, H], down_proj [E, H, I], their 128 x 128 block scales or None) of a
    transformers experts module: the plain one, or ``FP8Experts`` (fine-grained fp8: fp8 weights
    with ``*_scale_inv`` float32 block scales), used as they are. NotImplementedError for the
    fine-grained forms densemoe cannot run, saying which."""
    w13, w2 = experts.gate_up_proj.detach(), experts.down_proj.detach()
    s13 = getattr(experts, "gate_up_proj_scale_inv", None)
    if s13 is None:
        return w13, w2, None, None
    name = type(experts).__name__
    block = getattr(experts, "block_size", None)
    if block is None or tuple(block) != (128, 128):
        raise NotImplementedError(f"{name}: fine-grained fp8 with block_size {block} is not supported (128 x 128)")
    if getattr(experts, "activation_scheme", "dynamic") != "dynamic":
        raise NotImplementedError(f"{name}: static activation scales are not supported (dynamic only)")
    s2 = experts.down_proj_scale_inv.detach()
    if s13.dtype != torch.float32 or s2.dtype != torch.float32:
        raise NotImplementedError(f"{name}: scales in {s13.dtype} (UE8M0?) are not supported; float32 "
                                  "weight_scale_inv is (DeepSeek-V3/R1, Qwen3-FP8)")
    return w13, w2, s13.detach(), s2


def layer_args(block: nn.Module, dtype: str = "fp8", *, tp_group=None, ep_group=None
               ) -> tuple[PreparedWeights, torch.Tensor, int, dict]:
    """(prepared weights, gate weight, top_k, keyword arguments) of the ``DenseMoE`` that runs
    ``block``'s routed experts on densemoe's kernels (its shared experts, DeepSeek-V3's, kept as
    they are). ``dtype``: "fp8" or "bf16" kernels. ``tp_group`` / ``ep_group``: this rank's share
    of the experts only (``densemoe.parallel.shard_weights``)."""
    name = type(block).__name__
    experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
    if name not in SUPPORTED_BLOCKS or experts is None or gate is None or not hasattr(experts, "gate_up_proj"):
        raise TypeError(f"DenseMoE.from_hf: {name} is not a supported MoE block ({', '.join(SUPPORTED_BLOCKS)})")
    check_experts(experts)
    w13, w2, s13, s2 = expert_weights(experts)
    if tp_group is not None or ep_group is not None:
        from densemoe.parallel import shard_weights

        w13, w2, s13, s2 = shard_weights(w13, w2, tp_group=tp_group, ep_group=ep_group, w13_scale=s13, w2_scale=s2)
    prepared = prepare_weights(w13, w2, dtype=dtype, w13_scale=s13, w2_scale=s2)
    if name == "DeepseekV3MoE":
        return prepared, gate.weight, gate.top_k, dict(
            router="deepseek_v3", logits_fp32=True, n_group=gate.num_group, topk_group=gate.topk_group,
            e_score_correction_bias=gate.e_score_correction_bias, routed_scaling_factor=gate.routed_scaling_factor,
            norm_topk_prob=gate.norm_topk_prob, shared_experts=block.shared_experts)
    if name == "Qwen3MoeSparseMoeBlock":
        return prepared, gate.weight, gate.top_k, dict(renormalize=gate.norm_topk_prob)
    return prepared, gate.weight, gate.top_k, dict(renormalize=True)  # MixtralSparseMoeBlock


def _experts_forward(dtype: str):
    """The ``forward`` transformers calls on an experts module under
    ``experts_implementation="densemoe"`` (bf16) / ``"densemoe_fp8"``: the weights are prepared on
    first use and cached on the module (redone if its parameters are modified in place)."""
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        cache = self.__dict__.setdefault("_densemoe_prepared", {})
        key = (dtype, self.gate_up_proj._version, self.down_proj._version,
               getattr(getattr(self, "gate_up_proj_scale_inv", None), "_version", None),
               getattr(getattr(self, "down_proj_scale_inv", None), "_version", None))
        if key not in cache:
            check_experts(self)
            cache.clear()
            w13, w2, s13, s2 = expert_weights(self)
            cache[key] = prepare_weights(w13, w2, dtype=dtype, w13_scale=s13, w2_scale=s2)
        prepared = cache[key]
        # the strategy rule per call; alpha [M, E] is built inside only for dense / skip
        return experts_forward(hidden_states, prepared, None, expert_ids=top_k_index,
                               topk_weights=top_k_weights).to(hidden_states.dtype)
    forward.__name__ = f"densemoe_{dtype}_experts_forward"
    return forward


def register_hf() -> list[str]:
    """Register densemoe in transformers' ``ExpertsInterface``: ``experts_implementation=
    "densemoe"`` (bf16 kernels) and ``"densemoe_fp8"`` (fp8 kernels, per-expert weight scales,
    dynamic activation scales); also in ``FP8ExpertsInterface``, for experts transformers holds in
    fine-grained fp8 (128 x 128 block scales, kept as they are under "densemoe_fp8", dequantised
    block by block under "densemoe"). Returns the names registered."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register("densemoe", _experts_forward("bf16"))
    ExpertsInterface.register("densemoe_fp8", _experts_forward("fp8"))
    try:  # fine-grained fp8 experts (FP8Experts) dispatch through their own interface
        from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    except ImportError:  # pragma: no cover - a transformers without it
        FP8ExpertsInterface = None
    if FP8ExpertsInterface is not None:
        FP8ExpertsInterface.register("densemoe", _experts_forward("bf16"))
        FP8ExpertsInterface.register("densemoe_fp8", _experts_forward("fp8"))
    return ["densemoe", "densemoe_fp8"]
