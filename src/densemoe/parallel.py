"""The MoE layer sharded over GPUs (issue 22): tensor parallel (every expert's intermediate
dimension cut over ``tp_group``), expert parallel (the experts cut over ``ep_group``), or both,
on torch.distributed (NCCL on GPUs, gloo on CPUs).

Semantics: every rank sees all M tokens and the global routing (ids in [0, E)).

    rank (t, p) of tp_group x ep_group holds experts [p*E/ep, (p+1)*E/ep) and, of each, the
    intermediate columns [t*I/tp, (t+1)*I/tp) (gate and up rows of w13, columns of w2)
    partial[m] = sum over the rank's experts e picked by m, weight w:
                 w * w2[e][:, cols] @ (silu(gate[e][cols] x[m]) * up[e][cols] x[m])
    out[m] = sum of partial[m] over every rank of both groups

SwiGLU is elementwise along I, so the cut is exact: only the order of the fp32 sums and, in
fp8, y's quantisation groups (the dense and skipping paths scale y per (token, expert) over the
rank's columns; the routed path per ``fc1_block_i`` columns) differ from the unsharded layer.

The partial outputs are computed and summed in ``reduce_dtype`` (float32 by default: the sum
over ranks is then exact to fp32's order), cast to x's dtype at the end.
``reduce="reduce_scatter"`` returns this rank's slice of the tokens instead (rows
[r*M/n, (r+1)*M/n) of the tp group's n ranks; M padded to a multiple of n inside).

Not here yet: the reduction under the GEMMs. Cutting the tokens into pieces would let each
piece's sum run under the next piece's GEMMs, but every piece reads all the rank's expert
weights again: at DeepSeek-V3 TP8 four pieces of M = 1024 take about 4 x 540 us where M = 4096
takes 1260 (the H200 layer benchmark), so that is slower at every M. The overlap that pays cuts
FC2's output columns (its weights are read once either way): docs/usage.md, "Sharding".

``shard_weights`` cuts checkpoint weights (and their scales) for ``prepare_weights``;
``sharded_experts`` runs a rank's share; ``DenseMoE(..., tp_group=, ep_group=)`` and
``DenseMoE.from_hf(block, dtype, tp_group=, ep_group=)`` use them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from densemoe.kernels.common import I_MULTIPLE

BLOCK = 128  # the block of block-scaled fp8 checkpoints
REDUCES = ("all_reduce", "reduce_scatter")


@dataclasses.dataclass(frozen=True)
class Shard:
    """Where a rank sits: its tensor-parallel and expert-parallel rank and size."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1

    @classmethod
    def of(cls, tp_group=None, ep_group=None) -> "Shard":
        """From process groups (None: not cut that way)."""
        def rs(g, name):
            if g is None:
                return 0, 1
            if not dist.is_initialized():
                raise ValueError(f"{name}: torch.distributed is not initialised (init_process_group first)")
            return dist.get_rank(g), dist.get_world_size(g)
        (tr, ts), (er, es) = rs(tp_group, "tp_group"), rs(ep_group, "ep_group")
        return cls(tr, ts, er, es)


def check_shard(op: str, shard: Shard, num_experts: int, inter: int, block: int = 0) -> None:
    """A ValueError naming what cannot be cut: E by the expert-parallel size, I by the tensor-
    parallel size into slices the kernels take (multiples of 32, of 128 for block scales)."""
    if num_experts % shard.ep_size:
        raise ValueError(f"{op}: E = {num_experts} experts cannot be cut over ep_group's {shard.ep_size} ranks "
                         f"(E must be a multiple of the expert-parallel size)")
    if inter % shard.tp_size:
        raise ValueError(f"{op}: I = {inter} cannot be cut over tp_group's {shard.tp_size} ranks "
                         f"(I must be a multiple of the tensor-parallel size)")
    piece = inter // shard.tp_size
    need = max(I_MULTIPLE, block)
    if piece % need:
        raise ValueError(f"{op}: I / tp = {inter} / {shard.tp_size} = {piece} per rank is not a multiple of {need} "
                         f"({'the 128 x 128 scale blocks' if block else 'the kernels k-tile of FC2'})")


