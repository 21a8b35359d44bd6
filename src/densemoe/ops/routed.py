"""The routed experts: each expert's GEMMs on the tokens that picked it, the public op, its
argument checks and its custom ops.

    out[m] = sum_j topk_weights[m, j] * expert_{topk_ids[m, j]}(x[m])
    expert_e(x) = down_e(silu(gate_e x) * up_e x)

Pipeline (four launches up to 1024 pairs, five above; no host sync, buffers sized by M * top_k whatever the routing, so a
CUDA graph replays with any routing; ``densemoe.kernels.triton.routed`` has the semantics):

    fp8:  x8, sx = quantize_per_token(x)                       (unless x_quant is given; up to 1024
          sorted_pairs, offsets = moe_schedule(topk_ids, E)      pairs in the schedule's one launch)
          y8, ys = grouped FC1 (SwiGLU; y quantised per (pair, fc1_block_i columns))
          rows = grouped FC2 (per-step promotion by ys, w2's scale and the routing weight)
          out = combine(rows)                                    each token's k rows, fp32
                (``fused_combine``: in FC2, by the program that lands a token's last pair)
    bf16: the same with x, y in bf16 and no scales.

Which tiles run is ``routed_configs.choose``'s answer; whether a layer call runs this path,
``strategy.pick``'s.

What is not checked (it would need a host sync): the values of ``topk_ids``. An id outside
[0, E) belongs to no expert: its (token, slot) pair is dropped (adds nothing; no memory outside
the tensors is touched). Ids repeated within a row count once per slot.
"""

from __future__ import annotations

import torch

from densemoe.kernels.common import RoutedProblem
from densemoe.kernels.triton import routed as kern
from densemoe.kernels.triton.routed import RoutedConfig
from densemoe.ops import _validate as v
from densemoe.ops import routed_configs
from densemoe.quant import quantize_per_token, quantize_per_token_group
from densemoe.weights import BLOCK, PreparedWeights

OP = routed_configs.OP
FP8 = v.FP8
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@torch.library.custom_op("densemoe::moe_schedule", mutates_args=("sorted_pairs", "offsets"))
def _schedule_op(topk_ids: torch.Tensor, num_experts: int, sorted_pairs: torch.Tensor,
                 offsets: torch.Tensor) -> None:
    kern.schedule_launch(topk_ids, num_experts, sorted_pairs, offsets)


@_schedule_op.register_fake
def _(topk_ids, num_experts, sorted_pairs, offsets):
    return None


