"""Expert weights in checkpoint layout -> the kernels' layout and scales, once."""

from __future__ import annotations

import dataclasses

import torch

from densemoe.kernels.common import I_MULTIPLE
from densemoe.quant import FP8, quantize_per_expert

DTYPES = {"fp8": FP8, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class PreparedWeights:
    """The experts in the kernels' layout.

    w1 [E*2I, H]: expert e's gate rows (e*2I .. e*2I+I-1) then up rows, K-major (FC1's ``w1``).
    alpha1 [E] float32: w1's per-expert dequantisation scale (ones for bf16).
    w2 [H, E*I]: expert e's down projection in columns e*I .. e*I+I-1, K-major (FC2's ``w``).
    w2_scale [E] float32: w2's per-expert dequantisation scale, folded into FC2's alpha.
    """

    w1: torch.Tensor
    alpha1: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.alpha1.shape[0]

    @property
    def hidden(self) -> int:
        return self.w1.shape[1]

    @property
    def inter(self) -> int:
        return self.w1.shape[0] // (2 * self.num_experts)

    @property
    def dtype(self) -> torch.dtype:
        return self.w1.dtype


def _scales(name: str, s, E: int, device) -> torch.Tensor | None:
    if s is None:
        return None
    s = torch.as_tensor(s, dtype=torch.float32, device=device)
    if s.numel() == 1:
        return s.reshape(1).expand(E).contiguous()
    if s.numel() != E:
        raise ValueError(f"prepare_weights: {name} must have one scale per expert ({E}) or one in all, "
                         f"got shape {tuple(s.shape)}")
    return s.reshape(E).contiguous()


def prepare_weights(w13: torch.Tensor, w2: torch.Tensor, *, dtype: str = "fp8",
                    w13_scale=None, w2_scale=None) -> PreparedWeights:
    """Checkpoint expert weights -> ``PreparedWeights`` (one copy, done once; forward calls do
    no re-layout).

    Args:
        w13: [E, 2I, H] gate rows then up rows per expert (Hugging Face ``gate_up_proj``, vLLM
             ``w13``/``w1``), bf16/fp16/fp32, or fp8 with ``w13_scale``.
        w2:  [E, H, I] down projection per expert (``down_proj``), same dtypes, fp8 with ``w2_scale``.
        dtype: "fp8" (e4m3, one scale per expert: given fp8 weights keep theirs, others are
             quantised here) or "bf16".
        w13_scale, w2_scale: per-expert ([E] or [E, 1, 1]) or per-tensor dequantisation scales
             of fp8 checkpoint weights (``w ~= w8 * scale``); only with fp8 weights.
    """
    if dtype not in DTYPES:
        raise ValueError(f"prepare_weights: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    for name, t in (("w13", w13), ("w2", w2)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"prepare_weights: {name} must be a 3-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"prepare_weights: {name} must have a floating dtype (bf16, fp16, fp32 or fp8), got {t.dtype}")
    if w2.device != w13.device:
        raise ValueError(f"prepare_weights: w2 is on {w2.device} but w13 is on {w13.device}")
    E, two_i, H = w13.shape
    if two_i % 2 or two_i == 0:
        raise ValueError(f"prepare_weights: w13 has {two_i} rows per expert; expected 2*I (gate then up)")
    I = two_i // 2
    if I % I_MULTIPLE:
        raise ValueError(f"prepare_weights: each expert's intermediate size I must be a multiple of {I_MULTIPLE} "
                         f"(FC2 reads it in k-tiles of {I_MULTIPLE}); w13 has 2I = {two_i} rows per expert, I = {I}")
    if tuple(w2.shape) != (E, H, I):
        raise ValueError(f"prepare_weights: w2 has shape {tuple(w2.shape)}, expected (E, H, I) = ({E}, {H}, {I})")
    dev = w13.device
    s13, s2 = _scales("w13_scale", w13_scale, E, dev), _scales("w2_scale", w2_scale, E, dev)
    for name, t, s in (("w13", w13, s13), ("w2", w2, s2)):
        if t.dtype == FP8 and s is None:
            raise ValueError(f"prepare_weights: fp8 {name} needs its dequantisation scale ({name}_scale)")
        if t.dtype != FP8 and s is not None:
            raise ValueError(f"prepare_weights: {name}_scale is only for fp8 {name} (got {t.dtype})")

    def to_kernel(t, s):
        if dtype == "fp8":
            if t.dtype == FP8:
                return t, s
            return quantize_per_expert(t)
        full = t.float() * s.reshape(E, 1, 1) if t.dtype == FP8 else t
        return full.to(torch.bfloat16), torch.ones(E, dtype=torch.float32, device=dev)

    w13k, a1 = to_kernel(w13, s13)
    w2k, a2 = to_kernel(w2, s2)
    w1 = w13k.reshape(E * 2 * I, H).contiguous()
    w2_flat = w2k.permute(1, 0, 2).reshape(H, E * I).contiguous()
    return PreparedWeights(w1, a1.float().contiguous(), w2_flat, a2.float().contiguous())