def shard_weights(w13: torch.Tensor, w2: torch.Tensor, *, tp_group=None, ep_group=None,
                  w13_scale=None, w2_scale=None, shard: Shard | None = None):
    """This rank's share of checkpoint weights, for ``prepare_weights``.

    w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I]; scales per tensor, per expert ([E] or
    [E, 1, 1]) or 128 x 128 blocks ([E, 2I/128, H/128], [E, H/128, I/128]). Returns
    (w13 [E/ep, 2I/tp, H], w2 [E/ep, H, I/tp], w13_scale, w2_scale) cut the same way (views where
    the layout allows). ``shard`` instead of the groups: a ``Shard`` given directly."""
    op = "shard_weights"
    shard = shard or Shard.of(tp_group, ep_group)
    for name, t in (("w13", w13), ("w2", w2)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{op}: {name} must be a 3-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    E, two_i, H = w13.shape
    I = two_i // 2
    if two_i % 2 or tuple(w2.shape) != (E, H, I):
        raise ValueError(f"{op}: w13 [E, 2I, H] and w2 [E, H, I] disagree: {tuple(w13.shape)}, {tuple(w2.shape)}")
    blocky = isinstance(w13_scale, torch.Tensor) and w13_scale.dim() == 3 and w13_scale[0].numel() > 1
    check_shard(op, shard, E, I, BLOCK if blocky else 0)
    e0, e1 = shard.ep_rank * E // shard.ep_size, (shard.ep_rank + 1) * E // shard.ep_size
    p = I // shard.tp_size
    c0, c1 = shard.tp_rank * p, (shard.tp_rank + 1) * p
    w13s = torch.cat([w13[e0:e1, c0:c1], w13[e0:e1, I + c0:I + c1]], dim=1) if shard.tp_size > 1 else w13[e0:e1]
    w2s = w2[e0:e1, :, c0:c1]

    def per_expert(s):
        if not isinstance(s, torch.Tensor) or s.numel() == 1:
            return s  # per tensor (or None): the same on every rank
        if s.shape[0] != E:
            raise ValueError(f"{op}: a per-expert scale must have E = {E} entries first, got {tuple(s.shape)}")
        return s[e0:e1]

    if blocky:
        b0, b1 = c0 // BLOCK, c1 // BLOCK
        ib = I // BLOCK
        s13 = w13_scale[e0:e1]
        s13 = torch.cat([s13[:, b0:b1], s13[:, ib + b0:ib + b1]], dim=1) if shard.tp_size > 1 else s13
        return w13s, w2s, s13, w2_scale[e0:e1, :, b0:b1]
    return w13s, w2s, per_expert(w13_scale), per_expert(w2_scale)


def sharded_experts(x: torch.Tensor, prepared, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                    num_experts: int, tp_group=None, ep_group=None, strategy: str | None = None,
                    reduce: str = "all_reduce", reduce_dtype: torch.dtype = torch.float32,
                    shard: Shard | None = None) -> torch.Tensor:
    """This rank's share of the routed experts, summed over ``tp_group`` and ``ep_group`` (module
    docstring). ``prepared``: ``prepare_weights`` of ``shard_weights``' share; ``num_experts``:
    the global E (``topk_ids`` are in [0, E)); ``strategy``: forced, or None (the rule, on the
    rank's E / ep experts); returns [M, H] in x's dtype ([M / tp rows] with reduce_scatter).
    ``shard`` instead of the groups: where this rank sits, with no collective (the rank's
    partial output alone, [M, H]: one rank simulated on one GPU, ``bench/sharded_sim.py``)."""
    from densemoe.experts import experts_forward
    from densemoe.ops import strategy as rule
    from densemoe.routing import alpha_from_topk

    op = "sharded_experts"
    if shard is not None and (tp_group is not None or ep_group is not None):
        raise ValueError(f"{op}: give the groups or a shard (a simulated rank, no collective), not both")
    simulated = shard is not None
    shard = shard or Shard.of(tp_group, ep_group)
    e_local = prepared.num_experts
    if num_experts != e_local * shard.ep_size:
        raise ValueError(f"{op}: num_experts={num_experts} but the prepared weights hold {e_local} experts on each "
                         f"of ep_group's {shard.ep_size} ranks ({e_local * shard.ep_size})")
    if reduce not in REDUCES:
        raise ValueError(f"{op}: reduce must be one of {REDUCES}, got {reduce!r}")
    if reduce_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{op}: reduce_dtype must be float32, bfloat16 or float16, got {reduce_dtype}")
    if not (isinstance(topk_ids, torch.Tensor) and topk_ids.dim() == 2 and topk_ids.shape[0] == x.shape[0]):
        raise ValueError(f"{op}: topk_ids must be [M={x.shape[0]}, k]")
    M, k = topk_ids.shape
    e0 = shard.ep_rank * e_local
    # the rule sees the rank's experts and about k * (E/ep) / E of a token's picks among them
    k_local = max(1, min(e_local, -(-k // shard.ep_size)))
    how = rule.resolve(op, strategy, None, M, e_local, top_k=k_local)
    out_rows = M
    n_tp = shard.tp_size if reduce == "reduce_scatter" else 1
    if n_tp > 1 and M % n_tp:
        out_rows = M + n_tp - M % n_tp  # padded with zero rows: each rank's slice is whole
    partial = torch.zeros((out_rows, x.shape[1]), dtype=reduce_dtype, device=x.device)
    xr = x.float() if reduce_dtype == torch.float32 else x  # a float32 x: experts_forward returns float32
    if M:
        if how == "routed":  # the other ranks' experts: id -1, dropped
            ids = topk_ids.long()
            ids_local = torch.where((ids >= e0) & (ids < e0 + e_local), ids - e0, -1)
            wl = torch.where(ids_local >= 0, topk_weights.float(), 0.0)
            if k > e_local:  # at most E/ep of a token's k distinct picks are this rank's: keep those slots
                keep = torch.argsort((ids_local < 0).to(torch.int8), dim=1, stable=True)[:, :e_local]
                ids_local, wl = ids_local.gather(1, keep), wl.gather(1, keep)
            part = experts_forward(xr, prepared, None, expert_ids=ids_local, topk_weights=wl, strategy="routed")
        else:  # alpha of the rank's experts only (no ids: the M = 1 walk would read -1)
            alpha = alpha_from_topk(topk_ids, topk_weights, num_experts)[:, e0:e0 + e_local]
            part = experts_forward(xr, prepared, alpha, strategy=how, top_k=k_local)
        partial[:M] = part.to(reduce_dtype)
    if simulated:
        return partial[:M].to(x.dtype)
    if reduce == "all_reduce":
        for g in (tp_group, ep_group):
            if g is not None:
                dist.all_reduce(partial, group=g)
        return partial.to(x.dtype)
    if ep_group is not None:
        dist.all_reduce(partial, group=ep_group)
    if tp_group is None:
        return partial[:M].to(x.dtype)
    rows = out_rows // n_tp
    mine = torch.empty((rows, x.shape[1]), dtype=reduce_dtype, device=x.device)
    dist.reduce_scatter_tensor(mine, partial, group=tp_group)
    r0 = shard.tp_rank * rows
    return mine[:max(0, min(rows, M - r0))].to(x.dtype)

