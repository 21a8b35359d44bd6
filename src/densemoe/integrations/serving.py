"""Serving engines: ``fused_experts`` with vLLM / SGLang's argument names and weight layouts, and
the cache that prepares each engine's weights once."""

from __future__ import annotations

import weakref

import torch

from densemoe.experts import experts_forward
from densemoe.quant import FP8
from densemoe.weights import PreparedWeights, prepare_weights

OP = "fused_experts"


_PREPARED: dict[int, tuple] = {}  # id(w1) -> (weakref to w1, key, PreparedWeights)


def _prepared_cached(w1, w2, dtype, w1_scale, w2_scale) -> PreparedWeights:
    """Prepare once per (w1, w2, dtype, scales): cached while w1 lives, redone if any is modified.
    (Tensors compare elementwise, so the cache is keyed by id with a weak reference to check
    the identity; the entry goes when w1 is collected.)"""
    def version(s):  # a scale tensor changed in place re-prepares too (a Python number is its own key)
        return (id(s), s._version) if isinstance(s, torch.Tensor) else s
    key = (id(w2), w2._version, w1._version, dtype, version(w1_scale), version(w2_scale))
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
                  strategy: str | None = None, use_fp8_w8a8: bool = False, block_shape=None,
                  a1_scale=None, a2_scale=None,
                  **unsupported) -> torch.Tensor:
    """vLLM/SGLang-style routed experts through densemoe's kernels.

        out[m] = sum_j topk_weights[m, j] * down_e(silu(gate_e x[m]) * up_e x[m]), e = topk_ids[m, j]

    Args:
        hidden_states: [M, H].
        w1: [E, 2I, H] gate rows then up rows per expert; w2: [E, H, I]. bf16/fp16/fp32, or fp8
            with ``w1_scale`` / ``w2_scale`` (per expert or per tensor).
        topk_weights: [M, k]; topk_ids: [M, k] integer.
        dtype: the kernels' dtype, "fp8" or "bf16"; default: "fp8" for fp8 weights, else "bf16".
        The weights are converted to the kernels' layout on the first call and cached while
        ``w1`` lives (redone if ``w1`` or ``w2`` is modified in place).
        use_fp8_w8a8, block_shape: vLLM's fp8 switches. ``block_shape=[128, 128]`` with fp8 weights
            and ``w1_scale`` [E, 2I/128, H/128], ``w2_scale`` [E, H/128, I/128] (DeepSeek-V3 /
            Qwen3-FP8 block scales, kept as they are; the routed path runs them); other block
            shapes are refused. ``a1_scale`` / ``a2_scale`` (static activation scales) are not
            supported: activations are quantised dynamically (per token, or in 1 x 128 groups).
        strategy: "skip", "dense", "routed" or None (default: the rule per call,
            ``densemoe.ops.strategy``); skip: the older switch (True "skip", False "dense").
    Only ``activation="silu"`` (SwiGLU) without expert parallelism (``expert_map``) is supported.
    """
    if activation != "silu":
        raise ValueError(f"{OP}: activation={activation!r} is not supported (only 'silu', SwiGLU)")
    if unsupported:
        raise TypeError(f"{OP}: unsupported arguments {sorted(unsupported)}")
    if a1_scale is not None or a2_scale is not None:
        raise ValueError(f"{OP}: static activation scales (a1_scale / a2_scale) are not supported; densemoe "
                         "quantises activations dynamically")
    if block_shape is not None:
        if list(block_shape) != [128, 128]:
            raise ValueError(f"{OP}: block_shape={list(block_shape)} is not supported; block-scaled fp8 weights "
                             "take [128, 128] (DeepSeek-V3 / Qwen3-FP8's weight_block_size)")
        if w1.dtype != FP8 or w1_scale is None or getattr(w1_scale, "dim", lambda: 0)() != 3:
            raise ValueError(f"{OP}: block_shape=[128, 128] needs fp8 w1 / w2 with w1_scale [E, 2I/128, H/128] "
                             "and w2_scale [E, H/128, I/128]")
    if use_fp8_w8a8 and (w1.dtype != FP8 or w2.dtype != FP8):
        raise ValueError(f"{OP}: use_fp8_w8a8=True expects fp8 w1 and w2 with their scales, got {w1.dtype}, "
                         f"{w2.dtype} (densemoe quantises other weights itself with dtype='fp8')")
    if use_fp8_w8a8 and dtype == "bf16":
        raise ValueError(f"{OP}: use_fp8_w8a8=True and dtype='bf16' disagree")
    for name, t in (("hidden_states", hidden_states), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{OP}: {name} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    for name, t in (("w1", w1), ("w2", w2)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{OP}: {name} must be a 3-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    H = hidden_states.shape[1]
    E = w1.shape[0]
    if w1.shape[2] != H or w1.shape[1] % 2:
        hint = " (it looks transposed: pass w1.transpose(1, 2))" if w1.shape[1] == H else ""
        raise ValueError(f"{OP}: w1 must be [E, 2I, H={H}] (each expert's gate rows then up rows), got "
                         f"{tuple(w1.shape)}{hint}")
    I = w1.shape[1] // 2
    if tuple(w2.shape) != (E, H, I):
        hint = " (it looks transposed: pass w2.transpose(1, 2))" if tuple(w2.shape) == (E, I, H) else ""
        raise ValueError(f"{OP}: w2 must be [E, H, I] = [{E}, {H}, {I}] (from w1 [E, 2I, H] and hidden_states "
                         f"[M, H]), got {tuple(w2.shape)}{hint}")
    if expert_map is not None or (global_num_experts not in (-1, E)):
        raise ValueError(f"{OP}: expert parallelism (expert_map / global_num_experts) is not supported")
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"{OP}: topk_weights and topk_ids must both be [M, k] with M={hidden_states.shape[0]} "
                         f"(hidden_states' rows), got {tuple(topk_weights.shape)} and {tuple(topk_ids.shape)}")
    for name, t, scale in (("w1", w1, w1_scale), ("w2", w2, w2_scale)):
        if t.dtype == FP8 and scale is None:
            raise ValueError(f"{OP}: an fp8 {name} needs its dequantisation scale {name}_scale (per expert or per tensor)")
    if dtype is None:
        dtype = "fp8" if w1.dtype == FP8 else "bf16"
    prepared = _prepared_cached(w1, w2, dtype, w1_scale, w2_scale)
    # alpha [M, E] is built inside only if the strategy is not "routed"
    out = experts_forward(hidden_states, prepared, None, skip=skip, strategy=strategy, top_k=topk_ids.shape[1],
                          expert_ids=topk_ids, topk_weights=topk_weights)
    if inplace:
        hidden_states.copy_(out)
        return hidden_states
    return out
