"""FP8 (e4m3) quantisation for the dense-MoE pipeline, with no host sync.

Every scale is amax / 448 (448 = e4m3's largest finite value), so ``q * scale`` dequantises;
an all-zero group gets scale 1 (its values quantise to 0 exactly).

The activation quantisers (``quantize_per_token``, ``quantize_y_fold_alpha``) run one Triton
kernel each (``densemoe.kernels.triton.quant``) on a GPU or under Triton's interpreter, and
their torch twins (``densemoe.reference``: ``quantize_per_token_ref``,
``quantize_y_fold_alpha_ref``) elsewhere; both give the same bits. Weight quantisation
(``quantize_per_expert``) runs once, in torch, an expert block at a time."""

from __future__ import annotations

import torch

from densemoe._runtime import interpreter_enabled
from densemoe.reference import quantize_per_token_group_ref, quantize_per_token_ref, quantize_y_fold_alpha_ref

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448; 1 where amax == 0; NaN where amax is NaN (a NaN input keeps its row NaN)."""
    return torch.where(amax > 0, amax / FP8_MAX, torch.where(amax.isnan(), amax, torch.ones_like(amax)))


def _use_kernel(t: torch.Tensor) -> bool:
    return (t.device.type == "cuda" or interpreter_enabled()) and t.dtype in _ACT_DTYPES and t.stride(-1) == 1


# -- per token -------------------------------------------------------------------------------

@torch.library.custom_op("densemoe::quant_rows", mutates_args=("q", "s"))
def _quant_rows_op(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> None:
    from densemoe.kernels.triton.quant import quant_rows_triton

    quant_rows_triton(x, q, s)


@_quant_rows_op.register_fake
def _(x, q, s):
    return None


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, H] -> (x8 [M, H] fp8, scale [M] float32) with x ~= x8 * scale[:, None]."""
    if x.dim() != 2:
        raise ValueError(f"quantize_per_token: x must be [M, H], got shape {tuple(x.shape)}")
    if not _use_kernel(x):
        return quantize_per_token_ref(x)
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    s = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _quant_rows_op(x, q, s)
    return q, s


# -- per token and group of columns (block-scaled fp8) ------------------------------------------

@torch.library.custom_op("densemoe::quant_groups", mutates_args=("q", "s"))
def _quant_groups_op(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, group: int) -> None:
    from densemoe.kernels.triton.quant import quant_groups_triton

    quant_groups_triton(x, q, s, group)


@_quant_groups_op.register_fake
def _(x, q, s, group):
    return None


