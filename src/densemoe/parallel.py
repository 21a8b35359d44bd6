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

The reduction under the GEMMs (``pieces``): FC1 once, then FC2 by output columns, each
piece's sum issued asynchronously before the next piece's FC2 (w2's rows are read once in all).
Cutting the tokens instead would re-read every weight per piece: at DeepSeek-V3 TP8 four pieces
of M = 1024 take about 4 x 540 us where M = 4096 takes 1260 (the H200 layer benchmark).

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
                    pieces: int = 1, shard: Shard | None = None, simulate_reduce=None) -> torch.Tensor:
    """This rank's share of the routed experts, summed over ``tp_group`` and ``ep_group`` (module
    docstring). ``prepared``: ``prepare_weights`` of ``shard_weights``' share; ``num_experts``:
    the global E (``topk_ids`` are in [0, E)); ``strategy``: forced, or None (the rule, on the
    rank's E / ep experts); returns [M, H] in x's dtype ([M / tp rows] with reduce_scatter).

    ``pieces`` > 1: FC1 once, then FC2 in that many pieces of the output columns (``cuts``), each
    piece's reduction issued asynchronously as soon as its FC2 is issued, so that it runs while
    the next piece's FC2 does (w2's rows are read once over the pieces). Same sums, same result
    up to FC2's own summation order per piece.

    ``shard`` instead of the groups: where this rank sits, with no collective (the rank's
    partial output alone, [M, H]: one rank simulated on one GPU, ``bench/sharded_sim.py``).
    ``simulate_reduce`` (with ``shard``): called with each piece's partial where its reduction
    would be issued, returns an object with ``wait()`` (the benchmark's stand-in for NCCL)."""
    from densemoe.experts import experts_stages
    from densemoe.ops import strategy as rule
    from densemoe.routing import alpha_from_topk
    from densemoe.weights import PreparedWeights

    op = "sharded_experts"
    if not isinstance(prepared, PreparedWeights):
        raise TypeError(f"{op}: prepared must be the PreparedWeights of this rank's share (prepare_weights of "
                        f"shard_weights' output), got {type(prepared).__name__}")
    if not (isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] == prepared.hidden):
        raise ValueError(f"{op}: x must be a [M, H={prepared.hidden}] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if shard is not None and (tp_group is not None or ep_group is not None):
        raise ValueError(f"{op}: give the groups or a shard (a simulated rank, no collective), not both")
    if simulate_reduce is not None and shard is None:
        raise ValueError(f"{op}: simulate_reduce stands in for the collective of a simulated rank (shard=)")
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
    H = x.shape[1]
    spans = cuts(H, pieces, prepared.block or 1)
    M, k = topk_ids.shape
    e0 = shard.ep_rank * e_local
    # the rule sees the rank's experts and about k * (E/ep) / E of a token's picks among them
    k_local = max(1, min(e_local, -(-k // shard.ep_size)))
    how = rule.resolve(op, strategy, None, M, e_local, top_k=k_local)
    n_tp = shard.tp_size if reduce == "reduce_scatter" and not simulated else 1
    out_rows = M if M % n_tp == 0 else M + n_tp - M % n_tp  # padded with zero rows: each rank's slice is whole
    xr = x.float() if reduce_dtype == torch.float32 else x  # a float32 x: the FC2 pieces come back in float32
    cols = None
    if M:
        if how == "routed":  # the other ranks' experts: id -1, dropped
            ids = topk_ids.long()
            ids_local = torch.where((ids >= e0) & (ids < e0 + e_local), ids - e0, -1)
            wl = torch.where(ids_local >= 0, topk_weights.float(), 0.0)
            if k > e_local:  # at most E/ep of a token's k distinct picks are this rank's: keep those slots
                keep = torch.argsort((ids_local < 0).to(torch.int8), dim=1, stable=True)[:, :e_local]
                ids_local, wl = ids_local.gather(1, keep), wl.gather(1, keep)
            cols = experts_stages(xr, prepared, None, expert_ids=ids_local, topk_weights=wl, strategy="routed")
        else:  # alpha of the rank's experts only (no ids: the M = 1 walk would read -1)
            alpha = alpha_from_topk(topk_ids, topk_weights, num_experts)[:, e0:e0 + e_local]
            cols = experts_stages(xr, prepared, alpha, strategy=how, top_k=k_local)

    def partial(h0, h1):  # this rank's [out_rows, h1 - h0] in reduce_dtype, contiguous (what NCCL takes)
        if out_rows == M and cols is not None:
            return cols(h0, h1).to(reduce_dtype).contiguous()
        buf = torch.zeros((out_rows, h1 - h0), dtype=reduce_dtype, device=x.device)
        if cols is not None:
            buf[:M] = cols(h0, h1)
        return buf

    if simulated:
        parts, works = [], []
        for h0, h1 in spans:
            parts.append(partial(h0, h1))
            if simulate_reduce is not None:
                works.append(simulate_reduce(parts[-1]))
        for w in works:
            w.wait()
        return _assemble(parts, spans, M, H, x.dtype)
    groups = [g for g in (ep_group, tp_group if reduce == "all_reduce" else None) if g is not None]
    scatter = tp_group if reduce == "reduce_scatter" else None
    rows = out_rows // n_tp
    flights = [_Flight(partial(h0, h1), groups, scatter, rows) for h0, h1 in spans[:1]]
    for h0, h1 in spans[1:]:
        buf = partial(h0, h1)  # this piece's FC2 is issued before the earlier pieces' next steps
        for f in flights:
            f.advance()
        flights.append(_Flight(buf, groups, scatter, rows))
    parts = [f.result() for f in flights]
    if scatter is None:
        return _assemble(parts, spans, M, H, x.dtype)
    r0 = shard.tp_rank * rows
    return _assemble(parts, spans, max(0, min(rows, M - r0)), H, x.dtype)


def cuts(hidden: int, pieces: int, unit: int = 1, *, where: str = "sharded_experts: pieces") -> list[tuple[int, int]]:
    """``pieces`` column spans [h0, h1) covering [0, hidden), as even as whole ``unit``s allow (the
    weights' scale block for block-scaled fp8); a ValueError naming ``where`` for a count that
    cannot be cut so."""
    if isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 1:
        raise ValueError(f"{where} must be a positive int, got {pieces!r}")
    units = -(-hidden // unit)
    if pieces > units:
        raise ValueError(f"{where}={pieces} is more than the {units} column pieces "
                         f"{f'of {unit} ' if unit > 1 else ''}that H = {hidden} holds")
    bounds = [min(hidden, (units * j // pieces) * unit) for j in range(pieces + 1)]
    return list(zip(bounds, bounds[1:]))


def _reduce_scatter(output, input, group, async_op):
    """torch.distributed's reduce-scatter of one tensor: ``reduce_scatter_single`` where torch has it
    (2.13 deprecates ``reduce_scatter_tensor``), else ``reduce_scatter_tensor`` (2.11)."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=async_op)


class _Flight:
    """One piece's reduction in flight: all-reduces over ``groups`` in turn, then (``scatter``)
    a reduce-scatter of its rows over the tensor-parallel group, each issued asynchronously;
    ``advance`` issues the next step once the current one is done, ``result`` finishes."""

    def __init__(self, buf: torch.Tensor, groups: list, scatter, rows: int):
        self.buf, self.steps, self.work = buf, list(groups) + ([("scatter", scatter)] if scatter is not None else []), None
        self.rows = rows
        self.advance()

    def advance(self) -> None:
        if self.work is not None:
            if not self.steps:
                return
            self.work.wait()  # (NCCL: the current stream waits; no host sync)
            self.work = None
        if not self.steps:
            return
        step = self.steps.pop(0)
        if isinstance(step, tuple):
            mine = torch.empty((self.rows, self.buf.shape[1]), dtype=self.buf.dtype, device=self.buf.device)
            self.work = _reduce_scatter(mine, self.buf, group=step[1], async_op=True)
            self.buf = mine
        else:
            self.work = dist.all_reduce(self.buf, group=step, async_op=True)

    def result(self) -> torch.Tensor:
        while self.steps:
            self.advance()
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.buf


def _assemble(parts: list, spans: list, rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """The pieces' first ``rows`` rows side by side, in ``dtype`` (one pass)."""
    if len(parts) == 1:
        return parts[0][:rows].to(dtype)
    out = torch.empty((rows, hidden), dtype=dtype, device=parts[0].device)
    for part, (h0, h1) in zip(parts, spans):
        out[:, h0:h1] = part[:rows]
    return out
