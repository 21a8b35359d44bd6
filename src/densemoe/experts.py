"""The experts of an MoE layer on densemoe's kernels, for a given alpha [M, E] (and the router's
top-k ids), with no host sync anywhere. Three strategies, one math (``ops/strategy.py`` picks):
"skip" and "dense" run FC1 (SwiGLU fused) -> FC2 below; "routed" runs ``ops.routed``.

    fp8:  x8, sx = quantize_per_token(x)                     # [M, H] fp8, [M]
          y = fc1(x8, w1, alpha1, x_scale=sx, routing=alpha)  # [M, E*I] bf16, SwiGLU fused
          y8, alpha2 = quantize_y_fold_alpha(y, alpha, w2_scale)
              # one kernel; reads y only where alpha != 0, writes zeros elsewhere
          (where ``strategy.quantize_y_in_fc1(I)``: y8, s_y = fc1_fp8_dynamic(...) quantises in
           FC1's epilogue and alpha2 = alpha * s_y * w2_scale)
          out = fc2(y8, w2, alpha2)                          # [M, H] bf16
    bf16: out = fc2(fc1(x, w1, alpha1, routing=alpha), w2, alpha * w2_scale)
          (with skipping: fc2(..., alpha, w_scale=w2_scale))

Expert skipping (``skip``; the strategy module's rule by default): FC1 and FC2 each list, on the
GPU, the experts each token tile picked and read only those weights; for one token the caller
may hand them the router's top-k ids as that list (``expert_ids``).
"""

from __future__ import annotations

import torch

from densemoe.ops import _validate as v
from densemoe.ops import strategy as rule
from densemoe.ops.fc1 import fc1, fc1_fp8_dynamic
from densemoe.ops.fc2 import fc2
from densemoe.ops.routed import RoutedStages, check_columns, problem_of
from densemoe.routing import alpha_from_topk
from densemoe.quant import FP8, quantize_per_token, quantize_per_token_group, quantize_y_fold_alpha
from densemoe.weights import PreparedWeights

OP = "experts_forward"


def experts_forward(x: torch.Tensor, prepared: PreparedWeights, alpha: torch.Tensor | None, *,
                    skip: bool | None = None, top_k: int | None = None,
                    x_quant: tuple[torch.Tensor, torch.Tensor] | None = None,
                    expert_ids: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
                    strategy: str | None = None) -> torch.Tensor:
    """out [M, H] = sum_e alpha[m, e] * expert_e(x[m]) with expert_e = down(silu(gate x) * up x).

    Args:
        x:        [M, H] bf16 / fp16 / fp32 (any floating dtype): the tokens.
        prepared: ``PreparedWeights`` from ``densemoe.prepare_weights`` (fp8 or bf16 kernels).
        alpha:    [M, E] floating (used as float32): the routing weight of expert e for token m,
                  0 where m did not pick e (``densemoe.routing.alpha_from_topk`` builds it); or
                  None with ``expert_ids`` [M, k] and ``topk_weights`` (built here only if the
                  strategy is not "routed").
        strategy: "skip", "dense", "routed", or None (default): ``strategy.pick``'s rule for
                  this M, E and top-k (a measured choice where the tuner recorded one). "routed"
                  needs ``expert_ids`` [M, k]; without them the rule picks between the other two.
        skip:     the older switch: True is strategy="skip", False strategy="dense".
        top_k:    the routing's top-k, for the rule (default: expert_ids' k if [M, k], else 8);
                  a top_k that disagrees with [M, k] expert_ids is a ValueError.
        x_quant:  (x8, sx) = ``quantize_per_token(x)`` already computed (``DenseMoE`` gets it from
                  the router's fused kernel); fp8 weights only.
        expert_ids: [k] or [M, k] integer: the experts the tokens picked (``DenseMoE`` passes its
                  router's top-k ids, distinct per row, in [0, E); alpha must be 0 outside them).
                  The routed strategy runs on them; at M = 1 skipping walks them instead of
                  listing the experts from alpha; the dense strategy ignores them.
        topk_weights: [M, k] floating: the routing weights of expert_ids (the routed strategy;
                  default ``alpha.gather(1, expert_ids)``).

    Returns [M, H] in x's dtype (bf16 for an fp8 x). Bad input raises TypeError / ValueError
    naming the argument.
    """
    return _stages(OP, x, prepared, alpha, skip=skip, top_k=top_k, x_quant=x_quant, expert_ids=expert_ids,
                   topk_weights=topk_weights, strategy=strategy)()


