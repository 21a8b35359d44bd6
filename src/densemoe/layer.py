"""The dense MoE layer: router -> alpha -> FC1 (SwiGLU fused) -> FC2, and its entry points.

- ``experts_forward(x, prepared, alpha)``: the routed experts for a given alpha [M, E].
- ``fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, ...)``: the functional form
  serving engines call (vLLM / SGLang argument names and layouts).
- ``DenseMoE``: an ``nn.Module`` with the router; ``DenseMoE.from_hf(block, dtype)`` builds one
  from transformers' ``MixtralSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock`` or ``DeepseekV3MoE``.

Pipelines (no host sync anywhere):

    fp8:  x8, sx = quantize_per_token(x)                     # [M, H] fp8, [M]
          y = fc1(x8, w1, alpha1, x_scale=sx, routing=alpha)  # [M, E*I] bf16, SwiGLU fused
          y8, alpha2 = quantize_y_fold_alpha(y, alpha, w2_scale)
              # one kernel; reads y only where alpha != 0, writes zeros elsewhere
          (with I <= FUSED_QUANT_MAX_I, 0 today: y8, s_y = fc1_fp8_dynamic(...) quantises in
           FC1's epilogue and alpha2 = alpha * s_y * w2_scale)
          out = fc2(y8, w2, alpha2)                          # [M, H] bf16
    bf16: out = fc2(fc1(x, w1, alpha1, routing=alpha), w2, alpha * w2_scale)   (with skipping: w_scale=w2_scale)

Expert skipping (``skip``; on by default while ``skip_by_default(M, E, top_k)``): FC1 and FC2 each list, on
the GPU, the experts each token tile picked and read only those weights; for one token DenseMoE
hands them the router's top-k ids as that list.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from densemoe.ops.fc1 import fc1, fc1_fp8_dynamic
from densemoe.ops.fc2 import SKIP_TOP_K, fc2, skip_by_default
from densemoe.quant import FP8, quantize_per_token, quantize_y_fold_alpha
from densemoe.weights import PreparedWeights, prepare_weights


# The fp8 pipeline can quantise FC1's output in FC1's epilogue (``fc1_fp8_dynamic``, I <= 256)
# instead of in a separate pass (``quantize_y_fold_alpha``). Off (0): on the H100 (DeepSeek-V3
# TP8 fp8, 26c023d) the fused FC1, whose tiles must hold all of I, took 334-374 us at M = 1-128
# against 313-347 us for FC1 plus the separate pass, and the layer 519 us against 488 at M = 1.
FUSED_QUANT_MAX_I = 0

# Not done: FC2 on FC1's bf16 output with w2's fp8 tiles converted in registers (W8A16, no y
# quantisation pass; commit ac1877b). H100, TP8 fp8 with skipping: FC2 took 19.5 us at M = 1
# against 12.4 on fp8 y, and the layer was slower at every M from 1 to 64 (M = 1 45.0 against
# 42.9 us, M = 64 570 against 454).


def experts_forward(x: torch.Tensor, prepared: PreparedWeights, alpha: torch.Tensor, *,
                    skip: bool | None = None, top_k: int | None = None,
                    x_quant: tuple[torch.Tensor, torch.Tensor] | None = None,
                    expert_ids: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, H] = sum_e alpha[m, e] * expert_e(x[m]) with expert_e = down(silu(gate x) * up x).

    x [M, H] (any float dtype), alpha [M, E] float32 (0 where m did not pick e). Returns x's
    dtype (bf16 for fp8 x). ``skip``: expert skipping in FC1 and FC2 (the experts no token of a
    tile picked are never read): None (default) where it pays (``skip_by_default(M, E,
    top_k)``; ``top_k``: the routing's, 8 when not given), True always, False never (the dense
    path, for comparison). ``x_quant``: (x8, sx) = ``quantize_per_token(x)`` already computed
    (``DenseMoE`` gets it from the router's fused kernel); fp8 weights only. ``expert_ids``
    [k] or [1, k]: the experts a single token picked (distinct, in [0, E): ``DenseMoE`` passes its
    router's top-k ids), which FC1 and FC2 walk instead of listing them from alpha; used at M = 1
    with skipping, ignored otherwise."""
    if x.dim() != 2 or x.shape[1] != prepared.hidden:
        raise ValueError(f"experts_forward: x must be [M, H={prepared.hidden}], got {tuple(x.shape)}")
    alpha = alpha.float()
    if skip is None:
        skip = skip_by_default(x.shape[0], prepared.num_experts, top_k or SKIP_TOP_K)
    if x_quant is not None:
        if prepared.dtype != FP8:
            raise ValueError("experts_forward: x_quant is for fp8 weights; these are " + str(prepared.dtype))
        x8, sx = x_quant
        if x8.shape != x.shape or x8.dtype != FP8 or sx.shape != (x.shape[0],):
            raise ValueError(f"experts_forward: x_quant must be (x8 [M, H] fp8, sx [M]) for x {tuple(x.shape)}, got "
                             f"{tuple(x8.shape)} {x8.dtype}, {tuple(sx.shape)}")
    ids = expert_ids if skip and x.shape[0] == 1 else None
    if prepared.dtype == FP8:
        x8, sx = quantize_per_token(x) if x_quant is None else x_quant
        if prepared.inter <= FUSED_QUANT_MAX_I:  # one FC1 tile holds all of I: quantise in its epilogue
            y8, ys = fc1_fp8_dynamic(x8, prepared.w1, prepared.alpha1, x_scale=sx)
            out = fc2(y8, prepared.w2, alpha * ys * prepared.w2_scale[None, :], skip=skip)
        else:
            # the quantisation reads only picked segments: FC1 need not zero the others
            y = fc1(x8, prepared.w1, prepared.alpha1, x_scale=sx, routing=alpha, skip=skip, fill_unpicked=False,
                    expert_ids=ids)
            y8, alpha2 = quantize_y_fold_alpha(y, alpha, prepared.w2_scale)
            out = fc2(y8, prepared.w2, alpha2, skip=skip, expert_ids=ids)
    else:
        # FC2 (same skip rule) never reads the experts a tile did not pick; FC1 need not zero them
        y = fc1(x.to(torch.bfloat16), prepared.w1, prepared.alpha1, routing=alpha, skip=skip, fill_unpicked=False,
                expert_ids=ids)
        if skip:  # w2's scale in the kernel (no launch for alpha * w2_scale)
            out = fc2(y, prepared.w2, alpha, skip=True, w_scale=prepared.w2_scale, expert_ids=ids)
        else:  # (in the dense loop the per-k-tile load of w_scale cost 8%: TP8 M = 96 1081 against 998 us)
            out = fc2(y, prepared.w2, alpha * prepared.w2_scale[None, :], skip=False)
    return out.to(x.dtype) if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else out


