"""What the tuner needs to know about each tunable op, in one place per op.

A ``TunedOp`` says how to build the op's problem for a model shape and token count, list its
search space, make inputs, run one config, compute the reference, and what the heuristic picks.
The tuner, the precompiler and the CLI work through these only, so a new op (or backend) is one
more entry in ``OPS``: "fc2", "fc1" and "routed" (``densemoe.ops.routed``, the grouped GEMMs).

The strategy crossovers (which of skip / dense / routed a layer call runs) are not a ``TunedOp``
(nothing to configure, three pipelines to compare); their inputs are here
(``strategy_inputs``, ``run_strategy``), their timing in ``tuner.tune_strategy``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import torch

from densemoe.experts import experts_forward
from densemoe.kernels.common import Fc1Problem, Fc2Problem, RoutedProblem
from densemoe.kernels.cute import fc1_sm90 as cute_fc1
from densemoe.kernels.cute import fc2_sm90 as cute_fc2
from densemoe.ops import fc1_configs, fc2_configs, routed_configs
from densemoe.ops import strategy as strategy_rule
from densemoe.ops.fc1 import fc1
from densemoe.ops.fc2 import fc2
from densemoe.ops.routed import routed_experts
from densemoe.quant import quantize_per_token, quantize_per_token_group
from densemoe.reference import fc1_ref, fc2_ref
from densemoe.tuning.space import fc1_space, fc2_space, routed_space
from densemoe.weights import PreparedWeights

FP8 = torch.float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class TunedOp:
    name: str
    problem: Callable      # (m, shape: MoEShape-like with hidden/experts/inter, dtype, out_dtype) -> problem
    space: Callable        # (problem, backends, num_sms) -> [config]
    make_inputs: Callable  # (problem, device, seed, shared or None) -> (inputs tuple, shared)
    make_out: Callable     # (problem, device) -> out tensor
    run: Callable          # (inputs, out, config) -> None (it wrote out) or the output it made
    reference: Callable    # (inputs, config) -> fp32 reference of the output
    heuristic: Callable    # (problem, inputs, out) -> config
    parse: Callable        # a tuned entry's config string -> config
    fits: dict             # backend name -> (problem, config) -> (ok, why): the ops' validity functions
    # config -> what of it the reference depends on (the routed path's y groups, its combine);
    # the tuner computes one reference per distinct value. None: the same for every config.
    ref_key: Callable = lambda config: None


# ------------------------------------------------------------------------------------------ fc2

def make_inputs(problem: Fc2Problem, device, seed: int = 0, topk: int = 8, w: torch.Tensor | None = None):
    """Fresh random a [M, K], w [N, K] (unless given), alpha [M, E] with ``topk`` experts per token."""
    p = problem
    gen = torch.Generator(device=device).manual_seed(seed)
    a = torch.randn(p.m, p.k, generator=gen, device=device).to(p.dtype)
    if w is None:
        w = (torch.randn(p.n, p.k, generator=gen, device=device) * 0.5).to(p.dtype)
    k = min(topk, p.e)
    ids = torch.rand(p.m, p.e, generator=gen, device=device).topk(k, dim=1).indices
    wts = torch.softmax(torch.randn(p.m, k, generator=gen, device=device), dim=1)
    alpha = torch.zeros(p.m, p.e, device=device).scatter_(1, ids, wts)
    return a, w, alpha


def _fc2_inputs(p, device, seed, shared):
    a, w, alpha = make_inputs(p, device, seed=seed, w=shared)
    return (a, w, alpha), w


def _fc2_run(inputs, out, cfg):
    a, w, alpha = inputs
    fc2(a, w, alpha, out=out, config=cfg, skip=False)


def _fc2_ref(inputs, config=None):
    a, w, alpha = inputs
    return fc2_ref(a, w, alpha, torch.float32, compute_dtype=torch.float32)


def _fc2_heuristic(p, inputs, out):
    a, w, alpha = inputs
    return fc2_configs.choose(p, a.device, tuned=False,
                              cute_check=lambda: cute_fc2.runtime_ok(a, w, alpha, out)).config


FC2 = TunedOp(
    "fc2",
    problem=lambda m, s, dtype, out_dtype: Fc2Problem(m, s.hidden, s.experts, s.inter, dtype, out_dtype),
    space=fc2_space,
    make_inputs=_fc2_inputs,
    make_out=lambda p, device: torch.empty(p.m, p.n, dtype=p.out_dtype, device=device),
    run=_fc2_run, reference=_fc2_ref, heuristic=_fc2_heuristic,
    parse=fc2_configs.parse_config, fits=fc2_configs.FITS)


# ------------------------------------------------------------------------------------------ fc1

def _fc1_inputs(p, device, seed, shared):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(p.m, p.h, generator=gen, device=device)
    xs = None
    if p.dtype == torch.float8_e4m3fn:
        x, xs = quantize_per_token(x)
    else:
        x = x.to(p.dtype)
    if shared is None:
        w1 = (torch.randn(p.n, p.h, generator=gen, device=device) * (448 / 4 if p.dtype == torch.float8_e4m3fn else 1)
              ).clamp(-448, 448).to(p.dtype)
        alpha1 = (torch.rand(p.e, generator=gen, device=device) + 0.5) * (4 / 448 if p.dtype == torch.float8_e4m3fn
                                                                         else 1) * p.h ** -0.5
        shared = (w1, alpha1)
    w1, alpha1 = shared
    return (x, w1, alpha1, xs), shared


def _fc1_run(inputs, out, cfg):
    x, w1, alpha1, xs = inputs
    fc1(x, w1, alpha1, x_scale=xs, out=out, config=cfg)


def _fc1_ref(inputs, config=None):
    x, w1, alpha1, xs = inputs
    return fc1_ref(x, w1, alpha1, x_scale=xs, out_dtype=torch.float32, compute_dtype=torch.float32)


def _fc1_heuristic(p, inputs, out):
    x, w1, alpha1, xs = inputs
    return fc1_configs.choose(p, x.device, tuned=False,
                              cute_check=lambda: cute_fc1.runtime_ok(x, w1, alpha1, out, x_scale=xs)).config


FC1 = TunedOp(
    "fc1",
    problem=lambda m, s, dtype, out_dtype: Fc1Problem(m, s.hidden, s.experts, s.inter, dtype, out_dtype),
    space=fc1_space,
    make_inputs=_fc1_inputs,
    make_out=lambda p, device: torch.empty(p.m, p.e * p.i, dtype=p.out_dtype, device=device),
    run=_fc1_run, reference=_fc1_ref, heuristic=_fc1_heuristic,
    parse=fc1_configs.parse_config, fits=fc1_configs.FITS)

# ------------------------------------------------------------------------------------------ routed

class RoutedInputs(NamedTuple):
    """A routed call's arguments: x [M, H] (bf16, the layer's activations), the experts, the
    router's top-k ids [M, k] (int64, distinct per row) and weights [M, k] (float32), and for fp8
    ``quantize_per_token(x)`` (the layer's router kernel hands it over at small M; the tuner
    passes it so that only the routed kernels are timed)."""

    x: torch.Tensor
    prepared: PreparedWeights
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    x_quant: tuple | None


def routed_weights(p, device, gen: torch.Generator) -> PreparedWeights:
    """Random experts of ``p``'s shape in the kernels' layout at ``p.dtype`` (never zeros):
    w1 [E*2I, H] and w2 [H, E*I] drawn from randn (fp8: times 448/4, clamped, so e4m3's range is
    used), per-expert scales alpha1, w2_scale in [0.5, 1.5) / sqrt(fan-in) (fp8: times 4/448),
    so every stage's values stay near 1. With ``p.block`` (128 x 128 block-scaled fp8): a scale
    per block in [1, 20) / sqrt(fan-in) times 4/448 instead, alpha1 and w2_scale ones."""
    big = 448 / 4 if p.dtype == FP8 else 1.0

    def weights(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen, device=device) * big).clamp_(-448, 448).to(p.dtype)

    w1 = weights(p.e * 2 * p.i, p.h)
    w2 = weights(p.h, p.e * p.i)
    if getattr(p, "block", 0):  # block-scaled: a scale per block, spread over 20x as in checkpoints
        b = p.block
        ones = torch.ones(p.e, device=device)

        def scales(rows: int, cols: int, fan_in: int) -> torch.Tensor:
            return (torch.rand(rows // b, cols // b, generator=gen, device=device) * 19 + 1) * fan_in ** -0.5 / big

        return PreparedWeights(w1, ones, w2, ones, w1_block_scale=scales(p.e * 2 * p.i, p.h, p.h),
                               w2_block_scale=scales(p.h, p.e * p.i, p.i))
    alpha1 = (torch.rand(p.e, generator=gen, device=device) + 0.5) / big * p.h ** -0.5
    w2_scale = (torch.rand(p.e, generator=gen, device=device) + 0.5) / big * p.i ** -0.5
    return PreparedWeights(w1, alpha1, w2, w2_scale)


def typical_draw(draw, topk_ids_of, want: float, draws: int = 32) -> tuple[object, int]:
    """(sample, the draws it took): the first of up to ``draws`` calls of ``draw()`` whose routing
    (``topk_ids_of(sample)``) picks ``want`` distinct experts, within one, else the closest. One
    draw's picked experts vary by a few percent, and the weight bytes with them: comparing single
    draws compares routings, not kernels (docs/routed.md, "Routing draws")."""
    best = None
    for i in range(1, draws + 1):
        sample = draw()
        got = int(topk_ids_of(sample).unique().numel())
        if best is None or abs(got - want) < abs(best[1] - want):
            best = (sample, got, i)
        if abs(got - want) <= 1:
            break
    return best[0], best[2]


def routed_topk(m: int, e: int, top_k: int, device, gen: torch.Generator,
                draws: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random routing: ids [m, top_k] int64, distinct per row (the top-k of random
    scores, as a router gives), weights [m, top_k] float32 (a softmax of random logits). A
    typical draw (``typical_draw``): as many distinct experts as expected
    (``strategy.expected_picked``), within one."""
    ids, _ = typical_draw(lambda: torch.rand(m, e, generator=gen, device=device).topk(top_k, dim=1).indices,
                          lambda ids: ids, strategy_rule.expected_picked(m, e, top_k), draws)
    weights = torch.softmax(torch.randn(m, top_k, generator=gen, device=device), dim=1)
    return ids, weights