def quantize_per_token_group(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, H] -> (x8 [M, H] fp8, scale [M, H / group] float32) with
    x[:, g*group:(g+1)*group] ~= x8[...] * scale[:, g, None] (DeepSeek-V3's 1 x 128 activation
    groups, which block-scaled fp8 weights expect)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_per_token_group: x must be [M, H], got shape {tuple(x.shape)}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 16 or group & (group - 1):
        raise ValueError(f"quantize_per_token_group: group must be a power of two >= 16, got {group!r}")
    if x.shape[1] % group:
        raise ValueError(f"quantize_per_token_group: H={x.shape[1]} is not a multiple of group={group}")
    if not _use_kernel(x):
        return quantize_per_token_group_ref(x, group)
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    s = torch.empty((x.shape[0], x.shape[1] // group), dtype=torch.float32, device=x.device)
    _quant_groups_op(x, q, s, group)
    return q, s


# -- per (token, expert), FC2's alpha folded in -------------------------------------------------

def quantize_per_token_expert(y: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y [M, E*I] -> (y8 [M, E*I] fp8, scale [M, E] float32): one scale per token and expert,
    so y[m, e*I:(e+1)*I] ~= y8[...] * scale[m, e]; FC2 takes ``alpha * scale`` (torch; the
    layer uses the fused ``quantize_y_fold_alpha``)."""
    M, K = y.shape
    if num_experts < 1 or K % num_experts:
        raise ValueError(f"quantize_per_token_expert: y has {K} columns, not a multiple of num_experts={num_experts}")
    yf = y.float().reshape(M, num_experts, K // num_experts)
    s = _scale(yf.abs().amax(dim=2))
    return (yf / s[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(M, K), s


@torch.library.custom_op("densemoe::quant_y", mutates_args=("q", "alpha2"))
def _quant_y_op(y: torch.Tensor, alpha: torch.Tensor, w2_scale: torch.Tensor | None,
                q: torch.Tensor, alpha2: torch.Tensor) -> None:
    from densemoe.kernels.triton.quant import quant_y_triton

    quant_y_triton(y, alpha, w2_scale, q, alpha2)


@_quant_y_op.register_fake
def _(y, alpha, w2_scale, q, alpha2):
    return None


def quantize_y_fold_alpha(y: torch.Tensor, alpha: torch.Tensor, w2_scale: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """FC1's output -> FC2's fp8 input and alpha, in one pass:

        for m, e:  (I = y.shape[1] / E)
            alpha[m, e] == 0:  y8[m, e*I:(e+1)*I] = 0, alpha2[m, e] = 0    (y is not read)
            else:              s = amax|y[m, e*I:(e+1)*I]| / 448 (1 if all zero)
                               y8[m, e*I:(e+1)*I] = fp8(clamp(y / s, +-448))
                               alpha2[m, e] = alpha[m, e] * s * w2_scale[e]

    Args:
        y:        [M, E*I] bf16 / fp16 / fp32.
        alpha:    [M, E] float32: FC2's routing weights (0 = expert not picked).
        w2_scale: [E] float32, optional: w2's per-expert dequantisation scale (1 when None).
    Returns (y8 [M, E*I] float8_e4m3fn, alpha2 [M, E] float32) for ``densemoe.fc2(y8, w2, alpha2)``.
    """
    if y.dim() != 2 or alpha.dim() != 2 or alpha.shape[0] != y.shape[0]:
        raise ValueError(f"quantize_y_fold_alpha: y must be [M, E*I] and alpha [M, E], got y {tuple(y.shape)}, "
                         f"alpha {tuple(alpha.shape)}")
    E = alpha.shape[1]
    if E < 1 or y.shape[1] % E:
        raise ValueError(f"quantize_y_fold_alpha: y has {y.shape[1]} columns, not a multiple of alpha's E={E}")
    if alpha.dtype != torch.float32:
        raise ValueError(f"quantize_y_fold_alpha: alpha must be float32, got {alpha.dtype}")
    if w2_scale is not None and (w2_scale.shape != (E,) or w2_scale.dtype != torch.float32):
        raise ValueError(f"quantize_y_fold_alpha: w2_scale must be [E={E}] float32, got "
                         f"{tuple(w2_scale.shape)} {w2_scale.dtype}")
    if alpha.device != y.device or (w2_scale is not None and w2_scale.device != y.device):
        raise ValueError(f"quantize_y_fold_alpha: y, alpha and w2_scale must be on one device, got y on {y.device}, "
                         f"alpha on {alpha.device}" + (f", w2_scale on {w2_scale.device}" if w2_scale is not None else ""))
    if not (_use_kernel(y) and alpha.stride(-1) == 1):
        return quantize_y_fold_alpha_ref(y, alpha, w2_scale)
    q = torch.empty(y.shape, dtype=FP8, device=y.device)
    a2 = torch.empty(alpha.shape, dtype=torch.float32, device=y.device)
    _quant_y_op(y, alpha, w2_scale.contiguous() if w2_scale is not None else None, q, a2)
    return q, a2


# -- weights (once) -------------------------------------------------------------------------------

def quantize_per_expert(w: torch.Tensor, experts_per_chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, ...] -> (w8 fp8 of the same shape, scale [E] float32), one scale per expert.
    Works ``experts_per_chunk`` experts at a time, so the fp32 copy stays small."""
    E = w.shape[0]
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    s = torch.empty(E, dtype=torch.float32, device=w.device)
    for e0 in range(0, E, experts_per_chunk):
        wf = w[e0:e0 + experts_per_chunk].float()
        sc = _scale(wf.abs().reshape(wf.shape[0], -1).amax(dim=1))
        q[e0:e0 + experts_per_chunk] = (wf / sc.reshape(-1, *([1] * (w.dim() - 1)))).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        s[e0:e0 + experts_per_chunk] = sc
    return q, s