_PREPARED: dict[int, tuple] = {}  # id(w1) -> (weakref to w1, key, PreparedWeights)


def _prepared_cached(w1, w2, dtype, w1_scale, w2_scale) -> PreparedWeights:
    """Prepare once per (w1, w2, dtype): cached while w1 lives, redone if either is modified.
    (Tensors compare elementwise, so the cache is keyed by id with a weak reference to check
    the identity; the entry goes when w1 is collected.)"""
    key = (id(w2), w2._version, w1._version, dtype)
    hit = _PREPARED.get(id(w1))
    if hit is not None and hit[0]() is w1 and hit[1] == key:
        return hit[2]
    prepared = prepare_weights(w1, w2, dtype=dtype, w13_scale=w1_scale, w2_scale=w2_scale)
    if hit is None or hit[0]() is not w1:
        weakref.finalize(w1, _PREPARED.pop, id(w1), None)
    _PREPARED[id(w1)] = (weakref.ref(w1), key, prepared)
    return prepared


def fused_experts(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, dtype: str | None = None,
                  w1_scale=None, w2_scale=None, activation: str = "silu", inplace: bool = False,
                  global_num_experts: int = -1, expert_map=None, skip: bool | None = None,
                  **unsupported) -> torch.Tensor:
    """vLLM/SGLang-style routed experts through densemoe's dense kernels.

        out[m] = sum_j topk_weights[m, j] * down_e(silu(gate_e x[m]) * up_e x[m]), e = topk_ids[m, j]

    Args:
        hidden_states: [M, H].
        w1: [E, 2I, H] gate rows then up rows per expert; w2: [E, H, I]. bf16/fp16/fp32, or fp8
            with ``w1_scale`` / ``w2_scale`` (per expert or per tensor).
        topk_weights: [M, k]; topk_ids: [M, k] integer.
        dtype: the kernels' dtype, "fp8" or "bf16"; default: "fp8" for fp8 weights, else "bf16".
        The weights are converted to the kernels' layout on the first call and cached while
        ``w1`` lives (redone if ``w1`` or ``w2`` is modified in place).
        skip: expert skipping (``experts_forward``): None (default) where it pays, False off.
    Only ``activation="silu"`` (SwiGLU) without expert parallelism (``expert_map``) is supported.
    """
    if activation != "silu":
        raise ValueError(f"fused_experts: activation={activation!r} is not supported (only 'silu', SwiGLU)")
    if expert_map is not None or (global_num_experts not in (-1, w1.shape[0])):
        raise ValueError("fused_experts: expert parallelism (expert_map / global_num_experts) is not supported")
    if unsupported:
        raise TypeError(f"fused_experts: unsupported arguments {sorted(unsupported)}")
    if dtype is None:
        dtype = "fp8" if w1.dtype == FP8 else "bf16"
    prepared = _prepared_cached(w1, w2, dtype, w1_scale, w2_scale)
    from densemoe.routing import alpha_from_topk

    alpha = alpha_from_topk(topk_ids, topk_weights.float(), prepared.num_experts)
    out = experts_forward(hidden_states, prepared, alpha, skip=skip, top_k=topk_ids.shape[1])
    if inplace:
        hidden_states.copy_(out)
        return hidden_states
    return out