def experts_stages(x: torch.Tensor, prepared: PreparedWeights, alpha: torch.Tensor | None, *,
                   skip: bool | None = None, top_k: int | None = None,
                   x_quant: tuple[torch.Tensor, torch.Tensor] | None = None,
                   expert_ids: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
                   strategy: str | None = None) -> "Fc2Columns":
    """``experts_forward`` split at FC2: its arguments; FC1 (and y's quantisation) run now, and
    the returned ``Fc2Columns`` runs FC2 for any output columns [h0, h1) when called (w2's rows
    h0..h1: the weights are read once over all pieces). ``experts_stages(...)(0, H)`` equals
    ``experts_forward(...)``; ``densemoe.parallel`` reduces one piece while the next one's FC2
    runs."""
    return _stages("experts_stages", x, prepared, alpha, skip=skip, top_k=top_k, x_quant=x_quant,
                   expert_ids=expert_ids, topk_weights=topk_weights, strategy=strategy)


class Fc2Columns:
    """FC2 of a call whose FC1 has run: ``cols(h0, h1)`` -> [M, h1 - h0] in x's dtype (bf16 for
    an fp8 x), the layer's output columns [h0, h1); h0 and h1 on multiples of ``unit`` (128 for
    block-scaled weights, else 1). ``cols()`` is the whole output."""

    def __init__(self, op: str, run, hidden: int, unit: int, strategy: str):
        self._op, self._run, self.hidden, self.unit, self.strategy = op, run, hidden, unit, strategy

    def __call__(self, h0: int = 0, h1: int | None = None) -> torch.Tensor:
        h1 = self.hidden if h1 is None else h1
        check_columns(self._op, h0, h1, self.hidden, self.unit)
        return self._run(h0, h1)


