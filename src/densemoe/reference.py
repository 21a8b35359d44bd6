"""Reference twins of the ops: plain PyTorch in float64 (or float32), the single source of truth
for the semantics. Slow and memory-hungry on purpose; every test compares against these."""

from __future__ import annotations

import torch


def fc2_ref(a: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor,
            out_dtype: torch.dtype = torch.bfloat16, *,
            compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """FC2 of the dense MoE, computed in ``compute_dtype`` and cast to ``out_dtype`` once.

        out[m, n] = sum_e alpha[m, e] * sum_{i < I} a[m, e*I + i] * w[n, e*I + i]

    a [M, E*I], w [N, E*I] (any float dtype, fp8 included), alpha [M, E]; E = alpha.shape[1].
    In float64 scaling ``a`` by alpha before the product is exact (an fp8/bf16 value times an
    fp32 one fits in 53 bits), so this equals scaling each expert's partial sum.
    """
    M, K = a.shape
    E = alpha.shape[1]
    if E < 1 or K % E:
        raise ValueError(f"K={K} (a.shape[1]) is not a positive multiple of E={E} (alpha.shape[1])")
    if w.shape[1] != K or alpha.shape[0] != M:
        raise ValueError(f"shapes disagree: a {tuple(a.shape)}, w {tuple(w.shape)}, alpha {tuple(alpha.shape)}")
    a_c = a.to(compute_dtype).reshape(M, E, K // E) * alpha.to(compute_dtype)[:, :, None]
    return (a_c.reshape(M, K) @ w.to(compute_dtype).T).to(out_dtype)