def _x_dtype(p) -> torch.dtype:
    return p.out_dtype if p.out_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16


def make_routed_inputs(problem: RoutedProblem, device, seed: int = 0,
                       prepared: PreparedWeights | None = None) -> RoutedInputs:
    """Fresh random inputs of a routed call (``RoutedInputs``); the experts too unless given."""
    p = problem
    gen = torch.Generator(device=device).manual_seed(seed)
    if prepared is None:
        prepared = routed_weights(p, device, gen)
    x = torch.randn(p.m, p.h, generator=gen, device=device).to(_x_dtype(p))
    ids, weights = routed_topk(p.m, p.e, p.top_k, device, gen)
    if getattr(p, "block", 0):
        xq = quantize_per_token_group(x, p.block)
    else:
        xq = quantize_per_token(x) if p.dtype == FP8 else None
    return RoutedInputs(x, prepared, ids, weights, xq)


def _routed_inputs(p, device, seed, shared):
    inputs = make_routed_inputs(p, device, seed, shared)
    return inputs, inputs.prepared


def _routed_run(inputs: RoutedInputs, out, cfg):
    return routed_experts(inputs.x, inputs.prepared, inputs.topk_ids, inputs.topk_weights, config=cfg,
                          x_quant=inputs.x_quant)


def routed_reference(inputs: RoutedInputs, config=None) -> torch.Tensor:
    """The routed experts in float32, one batched product per expert (fast enough for the
    tuner's shapes on a GPU). With a ``RoutedConfig``: rounded where the kernels round (y in
    bf16, or fp8 with one scale per ``config.fc1_block_i`` columns; each pair's row in bf16
    unless ``config.atomic_combine``), so that a correct config lands well within the tuner's
    TOL whatever its groups. Without: the exact math, no intermediate rounding (the check of the
    strategies, which round differently). Block-scaled weights are dequantised block by block,
    x quantised in 1 x 128 groups as the op does."""
    x, pw, ids, tw, xq = inputs
    M, H = x.shape
    E, I = pw.num_experts, pw.inter
    k = ids.shape[1]
    blk = pw.block
    if xq is not None and blk:  # x in 1 x blk groups
        xs = (xq[0].float().view(M, -1, blk) * xq[1].float()[:, :, None]).view(M, H)
    elif blk:
        x8, sx = quantize_per_token_group(x, blk)
        xs = (x8.float().view(M, -1, blk) * sx.float()[:, :, None]).view(M, H)
    elif xq is not None:
        xs = xq[0].float() * xq[1].float()[:, None]
    elif pw.dtype == FP8:
        x8, sx = quantize_per_token(x)
        xs = x8.float() * sx.float()[:, None]
    else:
        xs = x.to(torch.bfloat16).float()
    flat = ids.reshape(-1).long()
    tok = torch.arange(M * k, device=x.device) // k
    wflat = tw.reshape(-1).float()
    valid = (flat >= 0) & (flat < E)
    order = torch.argsort(torch.where(valid, flat, E), stable=True)
    counts = torch.bincount(flat[valid], minlength=E).tolist()
    out = torch.zeros(M, H, dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if not n:
            continue
        pairs = order[start:start + n]
        start += n
        rows = tok[pairs]
        w1e = pw.w1[e * 2 * I:(e + 1) * 2 * I].float()
        w2e = pw.w2[:, e * I:(e + 1) * I].float()
        if blk:  # dequantised block by block
            w1e = w1e * pw.w1_block_scale[e * 2 * I // blk:(e + 1) * 2 * I // blk].repeat_interleave(
                blk, 0).repeat_interleave(blk, 1)
            w2e = w2e * pw.w2_block_scale[:, e * I // blk:(e + 1) * I // blk].repeat_interleave(
                blk, 0).repeat_interleave(blk, 1)
        h = (xs[rows] @ w1e.T) * pw.alpha1[e].float()
        v = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        if config is not None and pw.dtype == FP8:
            q = config.fc1_block_i
            g = -(-I // q)
            vp = torch.nn.functional.pad(v, (0, g * q - I)).view(n, g, q)
            amax = vp.abs().amax(dim=2, keepdim=True)
            sc = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
            v = ((vp / sc).clamp(-448.0, 448.0).to(FP8).float() * sc).view(n, g * q)[:, :I]
        elif config is not None:
            v = v.to(torch.bfloat16).float()
        part = (v @ w2e.T) * (pw.w2_scale[e].float() * wflat[pairs])[:, None]
        if config is not None and not config.atomic_combine:
            part = part.to(torch.bfloat16).float()
        out.index_add_(0, rows, part)
    return out


def _routed_heuristic(p, inputs, out):
    return routed_configs.choose(p, inputs.x.device, tuned=False).config


ROUTED = TunedOp(
    "routed",
    problem=lambda m, s, dtype, out_dtype: RoutedProblem(m, s.hidden, s.experts, s.inter, s.topk, dtype, out_dtype),
    space=routed_space,
    make_inputs=_routed_inputs,
    make_out=lambda p, device: torch.empty(p.m, p.h, dtype=p.out_dtype, device=device),
    run=_routed_run, reference=routed_reference, heuristic=_routed_heuristic,
    parse=routed_configs.parse_config, fits=routed_configs.FITS,
    ref_key=lambda cfg: (cfg.fc1_block_i, cfg.atomic_combine))

OPS = {"fc2": FC2, "fc1": FC1, "routed": ROUTED}


def op_of(problem) -> TunedOp:
    """The op a problem belongs to (by its class)."""
    if isinstance(problem, RoutedProblem):
        return ROUTED
    return FC1 if isinstance(problem, Fc1Problem) else FC2


# ------------------------------------------------------------------------------------------ strategies

class StrategyInputs(NamedTuple):
    """A layer call's experts arguments: a routed call's (``RoutedInputs``) and alpha [M, E]
    (the top-k weights scattered: what ``experts_forward`` takes beside the ids)."""

    routed: RoutedInputs
    alpha: torch.Tensor


def strategy_inputs(problem: RoutedProblem, device, seed: int = 0,
                    prepared: PreparedWeights | None = None) -> StrategyInputs:
    """Fresh random inputs for timing the strategies on ``problem`` (x in ``out_dtype``; the
    quantisation of x is left to each strategy, as in a layer call above M = 4)."""
    r = make_routed_inputs(problem, device, seed, prepared)._replace(x_quant=None)
    alpha = torch.zeros(problem.m, problem.e, device=device).scatter_(1, r.topk_ids, r.topk_weights)
    return StrategyInputs(r, alpha)


def run_strategy(inputs: StrategyInputs, strategy: str) -> torch.Tensor:
    """``experts_forward`` forced to ``strategy``, with what ``DenseMoE`` passes it (the top-k
    ids and weights beside alpha)."""
    r = inputs.routed
    return experts_forward(r.x, r.prepared, inputs.alpha, strategy=strategy, expert_ids=r.topk_ids,
                           topk_weights=r.topk_weights)
