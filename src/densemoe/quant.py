"""FP8 (e4m3) quantisation helpers for the dense-MoE pipeline: plain PyTorch ops, no host sync.

Every scale is amax / 448 (448 = e4m3's largest finite value), so ``q * scale`` dequantises;
an all-zero group gets scale 1 (its values quantise to 0 exactly)."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, H] -> (x8 [M, H] fp8, scale [M] float32) with x ~= x8 * scale[:, None]."""
    xf = x.float()
    s = _scale(xf.abs().amax(dim=1))
    return (xf / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def quantize_per_token_expert(y: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y [M, E*I] -> (y8 [M, E*I] fp8, scale [M, E] float32): one scale per token and expert,
    so y[m, e*I:(e+1)*I] ~= y8[...] * scale[m, e]; FC2 takes ``alpha * scale``."""
    M, K = y.shape
    if num_experts < 1 or K % num_experts:
        raise ValueError(f"quantize_per_token_expert: y has {K} columns, not a multiple of num_experts={num_experts}")
    yf = y.float().reshape(M, num_experts, K // num_experts)
    s = _scale(yf.abs().amax(dim=2))
    return (yf / s[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(M, K), s


def quantize_per_expert(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, ...] -> (w8 fp8 of the same shape, scale [E] float32), one scale per expert."""
    wf = w.float()
    s = _scale(wf.abs().reshape(w.shape[0], -1).amax(dim=1))
    return (wf / s.reshape(-1, *([1] * (w.dim() - 1)))).clamp(-FP8_MAX, FP8_MAX).to(FP8), s
