"""Reference twins of every op: plain PyTorch (float64 by default, or loops), the single source of
truth for the semantics. Slow and memory-hungry on purpose; every test compares against these.

    fc2_ref, fc1_ref, experts_ref             the expert GEMMs and the routed experts
    router_logits_ref, softmax_topk_ref,      the routers (``densemoe.routing``), with the
    deepseek_v3_topk_ref, alpha_from_topk_ref  ``RouterOutput`` they all return
    quantize_per_token_ref,                   the activation quantisers (``densemoe.quant``):
    quantize_y_fold_alpha_ref,                the same bits as the kernels
    quantize_per_token_group_ref
    active_experts_ref                        expert skipping's per-tile expert lists
    moe_schedule_ref, routed_experts_ref      the routed path: pairs grouped by expert, and
                                              its numerics (y quantised per group) in float64

A leaf: torch only. ``densemoe.routing`` and ``densemoe.quant`` run some of these as their torch
path where no kernel can run (a CPU tensor without Triton's interpreter, say).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value


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

# ----------------------------------------------------------------------------------------------
# routers


class RouterOutput(NamedTuple):
    """What a router returns (a NamedTuple: immutable, unpacks, passes through torch.compile).

    alpha         [M, E] float32: alpha[m, topk_ids[m, j]] = topk_weights[m, j], 0 elsewhere.
    topk_ids      [M, k] int64: the experts token m picked (distinct within a row).
    topk_weights  [M, k] float32: their weights, slot for slot with topk_ids.

    The order of the k slots within a row is the router's own (see each router); alpha does not
    depend on it.
    """

    alpha: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


def router_logits_ref(x: torch.Tensor, weight: torch.Tensor, *, float32: bool = False,
                      quantize: bool = False):
    """Torch twin of ``routing.router_logits`` (F.linear, then ``quantize_per_token_ref``)."""
    if float32:
        logits = torch.nn.functional.linear(x.float(), weight.float())
    else:
        logits = torch.nn.functional.linear(x, weight.to(x.dtype))
    if not quantize:
        return logits, None
    return logits, quantize_per_token_ref(x)


def alpha_from_topk_ref(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Loop twin of alpha_from_topk: alpha [M, E] float32, element by element; an id outside
    [0, E) is dropped."""
    M, k = topk_ids.shape
    alpha = torch.zeros(M, num_experts, dtype=torch.float32)
    for m in range(M):
        for j in range(k):
            if 0 <= int(topk_ids[m, j]) < num_experts:
                alpha[m, int(topk_ids[m, j])] = float(topk_weights[m, j])
    return alpha.to(topk_ids.device)


def _ref_output(ids: list[list[int]], weights: list[list[float]], E: int, device) -> RouterOutput:
    M = len(ids)
    k = len(ids[0]) if M else 0
    topk_ids = torch.tensor(ids, dtype=torch.int64).reshape(M, k)
    topk_weights = torch.tensor(weights, dtype=torch.float64).reshape(M, k).to(torch.float32)
    alpha = alpha_from_topk_ref(topk_ids, topk_weights, E)
    return RouterOutput(alpha.to(device), topk_ids.to(device), topk_weights.to(device))


def softmax_topk_ref(router_logits: torch.Tensor, top_k: int, *, renormalize: bool,
                     dtype: torch.dtype = torch.float64) -> RouterOutput:
    """Loop twin of softmax_topk, token by token in ``dtype``; slots in descending weight."""
    x = router_logits.detach().to("cpu", dtype)
    M, E = x.shape
    ids, weights = [], []
    for m in range(M):
        row = x[m]
        e = torch.exp(row - row.max())
        p = (e / e.sum()).tolist()
        order = sorted(range(E), key=lambda i: -p[i])[:top_k]
        w = [p[i] for i in order]
        if renormalize:
            s = sum(w)
            w = [v / s for v in w]
        ids.append(order)
        weights.append(w)
    return _ref_output(ids, weights, E, router_logits.device)


