"""Expert weights in checkpoint layout -> the kernels' layout and scales, once."""

from __future__ import annotations

import dataclasses

import torch

from densemoe.kernels.common import I_MULTIPLE
from densemoe.quant import FP8, quantize_per_expert

DTYPES = {"fp8": FP8, "bf16": torch.bfloat16}
BLOCK = 128  # the block of block-scaled fp8 checkpoints (weight_block_size [128, 128]), the only one taken


@dataclasses.dataclass(frozen=True)
class PreparedWeights:
    """The experts in the kernels' layout.

    w1 [E*2I, H]: expert e's gate rows (e*2I .. e*2I+I-1) then up rows, K-major (FC1's ``w1``).
    alpha1 [E] float32: w1's per-expert dequantisation scale (ones for bf16).
    w2 [H, E*I]: expert e's down projection in columns e*I .. e*I+I-1, K-major (FC2's ``w``).
    w2_scale [E] float32: w2's per-expert dequantisation scale, folded into FC2's alpha.
    Block-scaled fp8 (checkpoints with 128 x 128 ``weight_scale_inv``; alpha1 and w2_scale are
    then ones):
    w1_block_scale [E*2I/128, H/128] float32: the scale of w1's rows r*128.. and columns c*128..
    w2_block_scale [H/128, E*I/128] float32: the scale of w2's rows r*128.. and columns c*128..
    """

    w1: torch.Tensor
    alpha1: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    w1_block_scale: torch.Tensor | None = None
    w2_block_scale: torch.Tensor | None = None

    @property
    def block(self) -> int:
        """The weights' scale block (128), or 0 for per-expert scales."""
        return BLOCK if self.w1_block_scale is not None else 0

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


def _block_scales(w13, w2, s13, s2):
    """(w13's, w2's) 128 x 128 block scales as float32 [E, 2I/128, H/128], [E, H/128, I/128], or
    None when neither scale is 3-D with more than one block; a ValueError saying what is
    supported for anything in between. Beside a block-scaled w13, a w2 of one block per expert
    (H = I = 128) has block scales of shape [E, 1, 1]."""
    def blocky(s):
        return isinstance(s, torch.Tensor) and s.dim() == 3 and s[0].numel() > 1
    if not (blocky(s13) or blocky(s2)):
        return None
    E, two_i, H = w13.shape
    I = two_i // 2
    def one_block(s, w):  # a matrix of one 128 x 128 block: its block scale is [E, 1, 1]
        return (isinstance(s, torch.Tensor) and s.dim() == 3 and tuple(s.shape) == (E, 1, 1)
                and tuple(w.shape[1:]) == (BLOCK, BLOCK))
    if not ((blocky(s13) or one_block(s13, w13)) and (blocky(s2) or one_block(s2, w2))):
        raise ValueError("prepare_weights: block scales for one of w13 / w2 and per-expert scales for the other "
                         "are not supported: give both as 128 x 128 block scales or both per expert")
    for name, w in (("w13", w13), ("w2", w2)):
        if w.dtype != FP8:
            raise ValueError(f"prepare_weights: block scales are for fp8 weights; {name} is {w.dtype}")
    if H % BLOCK or I % BLOCK:
        raise ValueError(f"prepare_weights: block-scaled weights need H and I to be multiples of {BLOCK} "
                         f"(got H={H}, I={I}); the 128 x 128 blocks of DeepSeek-V3 / Qwen3-FP8 checkpoints are "
                         "what is supported")
    for name, sc, want in (("w13_scale", s13, (E, two_i // BLOCK, H // BLOCK)), ("w2_scale", s2, (E, H // BLOCK, I // BLOCK))):
        if tuple(sc.shape) != want:
            rows, cols = (two_i, H) if name == "w13_scale" else (H, I)
            got = tuple(sc.shape)
            blk = (f"{rows / got[1]:g} x {cols / got[2]:g}" if len(got) == 3 and got[1] and got[2] else "?")
            raise ValueError(f"prepare_weights: {name} has shape {got}, blocks of {blk}; only 128 x 128 blocks "
                             f"(weight_block_size [128, 128]) are supported: expected {want}")
    return s13.to(torch.float32), s2.to(torch.float32)


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
             of fp8 checkpoint weights (``w ~= w8 * scale``); only with fp8 weights. Or 128 x 128
             block scales (DeepSeek-V3/R1, Qwen3-FP8: ``weight_scale_inv``, which multiplies):
             w13_scale [E, 2I/128, H/128], w2_scale [E, H/128, I/128]. With dtype "fp8" they are
             kept as they are (never folded into coarser ones; the routed path applies them per
             128-wide k-step); with "bf16" the weights are dequantised block by block.
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
    blocks = _block_scales(w13, w2, w13_scale, w2_scale)
    if blocks is not None:
        b13, b2 = (b.to(dev) for b in blocks)
        if dtype == "bf16":  # dequantised block by block
            deq13 = (w13.float().reshape(E, two_i // BLOCK, BLOCK, H // BLOCK, BLOCK) * b13[:, :, None, :, None])
            deq2 = (w2.float().reshape(E, H // BLOCK, BLOCK, I // BLOCK, BLOCK) * b2[:, :, None, :, None])
            return prepare_weights(deq13.reshape(E, two_i, H).to(torch.bfloat16), deq2.reshape(E, H, I).to(torch.bfloat16),
                                   dtype="bf16")
        ones = torch.ones(E, dtype=torch.float32, device=dev)
        return PreparedWeights(
            w13.reshape(E * two_i, H).contiguous(), ones, w2.permute(1, 0, 2).reshape(H, E * I).contiguous(), ones.clone(),
            b13.reshape(E * two_i // BLOCK, H // BLOCK).contiguous(),
            b2.permute(1, 0, 2).reshape(H // BLOCK, E * I // BLOCK).contiguous())
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