class DenseMoE(nn.Module):
    """A whole MoE block (router + routed experts [+ shared experts]) on densemoe's kernels.

    router: "softmax" (Mixtral, Qwen3-MoE: softmax top-k, ``renormalize``) or "deepseek_v3"
    (sigmoid grouped top-k with ``n_group``, ``topk_group``, ``e_score_correction_bias``,
    ``routed_scaling_factor``, ``norm_topk_prob``). ``logits_fp32``: compute router logits in
    float32 (DeepSeek-V3) instead of the hidden states' dtype (Mixtral, Qwen3). ``skip``: expert
    skipping in FC1 and FC2 (``experts_forward``; an attribute, settable)."""

    def __init__(self, prepared: PreparedWeights, gate_weight: torch.Tensor, top_k: int, *,
                 router: str = "softmax", renormalize: bool = True, logits_fp32: bool = False,
                 n_group: int = 1, topk_group: int = 1, e_score_correction_bias: torch.Tensor | None = None,
                 routed_scaling_factor: float = 1.0, norm_topk_prob: bool = True,
                 shared_experts: nn.Module | None = None, skip: bool | None = None):
        super().__init__()
        if router not in ("softmax", "deepseek_v3"):
            raise ValueError(f"DenseMoE: router must be 'softmax' or 'deepseek_v3', got {router!r}")
        if tuple(gate_weight.shape) != (prepared.num_experts, prepared.hidden):
            raise ValueError(f"DenseMoE: gate_weight must be [E, H] = [{prepared.num_experts}, {prepared.hidden}], "
                             f"got {tuple(gate_weight.shape)}")
        self.prepared = prepared
        self.register_buffer("gate_weight", gate_weight.detach().clone())
        if e_score_correction_bias is not None:
            self.register_buffer("e_score_correction_bias", e_score_correction_bias.detach().float().clone())
        else:
            self.e_score_correction_bias = None
        self.top_k, self.router, self.renormalize, self.logits_fp32 = top_k, router, renormalize, logits_fp32
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor, self.norm_topk_prob = routed_scaling_factor, norm_topk_prob
        self.shared_experts = shared_experts
        self.skip = skip  # expert skipping: None where it pays, True always, False off

    def route(self, x: torch.Tensor):
        """RouterOutput (alpha [M, E] float32, topk_ids, topk_weights) for x [M, H]."""
        return self._route(x)[0]

    def _route(self, x: torch.Tensor, quantize: bool = False):
        """(RouterOutput, (x8, sx) or None): the gate's logits (``routing.router_logits``: at
        small M one kernel, which with ``quantize`` also quantises x for the fp8 experts), then
        the top-k."""
        from densemoe import routing

        logits, x_quant = routing.router_logits(x, self.gate_weight, float32=self.logits_fp32, quantize=quantize)
        if self.router == "softmax":
            return routing.softmax_topk(logits, self.top_k, renormalize=self.renormalize), x_quant
        return routing.deepseek_v3_topk(logits, self.top_k, n_group=self.n_group, topk_group=self.topk_group,
                                        e_score_correction_bias=self.e_score_correction_bias,
                                        routed_scaling_factor=self.routed_scaling_factor,
                                        norm_topk_prob=self.norm_topk_prob), x_quant

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        # fp8 experts: the router's kernel quantises x too where it runs (M <= 4), else None
        route, x_quant = self._route(x, quantize=self.prepared.dtype == FP8)
        # one token: FC1 and FC2 walk the router's top-k ids (distinct by construction)
        out = experts_forward(x, self.prepared, route.alpha, skip=self.skip, top_k=self.top_k,
                              x_quant=x_quant, expert_ids=route.topk_ids).reshape(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out

    @classmethod
    def from_hf(cls, block: nn.Module, dtype: str = "fp8") -> "DenseMoE":
        """From transformers' ``MixtralSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock`` or
        ``DeepseekV3MoE`` (5.x): routed experts through densemoe, the block's shared experts
        (DeepSeek-V3) kept as they are. ``dtype``: "fp8" or "bf16" kernels."""
        name = type(block).__name__
        experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
        if experts is None or gate is None or not hasattr(experts, "gate_up_proj"):
            raise TypeError(f"DenseMoE.from_hf: {name} is not a supported MoE block "
                            "(MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock, DeepseekV3MoE)")
        _check_hf_experts(experts)
        prepared = prepare_weights(experts.gate_up_proj.detach(), experts.down_proj.detach(), dtype=dtype)
        if name == "DeepseekV3MoE":
            return cls(prepared, gate.weight, gate.top_k, router="deepseek_v3", logits_fp32=True,
                       n_group=gate.num_group, topk_group=gate.topk_group,
                       e_score_correction_bias=gate.e_score_correction_bias,
                       routed_scaling_factor=gate.routed_scaling_factor, norm_topk_prob=gate.norm_topk_prob,
                       shared_experts=block.shared_experts)
        if name == "Qwen3MoeSparseMoeBlock":
            return cls(prepared, gate.weight, gate.top_k, renormalize=gate.norm_topk_prob)
        if name == "MixtralSparseMoeBlock":
            return cls(prepared, gate.weight, gate.top_k, renormalize=True)
        raise TypeError(f"DenseMoE.from_hf: {name} is not a supported MoE block "
                        "(MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock, DeepseekV3MoE)")


def _check_hf_experts(experts: nn.Module) -> None:
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        raise NotImplementedError(f"{type(experts).__name__}: transposed or interleaved gate/up layouts are not supported")
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise NotImplementedError(f"{type(experts).__name__}: experts with biases or without a gate are not supported")
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise NotImplementedError(f"{type(experts).__name__}: activation {act!r} is not supported (SwiGLU only)")


def _hf_experts_forward(dtype: str):
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        cache = self.__dict__.setdefault("_densemoe_prepared", {})
        key = (dtype, self.gate_up_proj._version, self.down_proj._version)
        if key not in cache:
            _check_hf_experts(self)
            cache.clear()
            cache[key] = prepare_weights(self.gate_up_proj.detach(), self.down_proj.detach(), dtype=dtype)
        prepared = cache[key]
        from densemoe.routing import alpha_from_topk

        alpha = alpha_from_topk(top_k_index, top_k_weights.float(), prepared.num_experts)
        return experts_forward(hidden_states, prepared, alpha, top_k=top_k_index.shape[-1]).to(hidden_states.dtype)
    forward.__name__ = f"densemoe_{dtype}_experts_forward"
    return forward


def register_hf() -> list[str]:
    """Register densemoe in transformers' ``ExpertsInterface``: ``experts_implementation=
    "densemoe"`` (bf16 kernels) and ``"densemoe_fp8"`` (fp8 kernels, per-expert weight scales,
    dynamic activation scales). The weights are prepared on first use and cached on the experts
    module (redone if its parameters are modified in place). Returns the names registered."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register("densemoe", _hf_experts_forward("bf16"))
    ExpertsInterface.register("densemoe_fp8", _hf_experts_forward("fp8"))
    return ["densemoe", "densemoe_fp8"]