def deepseek_v3_topk_ref(router_logits: torch.Tensor, top_k: int, *, n_group: int, topk_group: int,
                         e_score_correction_bias: torch.Tensor | None, routed_scaling_factor: float,
                         norm_topk_prob: bool, dtype: torch.dtype = torch.float64) -> RouterOutput:
    """Loop twin of deepseek_v3_topk, token by token in ``dtype``; slots in descending choice
    score (biased score)."""
    x = router_logits.detach().to("cpu", dtype)
    M, E = x.shape
    G = E // n_group
    bias = (torch.zeros(E, dtype=dtype) if e_score_correction_bias is None
            else e_score_correction_bias.detach().to("cpu", dtype)).tolist()
    ids, weights = [], []
    for m in range(M):
        s = torch.sigmoid(x[m]).tolist()
        c = [s[i] + bias[i] for i in range(E)]
        gscore = []
        for g in range(n_group):
            top2 = sorted(c[g * G:(g + 1) * G], reverse=True)[:2]
            gscore.append(top2[0] + top2[1])
        groups = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        candidates = [i for g in groups for i in range(g * G, (g + 1) * G)]
        order = sorted(candidates, key=lambda i: -c[i])[:top_k]
        w = [s[i] for i in order]
        if norm_topk_prob:
            d = sum(w) + 1e-20
            w = [v / d for v in w]
        w = [v * routed_scaling_factor for v in w]
        ids.append(order)
        weights.append(w)
    return _ref_output(ids, weights, E, router_logits.device)


# ----------------------------------------------------------------------------------------------
# activation quantisers: scale = amax / 448 (1 for an all-zero group), q = fp8(clamp(x / scale))