def _fc1_stage(x, x_scale, w1, alpha1, topk_ids, cfg: RoutedConfig, w1_block_scale=None):
    """The schedule and grouped FC1: (sorted_pairs, offsets, y [M*k, I], ys or None)."""
    M, k = topk_ids.shape
    P = M * k
    E = alpha1.shape[0]
    I = w1.shape[0] // (2 * E)
    dev = x.device
    sorted_pairs = torch.empty(P, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    group = BLOCK if w1_block_scale is not None else 0
    if w1.dtype == FP8 and x.dtype != FP8 and P <= kern.SMALL_P:  # x quantised in the schedule's one launch
        xq = torch.empty(x.shape, dtype=FP8, device=dev)
        x_scale = torch.empty((M, x.shape[1] // group) if group else (M,), dtype=torch.float32, device=dev)
        kern.quant_schedule_launch(x, xq, x_scale, topk_ids, E, sorted_pairs, offsets, group=group)
        x = xq
    else:
        if w1.dtype == FP8 and x.dtype != FP8:  # above SMALL_P pairs x apart: the fused form's two launches
            # measured slower there on the H100 (Qwen3-30B-A3B M = 2048: docs/routed-journal.md "Seventeenth session")
            x, x_scale = quantize_per_token_group(x, group) if group else quantize_per_token(x)
            x_scale = x_scale.to(torch.float32).contiguous()
        kern.schedule_launch(topk_ids, E, sorted_pairs, offsets)
    if w1.dtype == FP8:
        y = torch.empty((P, I), dtype=FP8, device=dev)
        ys = torch.empty((P, -(-I // cfg.fc1_block_i)), dtype=torch.float32, device=dev)
    else:
        y = torch.empty((P, I), dtype=torch.bfloat16, device=dev)
        ys = None
    if cfg.fc1_cute:  # the CuTe FC1: its tile list, and a sorted copy of x unless it gathers x's rows by TMA
        from densemoe.kernels.cute import routed_fc1_sm90 as cute_fc1

        ccfg = routed_configs.cute_fc1_config(cfg)
        if ccfg.gather:  # x itself (TMA needs 16-byte aligned rows: a view off that takes a copy)
            xs_sorted = x.contiguous() if x.data_ptr() % 16 == 0 else x.clone(memory_format=torch.contiguous_format)
        else:
            xs_sorted = torch.empty((P, x.shape[1]), dtype=x.dtype, device=dev)
            kern.sorted_rows_launch(x, sorted_pairs, offsets, k, xs_sorted)
        tiles = torch.empty((cute_fc1.max_tiles(P, E, ccfg.tile_m), 2), dtype=torch.int32, device=dev)
        count = torch.empty(1, dtype=torch.int32, device=dev)
        kern.tile_list_launch(offsets, E, ccfg.tile_m, tiles, count)
        cute_fc1.routed_fc1_cute(xs_sorted, w1, alpha1, x_scale, sorted_pairs, offsets, tiles, count, y, ys, k, ccfg)
    else:
        kern.fc1_launch(x, w1, alpha1, x_scale, sorted_pairs, offsets, y, ys, k, cfg, w_block_scale=w1_block_scale)
    return sorted_pairs, offsets, y, ys


def _fc2_stage(y, ys, w2, w2_scale, sorted_pairs, offsets, topk_ids, topk_weights, out, cfg: RoutedConfig,
               w2_block_scale=None) -> None:
    """Grouped FC2 and the combine into out [M, N] for w2's N rows (all of H, or a column piece
    of the output: ``RoutedStages``)."""
    M, k = topk_ids.shape
    dev = y.device
    if cfg.fc2_cute and _cute_fc2_takes(cfg, y, ys, w2, w2_scale):  # FC2 on CuTe: each pair's row, then the combine
        from densemoe.kernels.cute import routed_fc2_sm90 as cute_fc2

        E = w2_scale.shape[0]
        P = M * k
        ccfg = routed_configs.cute_fc2_config(cfg)
        tiles = torch.empty((cute_fc2.max_tiles(P, E, ccfg.tile_m), 2), dtype=torch.int32, device=dev)
        count = torch.empty(1, dtype=torch.int32, device=dev)
        kern.tile_list_launch(offsets, E, ccfg.tile_m, tiles, count)
        rows = torch.empty((P, w2.shape[0]), dtype=torch.bfloat16, device=dev)
        cute_fc2.routed_fc2_cute(y, ys, w2, w2_scale, topk_weights.reshape(-1), sorted_pairs, offsets, tiles, count,
                                 rows, ccfg)
        kern.combine_launch(rows, topk_ids, out, E)
    elif cfg.atomic_combine:  # the pairs add into fp32 token rows; one cast to out's dtype
        acc = torch.zeros((M, w2.shape[0]), dtype=torch.float32, device=dev)
        kern.fc2_launch(y, ys, w2, w2_scale, sorted_pairs, offsets, topk_weights, acc, cfg.fc1_block_i, cfg, k,
                        w_block_scale=w2_block_scale)
        out.copy_(acc)
    else:  # each pair's row, then each token's k rows summed in slot order (deterministic)
        rows = torch.empty((M * k, w2.shape[0]), dtype=torch.bfloat16, device=dev)
        kern.fc2_launch(y, ys, w2, w2_scale, sorted_pairs, offsets, topk_weights, rows, cfg.fc1_block_i, cfg, k,
                        w_block_scale=w2_block_scale, topk_ids=topk_ids, out=out)
        if not cfg.fused_combine:  # (fused: FC2's last pair of each token summed its rows into out)
            kern.combine_launch(rows, topk_ids, out, w2_scale.shape[0])


def _cute_fc2_takes(cfg, y, ys, w2, w2_scale) -> bool:
    """Whether the CuTe FC2 takes this piece of w2 (``RoutedStages`` runs column pieces of H;
    a piece its tile of H does not divide runs on the Triton FC2)."""
    from densemoe.kernels.cute import routed_fc2_sm90 as cute_fc2

    group = y.shape[1] // ys.shape[1] if ys is not None else cfg.fc2_block_k
    return cute_fc2.can_implement(w2.shape[0], w2_scale.shape[0], y.shape[1], y.dtype, group,
                                  routed_configs.cute_fc2_config(cfg), y.shape[0])[0]


@torch.library.custom_op("densemoe::routed_experts", mutates_args=("out",))
def _routed_op(x: torch.Tensor, x_scale: torch.Tensor | None, w1: torch.Tensor, alpha1: torch.Tensor,
               w2: torch.Tensor, w2_scale: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               out: torch.Tensor, config: str, w1_block_scale: torch.Tensor | None = None,
               w2_block_scale: torch.Tensor | None = None) -> None:
    k = topk_ids.shape[1]
    block = BLOCK if w1_block_scale is not None else 0
    cfg = (RoutedConfig.from_str(config) if config else
           routed_configs.choose(_problem(x, w1, alpha1, k, out.dtype, block), x.device).config)
    sorted_pairs, offsets, y, ys = _fc1_stage(x, x_scale, w1, alpha1, topk_ids, cfg, w1_block_scale)
    _fc2_stage(y, ys, w2, w2_scale, sorted_pairs, offsets, topk_ids, topk_weights, out, cfg, w2_block_scale)


@_routed_op.register_fake
def _(x, x_scale, w1, alpha1, w2, w2_scale, topk_ids, topk_weights, out, config, w1_block_scale=None,
      w2_block_scale=None):
    return None


def _check_topk(op: str, topk_ids, topk_weights, M: int, E: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    v.tensor(op, "topk_ids", topk_ids, 2)
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise TypeError(f"{op}: topk_ids must have an integer dtype, got {topk_ids.dtype}")
    if topk_ids.shape[0] != M:
        raise ValueError(f"{op}: topk_ids must be [M={M}, k], got {tuple(topk_ids.shape)}")
    k = topk_ids.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"{op}: topk_ids has k={k} slots per token; k must be in [1, E={E}]")
    v.tensor(op, "topk_weights", topk_weights, 2)
    if not topk_weights.is_floating_point():
        raise TypeError(f"{op}: topk_weights must have a floating dtype, got {topk_weights.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"{op}: topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}; all must be on one device")
    return topk_ids.contiguous(), topk_weights.to(torch.float32).contiguous()


def _problem(x, w1, alpha1, top_k: int, out_dtype, block: int = 0) -> RoutedProblem:
    E = alpha1.shape[0]
    return RoutedProblem(x.shape[0], x.shape[1], E, w1.shape[0] // (2 * E), top_k, w1.dtype, out_dtype, block)


def problem_of(x: torch.Tensor, prepared: PreparedWeights, top_k: int) -> RoutedProblem:
    out_dtype = x.dtype if x.dtype in _OUT_DTYPES else torch.bfloat16
    return RoutedProblem(x.shape[0], prepared.hidden, prepared.num_experts, prepared.inter, top_k,
                         prepared.dtype, out_dtype, prepared.block)


def which_config(x: torch.Tensor, prepared: PreparedWeights, top_k: int, config: RoutedConfig | None = None,
                 with_source: bool = False):
    """``routed_configs.choose`` for this call: the config, with ``with_source`` also where it
    came from ("pinned", "cache", "shipped", "heuristic")."""
    ch = routed_configs.choose(problem_of(x, prepared, top_k), x.device, config=config)
    return (ch.config, ch.source) if with_source else ch.config


def routed_experts(x: torch.Tensor, prepared: PreparedWeights, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor, *, config: RoutedConfig | None = None,
                   x_quant: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The routed experts (module docstring): out [M, H] = sum_j topk_weights[m, j] *
    expert_{topk_ids[m, j]}(x[m]).

    Args:
        x:        [M, H] floating (bf16 / fp16 / fp32, or fp8 with ``x_quant``): the tokens.
        prepared: ``densemoe.prepare_weights(w13, w2)`` (fp8 or bf16 kernels).
        topk_ids: [M, k] integer: the experts each token picked (values in [0, E), see the module
                  docstring for what happens to others).
        topk_weights: [M, k] floating (used as float32): their routing weights.
        config:   a ``RoutedConfig`` to pin (default: ``routed_configs.choose``).
        x_quant:  (x8 [M, H] fp8, sx [M]) = ``quantize_per_token(x)`` already computed; fp8 only.

    Returns [M, H] in x's dtype (bf16 for fp8 x). Bad input raises TypeError / ValueError
    naming the argument.
    """
    return RoutedStages(x, prepared, topk_ids, topk_weights, config=config, x_quant=x_quant)()


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in _OUT_DTYPES else torch.bfloat16


def _inputs(x, prepared, topk_ids, topk_weights, config, x_quant):
    """``routed_experts``' checks; (x, its scales, topk_ids, float32 topk_weights) as the op takes
    them: x8 and its scales, or for fp8 weights without ``x_quant`` x itself and None (the
    schedule's launch quantises it), or bf16 x and None (x None for M = 0)."""
    if not isinstance(prepared, PreparedWeights):
        raise TypeError(f"{OP}: prepared must be the PreparedWeights that densemoe.prepare_weights(w13, w2) "
                        f"returns, got {type(prepared).__name__}")
    H, E = prepared.hidden, prepared.num_experts
    v.tensor(OP, "x", x, 2)
    if x.shape[1] != H:
        raise ValueError(f"{OP}: x must be [M, H={H}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{OP}: x must have a floating dtype, got {x.dtype}")
    v.inference_only(OP, x=x, topk_weights=topk_weights)
    M = x.shape[0]
    dev = v.same_device(OP, x=x, weights=prepared.w1)
    v.device_supports(OP, dev, prepared.dtype)
    topk_ids, topk_weights = _check_topk(OP, topk_ids, topk_weights, M, E, dev)
    k = topk_ids.shape[1]
    if config is not None:  # checked here; unpinned calls choose inside the op (a file read)
        routed_configs.choose(problem_of(x, prepared, k), dev, config=config)
    if M == 0:
        return None, None, topk_ids, topk_weights
    if prepared.block:  # block-scaled weights: x in 1 x 128 groups (DeepSeek-V3's activations)
        if x_quant is not None:
            xq, sx = x_quant
            if xq.shape != x.shape or xq.dtype != FP8 or tuple(sx.shape) != (M, H // prepared.block):
                raise ValueError(f"{OP}: with block-scaled weights x_quant must be (x8 [M, H] fp8, sx [M, H/"
                                 f"{prepared.block}]) = quantize_per_token_group(x), got {tuple(xq.shape)} {xq.dtype}, "
                                 f"{tuple(sx.shape)}")
            sx = sx.to(torch.float32).contiguous()
        else:
            if x.dtype == FP8:
                raise ValueError(f"{OP}: an fp8 x needs its group scales: pass x_quant=(x8, sx)")
            if x.dtype in _OUT_DTYPES and prepared.block == BLOCK:
                xq, sx = x, None  # quantised by the schedule's launch (``_fc1_stage``)
            else:
                xq, sx = quantize_per_token_group(x, prepared.block)
                sx = sx.to(torch.float32).contiguous()
    elif prepared.dtype == FP8:
        if x_quant is not None:
            xq, sx = x_quant
            if xq.shape != x.shape or xq.dtype != FP8 or tuple(sx.shape) != (M,):
                raise ValueError(f"{OP}: x_quant must be (x8 [M, H] fp8, sx [M]) for x {tuple(x.shape)}, got "
                                 f"{tuple(xq.shape)} {xq.dtype}, {tuple(sx.shape)}")
            sx = sx.to(torch.float32).contiguous()
        else:
            if x.dtype == FP8:
                raise ValueError(f"{OP}: an fp8 x needs its per-token scales: pass x_quant=(x8, sx)")
            if x.dtype in _OUT_DTYPES:
                xq, sx = x, None  # quantised by the schedule's launch (``_fc1_stage``)
            else:
                xq, sx = quantize_per_token(x)
    else:
        if x_quant is not None:
            raise ValueError(f"{OP}: x_quant is for fp8 weights; these are {prepared.dtype}")
        xq, sx = x.to(torch.bfloat16).contiguous(), None
    return xq.contiguous(), sx, topk_ids, topk_weights




class RoutedStages:
    """A routed call that can run FC2 by output columns: the inputs are checked and quantised at
    construction; a call returns output columns [h0, h1). The whole output runs as
    ``routed_experts`` does (one custom op: what torch.compile sees). A piece runs the schedule
    and FC1 at the first piece, then FC2 and the combine for w2's rows h0..h1 only (a view: the
    weights are read once over all pieces); ``densemoe.parallel`` reduces each piece while the
    next one's FC2 runs."""

    def __init__(self, x, prepared: PreparedWeights, topk_ids, topk_weights, *, config: RoutedConfig | None = None,
                 x_quant=None):
        self._xq, self._sx, self._ids, self._wts = _inputs(x, prepared, topk_ids, topk_weights, config, x_quant)
        self._p, self._x, self._config = prepared, x, config
        self._out_dtype, self._m = _out_dtype(x), x.shape[0]
        self.hidden, self.unit = prepared.hidden, prepared.block or 1
        self._fc1 = None

    def __call__(self, h0: int = 0, h1: int | None = None) -> torch.Tensor:
        """Output columns [h0, h1) (multiples of ``unit``: 128 for block-scaled weights), [M, h1 - h0]."""
        h1 = self.hidden if h1 is None else h1
        check_columns(OP, h0, h1, self.hidden, self.unit)
        p = self._p
        out = torch.empty((self._m, h1 - h0), dtype=self._out_dtype, device=p.w1.device)
        if self._xq is None or h1 == h0:
            return out
        if (h0, h1) == (0, self.hidden) and self._fc1 is None:
            _routed_op(self._xq, self._sx, p.w1, p.alpha1, p.w2, p.w2_scale, self._ids, self._wts, out,
                       self._config.to_str() if self._config is not None else "", p.w1_block_scale, p.w2_block_scale)
            return out
        if self._fc1 is None:
            cfg = self._config or routed_configs.choose(problem_of(self._x, p, self._ids.shape[1]), self._xq.device).config
            self._fc1 = cfg, _fc1_stage(self._xq, self._sx, p.w1, p.alpha1, self._ids, cfg, p.w1_block_scale)
        cfg, (sorted_pairs, offsets, y, ys) = self._fc1
        b = p.block
        _fc2_stage(y, ys, p.w2[h0:h1], p.w2_scale, sorted_pairs, offsets, self._ids, self._wts, out, cfg,
                   p.w2_block_scale[h0 // b:h1 // b] if b else None)
        return out


def check_columns(op: str, h0, h1, hidden: int, unit: int) -> None:
    """A ValueError unless 0 <= h0 <= h1 <= hidden are ints on multiples of ``unit`` (or h1 = hidden)."""
    ok = all(isinstance(h, int) and not isinstance(h, bool) for h in (h0, h1)) and 0 <= h0 <= h1 <= hidden
    if not ok or h0 % unit or (h1 % unit and h1 != hidden):
        raise ValueError(f"{op}: output columns [h0, h1) = [{h0!r}, {h1!r}) must satisfy 0 <= h0 <= h1 <= H = {hidden}"
                         + (f" on multiples of {unit} (the weights' scale blocks)" if unit > 1 else ""))


def moe_schedule(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs p = m*k + j grouped by expert (in pair order within an expert up to
    ``SMALL_P`` = 1024 pairs, in an unspecified order above), in one or two launches:
    (sorted_pairs [M*k] int32, offsets [E+1] int32), expert e's pairs being
    sorted_pairs[offsets[e]:offsets[e+1]] (``reference.moe_schedule_ref`` is the twin; entries
    from offsets[E] on are unspecified: pairs whose id is outside [0, E) are left out)."""
    op = "densemoe.moe_schedule"
    v.tensor(op, "topk_ids", topk_ids, 2)
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise TypeError(f"{op}: topk_ids must have an integer dtype, got {topk_ids.dtype}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{op}: num_experts must be a positive int, got {num_experts!r}")
    dev = v.same_device(op, topk_ids=topk_ids)
    sorted_pairs = torch.empty(topk_ids.numel(), dtype=torch.int32, device=dev)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    _schedule_op(topk_ids.contiguous(), num_experts, sorted_pairs, offsets)
    return sorted_pairs, offsets
