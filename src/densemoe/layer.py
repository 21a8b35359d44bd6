"""The MoE layer: router -> alpha -> the routed experts (``experts_forward``) [+ shared experts].

``DenseMoE`` is an ``nn.Module`` holding the prepared expert weights and the router;
``DenseMoE.from_hf(block, dtype)`` builds one from transformers' ``MixtralSparseMoeBlock``,
``Qwen3MoeSparseMoeBlock`` or ``DeepseekV3MoE`` (``integrations/hf.py`` reads the block).
"""

from __future__ import annotations

import torch
from torch import nn

from densemoe import routing
from densemoe.experts import experts_forward
from densemoe.integrations import hf
from densemoe.quant import FP8
from densemoe.weights import PreparedWeights


class DenseMoE(nn.Module):
    """A whole MoE block (router + routed experts [+ shared experts]) on densemoe's kernels.

    router: "softmax" (Mixtral, Qwen3-MoE: softmax top-k, ``renormalize``) or "deepseek_v3"
    (sigmoid grouped top-k with ``n_group``, ``topk_group``, ``e_score_correction_bias``,
    ``routed_scaling_factor``, ``norm_topk_prob``). ``logits_fp32``: compute router logits in
    float32 (DeepSeek-V3) instead of the hidden states' dtype (Mixtral, Qwen3). ``strategy``:
    "skip", "dense", "routed" or None (default: ``strategy.pick``'s rule per call; an attribute,
    settable); ``skip``: the older switch (True: "skip", False: "dense"). ``experts_forward``.

    Sharded (``densemoe.parallel``): ``tp_group`` / ``ep_group`` say how ``prepared`` was cut
    (``parallel.shard_weights``: this rank's intermediate columns / experts); ``gate_weight``
    stays whole ([E, H], E over all ranks); each call routes globally, runs the rank's share and
    sums the partial outputs over the groups; ``reduce_pieces`` > 1 runs FC2 in that many pieces
    of the output columns and sums each piece while the next one's FC2 runs (default 1: not yet
    measured on several GPUs, docs/parallel.md)."""

    def __init__(self, prepared: PreparedWeights, gate_weight: torch.Tensor, top_k: int, *,
                 router: str = "softmax", renormalize: bool = True, logits_fp32: bool = False,
                 n_group: int = 1, topk_group: int = 1, e_score_correction_bias: torch.Tensor | None = None,
                 routed_scaling_factor: float = 1.0, norm_topk_prob: bool = True,
                 shared_experts: nn.Module | None = None, skip: bool | None = None,
                 strategy: str | None = None, tp_group=None, ep_group=None, reduce_pieces: int = 1):
        super().__init__()
        if not isinstance(prepared, PreparedWeights):
            raise TypeError(f"DenseMoE: prepared must be the PreparedWeights that densemoe.prepare_weights(w13, w2) "
                            f"returns, got {type(prepared).__name__}")
        from densemoe.parallel import Shard

        shard = Shard.of(tp_group, ep_group)
        E = prepared.num_experts * shard.ep_size  # the router's experts: every rank's
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
            raise ValueError(f"DenseMoE: top_k must be an int in [1, E={E}], got {top_k!r}")
        if router not in ("softmax", "deepseek_v3"):
            raise ValueError(f"DenseMoE: router must be 'softmax' or 'deepseek_v3', got {router!r}")
        if tuple(gate_weight.shape) != (E, prepared.hidden):
            raise ValueError(f"DenseMoE: gate_weight must be [E, H] = [{E}, {prepared.hidden}]"
                             f"{' (E over all of ep_group)' if shard.ep_size > 1 else ''}, got {tuple(gate_weight.shape)}")
        from densemoe.parallel import cuts

        cuts(prepared.hidden, reduce_pieces, prepared.block or 1, where="DenseMoE: reduce_pieces")  # here, not in forward
        self.tp_group, self.ep_group, self.num_experts = tp_group, ep_group, E
        self.reduce_pieces = reduce_pieces
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
        self.skip = skip  # the older switch: None, True ("skip") or False ("dense")
        self.strategy = strategy  # None: the rule per call

    def route(self, x: torch.Tensor):
        """RouterOutput (alpha [M, E] float32, topk_ids, topk_weights) for x [M, H]."""
        return self._route(x)[0]

    def _route(self, x: torch.Tensor, quantize: bool = False):
        """(RouterOutput, (x8, sx) or None): the gate's logits (``routing.router_logits``: at
        small M one kernel, which with ``quantize`` also quantises x for the fp8 experts), then
        the top-k."""
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
        if self.tp_group is not None or self.ep_group is not None:
            from densemoe.parallel import sharded_experts

            route = self.route(x)
            out = sharded_experts(x, self.prepared, route.topk_ids, route.topk_weights, num_experts=self.num_experts,
                                  tp_group=self.tp_group, ep_group=self.ep_group, pieces=self.reduce_pieces,
                                  strategy=self.strategy if self.skip is None else ("skip" if self.skip else "dense")
                                  ).reshape(shape)
            return out + self.shared_experts(hidden_states) if self.shared_experts is not None else out
        # fp8 experts: x quantised by the router only where its gate kernel does it in the same launch
        # (M <= 4). Elsewhere the experts quantise x themselves, with the same bits: skip and dense in a
        # launch of their own, as the router would have; routed in its schedule's launch up to SMALL_P pairs.
        fp8 = self.prepared.dtype == FP8 and not self.prepared.block
        route, x_quant = self._route(x, quantize=fp8 and routing.gate_kernel_runs(x, self.gate_weight))
        # one token: FC1 and FC2 walk the router's top-k ids (distinct by construction)
        out = experts_forward(x, self.prepared, route.alpha, skip=self.skip, strategy=self.strategy, top_k=self.top_k,
                              x_quant=x_quant, expert_ids=route.topk_ids, topk_weights=route.topk_weights
                              ).reshape(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out

    @classmethod
    def from_hf(cls, block: nn.Module, dtype: str = "fp8", *, tp_group=None, ep_group=None,
                reduce_pieces: int = 1) -> "DenseMoE":
        """From transformers' ``MixtralSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock`` or
        ``DeepseekV3MoE`` (5.x): routed experts through densemoe, the block's shared experts
        (DeepSeek-V3) kept as they are. ``dtype``: "fp8" or "bf16" kernels. ``tp_group`` /
        ``ep_group``: keep this rank's share of the experts (``densemoe.parallel``); the shared
        experts are not cut; ``reduce_pieces`` as in the constructor."""
        prepared, gate_weight, top_k, kwargs = hf.layer_args(block, dtype, tp_group=tp_group, ep_group=ep_group)
        return cls(prepared, gate_weight, top_k, tp_group=tp_group, ep_group=ep_group, reduce_pieces=reduce_pieces,
                   **kwargs)
