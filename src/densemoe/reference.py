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


def fc1_ref(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, *,
            x_scale: torch.Tensor | None = None, alpha_post: torch.Tensor | None = None,
            out_dtype: torch.dtype = torch.bfloat16, out_scale: torch.Tensor | None = None,
            compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """FC1 with SwiGLU in ``compute_dtype``, cast once (see ``densemoe.fc1`` for the contract).

        g = alpha1[e] * x_scale[m] * (x @ w1[e*2I : e*2I+I].T)
        u = alpha1[e] * x_scale[m] * (x @ w1[e*2I+I : e*2I+2I].T)
        y[m, e*I + i] = silu(g) * u * alpha_post[m, e]     (fp8: clamp(y / out_scale, +-448))
    """
    M, H = x.shape
    E = alpha1.shape[0]
    if E < 1 or w1.shape[0] % (2 * E) or w1.shape[1] != H:
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, alpha1 {tuple(alpha1.shape)}")
    I = w1.shape[0] // (2 * E)
    h = (x.to(compute_dtype) @ w1.to(compute_dtype).T).reshape(M, E, 2, I)
    s = alpha1.to(compute_dtype)[None, :, None]
    if x_scale is not None:
        s = s * x_scale.to(compute_dtype)[:, None, None]
    g, u = h[:, :, 0] * s, h[:, :, 1] * s
    y = torch.nn.functional.silu(g) * u
    if alpha_post is not None:
        y = y * alpha_post.to(compute_dtype)[:, :, None]
    y = y.reshape(M, E * I)
    if out_dtype == torch.float8_e4m3fn:
        if out_scale is None:
            raise ValueError("an fp8 output needs out_scale")
        y = (y / out_scale.to(compute_dtype).reshape(())).clamp(-448.0, 448.0)
    return y.to(out_dtype)


def experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, alpha: torch.Tensor, *,
                compute_dtype: torch.dtype = torch.float64, experts_per_chunk: int | None = None) -> torch.Tensor:
    """The routed experts in ``compute_dtype`` (see ``densemoe.experts_forward``), checkpoint layouts:

        out[m] = sum_e alpha[m, e] * w2[e] @ (silu(w13[e, :I] @ x[m]) * (w13[e, I:] @ x[m]))

    x [M, H], w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I], alpha [M, E] (0 = not picked).
    ``experts_per_chunk``: sum over blocks of that many experts, so the ``compute_dtype`` copies
    of the weights stay small (model shapes on a GPU); None = all at once.
    """
    E, two_i, H = w13.shape
    I = two_i // 2
    step = experts_per_chunk or E
    out = None
    for e0 in range(0, E, step):
        e1 = min(E, e0 + step)
        n = e1 - e0
        h = (x.to(compute_dtype) @ w13[e0:e1].to(compute_dtype).reshape(n * two_i, H).T).reshape(-1, n, 2, I)
        y = torch.nn.functional.silu(h[:, :, 0]) * h[:, :, 1] * alpha[:, e0:e1].to(compute_dtype)[:, :, None]
        part = y.reshape(-1, n * I) @ w2[e0:e1].to(compute_dtype).permute(1, 0, 2).reshape(H, n * I).T
        out = part if out is None else out + part
    return out