def _fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448; 1 where amax == 0; NaN where amax is NaN (torch's amax keeps NaN)."""
    return torch.where(amax > 0, amax / FP8_MAX, torch.where(amax.isnan(), amax, torch.ones_like(amax)))


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``quant.quantize_per_token``: x [M, H] -> (x8 fp8, scale [M] float32)."""
    xf = x.float()
    s = _fp8_scale(xf.abs().amax(dim=1))
    return (xf / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def quantize_per_token_group_ref(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``quant.quantize_per_token_group``: x [M, H] -> (x8 fp8, scale [M, H / group]
    float32), one scale per token and group of ``group`` columns."""
    M, H = x.shape
    xf = x.float().reshape(M, H // group, group)
    s = _fp8_scale(xf.abs().amax(dim=2))
    return (xf / s[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(M, H), s


def quantize_y_fold_alpha_ref(y: torch.Tensor, alpha: torch.Tensor, w2_scale: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``quant.quantize_y_fold_alpha``: one scale per (token, expert) segment of
    y [M, E*I] where alpha != 0 (zeros elsewhere), folded into alpha2 = alpha * scale * w2_scale."""
    M, K = y.shape
    E = alpha.shape[1]
    live = alpha != 0
    yf = torch.where(live.repeat_interleave(K // E, dim=1), y, torch.zeros_like(y)).float().reshape(M, E, K // E)
    s = _fp8_scale(yf.abs().amax(dim=2))
    y8 = (yf / s[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(M, K)
    a2 = alpha.float() * s * (w2_scale.float()[None, :] if w2_scale is not None else 1.0)
    return y8, torch.where(live, a2, torch.zeros_like(a2))


# ----------------------------------------------------------------------------------------------
# expert skipping


def active_experts_ref(routing: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``kernels.triton.skip.active_experts`` (same outputs, bit for bit): per token
    tile of ``block_m`` rows, the experts some token picked (routing != 0), ascending, then the
    rest, ascending (lists [T, E] int32), and how many were picked (counts [T] int32)."""
    M, E = routing.shape
    T = -(-M // block_m)
    lists = torch.empty((T, E), dtype=torch.int32, device=routing.device)
    counts = torch.empty((T,), dtype=torch.int32, device=routing.device)
    for t in range(T):
        picked = (routing[t * block_m:(t + 1) * block_m] != 0).any(dim=0)
        ids = torch.arange(E, device=routing.device, dtype=torch.int32)
        lists[t] = torch.cat([ids[picked], ids[~picked]])
        counts[t] = int(picked.sum())
    return lists, counts


# ----------------------------------------------------------------------------------------------
# the routed path


def moe_schedule_ref(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of the routed path's schedule: pair p = m*k + j sorted by its expert
    topk_ids.flatten()[p], stably; ids outside [0, E) belong to no expert (dropped). The kernels
    give the same offsets, and the same pairs in each expert's segment; in the same (pair) order
    up to ``kernels.triton.routed.SMALL_P`` pairs, in an unspecified order above.

    returns (sorted_pairs [M*k] int32: the first offsets[E] entries are the valid pairs, the
    rest unspecified (here -1), offsets [E+1] int32: expert e's pairs are
    sorted_pairs[offsets[e] : offsets[e+1]])."""
    ids = topk_ids.reshape(-1).long()
    P = ids.numel()
    valid = (ids >= 0) & (ids < num_experts)
    counts = torch.bincount(ids[valid], minlength=num_experts)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = counts.cumsum(0)
    order = torch.sort(torch.where(valid, ids, num_experts), stable=True).indices
    sorted_pairs = torch.full((P,), -1, dtype=torch.int32, device=ids.device)
    n = int(offsets[-1])
    sorted_pairs[:n] = order[:n].to(torch.int32)
    return sorted_pairs, offsets.to(torch.int32)


def routed_experts_ref(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, w2: torch.Tensor,
                       w2_scale: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                       x_scale: torch.Tensor | None = None, y_dtype: torch.dtype | None = None,
                       y_group: int | None = None, compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The routed path's numerics on the kernels' layouts (``densemoe.PreparedWeights``), one
    (token, slot) pair at a time, in ``compute_dtype``:

        v = silu(alpha1[e] * x_scale[m] * w1[e*2I:e*2I+I] @ x[m]) * (... w1[e*2I+I:e*2I+2I] ...)
        y = v rounded as the kernel stores it: y_dtype (bf16), or fp8 in groups of y_group
            columns (scale amax / 448 computed in float32, as the kernel does)
        out[m] = sum_j topk_weights[m, j] * w2_scale[e] * (w2[:, e*I:(e+1)*I] @ y)

    x [M, H] (fp8 with x_scale [M], or bf16), w1 [E*2I, H], alpha1 [E], w2 [H, E*I], w2_scale
    [E], topk_ids / topk_weights [M, k]; slots whose id is outside [0, E) add nothing. Returns
    [M, H] in ``compute_dtype``."""
    M, H = x.shape
    E = alpha1.shape[0]
    I = w1.shape[0] // (2 * E)
    out = torch.zeros((M, H), dtype=compute_dtype, device=x.device)
    xs = x.to(compute_dtype)
    if x_scale is not None:
        xs = xs * x_scale.to(compute_dtype)[:, None]
    for m in range(M):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[m, j])
            if not 0 <= e < E:
                continue
            h = w1[e * 2 * I:(e + 1) * 2 * I].to(compute_dtype) @ xs[m] * alpha1[e].to(compute_dtype)
            v = torch.nn.functional.silu(h[:I]) * h[I:]
            if y_group is not None:
                v32 = v.float()
                yq = torch.empty_like(v32)
                for g0 in range(0, I, y_group):
                    seg = v32[g0:g0 + y_group]
                    sc = _fp8_scale(seg.abs().amax())
                    yq[g0:g0 + y_group] = (seg / sc).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * sc
                v = yq.to(compute_dtype)
            elif y_dtype is not None:
                v = v.to(y_dtype).to(compute_dtype)
            part = w2[:, e * I:(e + 1) * I].to(compute_dtype) @ v
            out[m] += topk_weights[m, j].to(compute_dtype) * w2_scale[e].to(compute_dtype) * part
    return out


def tile_list_ref(offsets: torch.Tensor, block_m: int) -> torch.Tensor:
    """The routed path's tiles of ``block_m`` sorted rows as a list (``densemoe.kernels.triton.
    routed.tile_list_launch``): [tiles, 2] int32 (expert, first row), the experts in order, each
    expert's rows from ``offsets[e]`` in steps of ``block_m``."""
    off = offsets.cpu().tolist()
    rows = [(e, r) for e in range(len(off) - 1) for r in range(off[e], off[e + 1], block_m)]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 2)