def _stages(op: str, x, prepared, alpha, *, skip, top_k, x_quant, expert_ids, topk_weights, strategy) -> Fc2Columns:
    if not isinstance(prepared, PreparedWeights):
        raise TypeError(f"{op}: prepared must be the PreparedWeights that densemoe.prepare_weights(w13, w2) returns, "
                        f"got {type(prepared).__name__}")
    H, E = prepared.hidden, prepared.num_experts
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != H:
        raise ValueError(f"{op}: x must be a [M, H={H}] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must have a floating dtype (bfloat16, float16, float32), got {x.dtype}")
    v.inference_only(op, x=x, alpha=alpha, topk_weights=topk_weights)
    M = x.shape[0]
    if alpha is None:
        if not (isinstance(expert_ids, torch.Tensor) and isinstance(topk_weights, torch.Tensor)
                and expert_ids.dim() == 2 and expert_ids.shape[0] == M):
            raise ValueError(f"{op}: alpha=None needs expert_ids [M={M}, k] and topk_weights [M, k]")
        alpha_given = False
    else:
        alpha_given = True
    if alpha_given and (not isinstance(alpha, torch.Tensor) or tuple(alpha.shape) != (M, E)):
        raise ValueError(f"{op}: alpha must be a [M, E] = [{M}, {E}] tensor (one routing weight per token and "
                         f"expert), got {tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__}")
    if alpha_given and not alpha.is_floating_point():
        raise TypeError(f"{op}: alpha must have a floating dtype, got {alpha.dtype}")
    for name, t in ((("alpha", alpha),) if alpha_given else ()) + (("prepared weights", prepared.w1),):
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; all must be on one device")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E):
        raise ValueError(f"{op}: top_k must be an int in [1, E={E}], got {top_k!r}")
    if expert_ids is not None and not isinstance(expert_ids, torch.Tensor):
        raise ValueError(f"{op}: expert_ids must be a [k] or [M, k] integer tensor, got {type(expert_ids).__name__}")
    per_token = expert_ids is not None and expert_ids.dim() == 2 and expert_ids.shape[0] == M
    if per_token and top_k is not None and top_k != expert_ids.shape[1]:
        raise ValueError(f"{op}: top_k={top_k} but expert_ids has k={expert_ids.shape[1]} slots per token")
    if topk_weights is not None and not per_token:
        raise ValueError(f"{op}: topk_weights needs expert_ids [M={M}, k] beside it")
    k = expert_ids.shape[1] if per_token else (top_k or rule.DEFAULT_TOP_K)
    routed_blocker = None if per_token else "it needs the top-k ids: expert_ids [M, k]"
    how = rule.resolve(op, strategy, skip, M, E, top_k=k, routed_blocker=routed_blocker,
                       problem=problem_of(x, prepared, k), device=x.device)
    if how == "routed":
        if topk_weights is None:
            topk_weights = alpha.float().gather(1, expert_ids.long())
        return Fc2Columns(op, RoutedStages(x, prepared, expert_ids, topk_weights, x_quant=x_quant), H,
                          prepared.block or 1, how)
    skip = how == "skip"
    alpha = alpha.float() if alpha_given else alpha_from_topk(expert_ids, topk_weights.float(), E)
    if x_quant is not None:
        if prepared.dtype != FP8:
            raise ValueError(f"{op}: x_quant is for fp8 weights; these are {prepared.dtype}")
        x8, sx = x_quant
        want = (M, H // prepared.block) if prepared.block else (M,)
        if x8.shape != x.shape or x8.dtype != FP8 or tuple(sx.shape) != want:
            raise ValueError(f"{op}: x_quant must be (x8 [M, H] fp8, sx {list(want)}) for x {tuple(x.shape)}"
                             f"{' (block-scaled weights: quantize_per_token_group(x))' if prepared.block else ''}, "
                             f"got {tuple(x8.shape)} {x8.dtype}, {tuple(sx.shape)}")
    ids = None
    if expert_ids is not None:
        if expert_ids.dim() not in (1, 2):
            raise ValueError(f"{op}: expert_ids must be a [k] or [M, k] integer tensor, got "
                             f"{tuple(expert_ids.shape) if isinstance(expert_ids, torch.Tensor) else type(expert_ids).__name__}")
        if skip and M == 1:
            ids = v.expert_ids(op, expert_ids, M, E, skip, x.device)
    w2, b = prepared.w2, prepared.block  # FC2 below: output columns [h0, h1) = w2's rows h0..h1 (views)
    if b:  # 128 x 128 block-scaled weights: x in 1 x 128 groups, both scales per k-step
        x8, sg = quantize_per_token_group(x, b) if x_quant is None else x_quant
        y = fc1(x8, prepared.w1, prepared.alpha1, routing=alpha, skip=skip, fill_unpicked=False, expert_ids=ids,
                x_group_scale=sg, w_block_scale=prepared.w1_block_scale)
        y8, alpha2 = quantize_y_fold_alpha(y, alpha, prepared.w2_scale)

        def run(h0, h1):
            return fc2(y8, w2[h0:h1], alpha2, skip=skip, expert_ids=ids,
                       w_block_scale=prepared.w2_block_scale[h0 // b:h1 // b])
    elif prepared.dtype == FP8:
        x8, sx = quantize_per_token(x) if x_quant is None else x_quant
        if rule.quantize_y_in_fc1(prepared.inter):  # one FC1 tile holds all of I: quantise in its epilogue
            y8, ys = fc1_fp8_dynamic(x8, prepared.w1, prepared.alpha1, x_scale=sx)
            alpha2, ids2 = alpha * ys * prepared.w2_scale[None, :], None
        else:
            # the quantisation reads only picked segments: FC1 need not zero the others
            y = fc1(x8, prepared.w1, prepared.alpha1, x_scale=sx, routing=alpha, skip=skip, fill_unpicked=False,
                    expert_ids=ids)
            (y8, alpha2), ids2 = quantize_y_fold_alpha(y, alpha, prepared.w2_scale), ids

        def run(h0, h1):
            return fc2(y8, w2[h0:h1], alpha2, skip=skip, expert_ids=ids2)
    else:
        # FC2 (same skip rule) never reads the experts a tile did not pick; FC1 need not zero them
        y = fc1(x.to(torch.bfloat16), prepared.w1, prepared.alpha1, routing=alpha, skip=skip, fill_unpicked=False,
                expert_ids=ids)
        # skipping: w2's scale in the kernel (no launch for alpha * w2_scale); in the dense loop a
        # per-k-tile load of w_scale costs more than this multiply
        alpha2 = alpha if skip else alpha * prepared.w2_scale[None, :]

        def run(h0, h1):
            return fc2(y, w2[h0:h1], alpha2, skip=skip, w_scale=prepared.w2_scale if skip else None, expert_ids=ids)

    def cast(h0, h1):
        out = run(h0, h1)
        return out.to(x.dtype) if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else out

    return Fc2Columns(op, cast, H, b or 1, how)
