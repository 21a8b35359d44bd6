"""MoE routers: router logits -> ``alpha [M, E] float32``, the dense kernels' per-token,
per-expert scales (the routing weight of expert e for token m, 0 where token m did not pick e).

    softmax_topk      Mixtral / Qwen2-MoE / Qwen3-MoE style: softmax, top-k, optional renorm.
    deepseek_v3_topk  DeepSeek-V3 style: sigmoid, grouped top-k with a score-correction bias.
    alpha_from_topk   (topk_ids, topk_weights) -> alpha, for routers computed elsewhere.
    router_logits     the gate's hidden @ W_gate.T; at small M one fused Triton kernel that can
                      also quantise the hidden states for the fp8 experts (``quantize=True``).

Every router runs on the device of its inputs with no host synchronisation (no ``.item()``, no
``nonzero``, no branching on tensor values), so it can be captured by CUDA graphs and by
``torch.compile(fullgraph=True)``. Argument checks look at shapes, dtypes and Python values only.

The weights are always returned in float32. Hugging Face's routers differ here: Qwen3-MoE casts
its top-k weights back to the router-logits (hidden) dtype, Mixtral and DeepSeek-V3 keep float32;
``out.topk_weights.to(hidden_dtype)`` reproduces the Qwen3-MoE cast exactly.

Each router has a plain-PyTorch twin ``*_ref`` in ``densemoe.reference`` (Python loops, float64 by
default): slow on purpose, the semantics the tests hold the fast versions to.

``softmax_topk`` and ``deepseek_v3_topk`` each have two implementations, picked by ``impl``:

    "torch"   the plain torch ops below (about 10 small kernels per call on a GPU)
    "triton"  one fused Triton kernel per call (``densemoe.kernels.triton.routing``: one program
              per token, ids, weights and alpha written together), or a ValueError naming why
              it cannot run: a CPU tensor without Triton's interpreter (TRITON_INTERPRET=1),
              E > 1024, top_k > 128, logits (or the bias) not float32/bfloat16/float16/float64,
              or inputs that require grad while grad is enabled (the kernel has no backward)
    "auto"    (default) "triton" where it can run, else "torch"

Both give the same routing up to rounding. The differences (see the kernel module): the
DeepSeek-V3 slot order (the kernel's is descending by biased score, torch.topk(sorted=False)'s
is the device's own), ties (the kernel picks the lowest index), and ulps of exp/sigmoid and of
the sums (weights and alpha within ~1e-6 relative; an exact near-tie at the k-th pick can go
either way). The kernels are ``torch.library`` custom ops (``densemoe::router_softmax_topk``,
``densemoe::router_deepseek_v3_topk``) with fakes, so torch.compile(fullgraph=True) and CUDA
graphs take them.
"""

from __future__ import annotations

import operator

import torch

from densemoe._runtime import interpreter_enabled
from densemoe.quant import FP8, quantize_per_token
from densemoe.reference import RouterOutput, router_logits_ref

__all__ = ["RouterOutput", "alpha_from_topk", "router_logits", "softmax_topk", "deepseek_v3_topk"]


# ----------------------------------------------------------------------------------------------
# argument checks (shapes, dtypes and Python values only: nothing that reads device memory)


def _check_tensor(op: str, name: str, x, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def _check_float(op: str, name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must have a floating dtype, got {x.dtype}")


def _check_int(op: str, name: str, v) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be an int, got bool")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}") from None


def _check_logits(op: str, router_logits) -> int:
    """Checks router_logits [M, E] (2-D, floating, E >= 1); returns E."""
    _check_tensor(op, "router_logits", router_logits, 2)
    _check_float(op, "router_logits", router_logits)
    E = router_logits.shape[1]
    if E < 1:
        raise ValueError(f"{op}: router_logits must have at least one expert column, "
                         f"got shape {tuple(router_logits.shape)}")
    return E


def _check_top_k(op: str, top_k, E: int) -> int:
    top_k = _check_int(op, "top_k", top_k)
    if not 1 <= top_k <= E:
        raise ValueError(f"{op}: top_k must be in [1, E={E}] (E = router_logits.shape[1]), got {top_k}")
    return top_k


def _check_bool(op: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(v).__name__}")
    return v


def _check_deepseek_args(router_logits, top_k, n_group, topk_group, e_score_correction_bias,
                         routed_scaling_factor, norm_topk_prob):
    op = "deepseek_v3_topk"
    E = _check_logits(op, router_logits)
    top_k = _check_top_k(op, top_k, E)
    n_group = _check_int(op, "n_group", n_group)
    topk_group = _check_int(op, "topk_group", topk_group)
    if n_group < 1 or E % n_group:
        raise ValueError(f"{op}: n_group must be a positive divisor of E={E} "
                         f"(E = router_logits.shape[1]), got {n_group}")
    if E // n_group < 2:
        raise ValueError(f"{op}: n_group={n_group} leaves {E // n_group} expert per group; a group's "
                         f"score is the sum of its top-2 scores, so E // n_group must be >= 2 (E={E})")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"{op}: topk_group must be in [1, n_group={n_group}], got {topk_group}")
    if top_k > topk_group * (E // n_group):
        raise ValueError(f"{op}: top_k={top_k} exceeds the {topk_group * (E // n_group)} experts in "
                         f"the topk_group={topk_group} kept groups of {E // n_group}")
    if e_score_correction_bias is not None:
        _check_tensor(op, "e_score_correction_bias", e_score_correction_bias, 1)
        _check_float(op, "e_score_correction_bias", e_score_correction_bias)
        if e_score_correction_bias.shape[0] != E:
            raise ValueError(f"{op}: e_score_correction_bias must have shape [E={E}], "
                             f"got {tuple(e_score_correction_bias.shape)}")
        if e_score_correction_bias.device != router_logits.device:
            raise ValueError(f"{op}: e_score_correction_bias is on {e_score_correction_bias.device} "
                             f"but router_logits is on {router_logits.device}")
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)):
        raise TypeError(f"{op}: routed_scaling_factor must be a float, "
                        f"got {type(routed_scaling_factor).__name__}")
    _check_bool(op, "norm_topk_prob", norm_topk_prob)
    return top_k, n_group, topk_group


# ----------------------------------------------------------------------------------------------
# alpha from (ids, weights)


def alpha_from_topk(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter the top-k weights into a dense [M, E] float32 matrix.

        alpha = zeros(M, E, float32)
        alpha[m, topk_ids[m, j]] = float32(topk_weights[m, j])   for every m, j

    topk_ids      [M, k] any integer dtype, values in [0, num_experts), distinct within a row
                  (duplicates are not expected: which of them lands is unspecified); an id
                  outside [0, num_experts) is dropped (its slot adds nothing), as the routed
                  path drops it: checking would need a host sync
    topk_weights  [M, k] any floating dtype
    num_experts   E, int >= k
    returns       alpha [M, E] float32, on topk_ids' device
    """
    op = "alpha_from_topk"
    _check_tensor(op, "topk_ids", topk_ids, 2)
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise TypeError(f"{op}: topk_ids must have an integer dtype, got {topk_ids.dtype}")
    _check_tensor(op, "topk_weights", topk_weights, 2)
    _check_float(op, "topk_weights", topk_weights)
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"{op}: topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    if topk_weights.device != topk_ids.device:
        raise ValueError(f"{op}: topk_weights is on {topk_weights.device} but topk_ids is on {topk_ids.device}")
    num_experts = _check_int(op, "num_experts", num_experts)
    if num_experts < max(1, topk_ids.shape[1]):
        raise ValueError(f"{op}: num_experts must be >= max(1, k={topk_ids.shape[1]}) "
                         f"(k = topk_ids.shape[1]), got {num_experts}")
    return _alpha(topk_ids, topk_weights, num_experts)


def _alpha(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    # an id outside [0, E) lands in an extra column E, cut off (no sync, no out-of-bounds scatter)
    ids = topk_ids.long()
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    alpha = torch.zeros((topk_ids.shape[0], num_experts + 1), dtype=torch.float32, device=topk_ids.device)
    return alpha.scatter(1, ids, topk_weights.to(torch.float32))[:, :num_experts]


# ----------------------------------------------------------------------------------------------
# the fused Triton kernels: when they can run, and their custom ops

_IMPLS = ("auto", "triton", "torch")
# mirrors of densemoe.kernels.triton.routing's limits (kept here so that importing this module
# does not import Triton)
_KERNEL_MAX_EXPERTS = 1024
_KERNEL_MAX_TOP_K = 128
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_impl(op: str, impl) -> str:
    if not isinstance(impl, str) or impl not in _IMPLS:
        raise ValueError(f"{op}: impl must be one of {_IMPLS}, got {impl!r}")
    return impl


def _kernel_blocker(router_logits: torch.Tensor, E: int, top_k: int,
                    bias: torch.Tensor | None = None) -> str | None:
    """Why the fused kernel cannot run on these inputs (shapes, dtypes, devices and flags only),
    or None when it can."""
    if router_logits.device.type != "cuda" and not interpreter_enabled():
        return (f"router_logits is on {router_logits.device}; the kernel needs a CUDA tensor "
                f"(or Triton's interpreter, TRITON_INTERPRET=1)")
    if router_logits.dtype not in _KERNEL_DTYPES:
        return f"router_logits has dtype {router_logits.dtype}; the kernel takes {_KERNEL_DTYPES}"
    if E > _KERNEL_MAX_EXPERTS:
        return f"E={E} experts; the kernel holds a row in registers, up to {_KERNEL_MAX_EXPERTS}"
    if top_k > _KERNEL_MAX_TOP_K:
        return f"top_k={top_k}; the kernel runs k argmax rounds, up to {_KERNEL_MAX_TOP_K}"
    if bias is not None and bias.dtype not in _KERNEL_DTYPES:
        return f"e_score_correction_bias has dtype {bias.dtype}; the kernel takes {_KERNEL_DTYPES}"
    if torch.is_grad_enabled() and (router_logits.requires_grad or (bias is not None and bias.requires_grad)):
        return "an input requires grad and the kernel has no backward"
    return None


def _use_kernel(op: str, impl: str, blocker: str | None) -> bool:
    if impl == "torch":
        return False
    if blocker is None:
        return True
    if impl == "triton":
        raise ValueError(f"{op}: impl='triton' cannot run here: {blocker}")
    return False


def _router_outputs(M: int, E: int, top_k: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty((M, E), dtype=torch.float32, device=device),
            torch.empty((M, top_k), dtype=torch.int64, device=device),
            torch.empty((M, top_k), dtype=torch.float32, device=device))


@torch.library.custom_op("densemoe::router_softmax_topk", mutates_args=("alpha", "topk_ids", "topk_weights"))
def _softmax_topk_op(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                     alpha: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    from densemoe.kernels.triton.routing import softmax_topk_triton

    softmax_topk_triton(router_logits, top_k, renormalize, alpha, topk_ids, topk_weights)


@_softmax_topk_op.register_fake
def _(router_logits, top_k, renormalize, alpha, topk_ids, topk_weights):
    return None


@torch.library.custom_op("densemoe::router_deepseek_v3_topk", mutates_args=("alpha", "topk_ids", "topk_weights"))
def _deepseek_v3_topk_op(router_logits: torch.Tensor, e_score_correction_bias: torch.Tensor | None,
                         top_k: int, n_group: int, topk_group: int, routed_scaling_factor: float,
                         norm_topk_prob: bool, alpha: torch.Tensor, topk_ids: torch.Tensor,
                         topk_weights: torch.Tensor) -> None:
    from densemoe.kernels.triton.routing import deepseek_v3_topk_triton

    deepseek_v3_topk_triton(router_logits, e_score_correction_bias, top_k, n_group, topk_group,
                            routed_scaling_factor, norm_topk_prob, alpha, topk_ids, topk_weights)


@_deepseek_v3_topk_op.register_fake
def _(router_logits, e_score_correction_bias, top_k, n_group, topk_group, routed_scaling_factor,
      norm_topk_prob, alpha, topk_ids, topk_weights):
    return None


# ----------------------------------------------------------------------------------------------
# router logits (the gate GEMM), with the fp8 experts' input quantisation fused at small M

_GATE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_GATE_MAX_M = 4  # mirror of densemoe.kernels.triton.gate.MAX_M


@torch.library.custom_op("densemoe::router_gate", mutates_args=("out",))
def _gate_op(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, cast_weight: bool) -> None:
    from densemoe.kernels.triton.gate import gate_triton

    gate_triton(x, weight, out, cast_weight=cast_weight)


@_gate_op.register_fake
def _(x, weight, out, cast_weight):
    return None


@torch.library.custom_op("densemoe::router_gate_quant", mutates_args=("out", "q", "s"))
def _gate_quant_op(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, q: torch.Tensor,
                   s: torch.Tensor, cast_weight: bool) -> None:
    from densemoe.kernels.triton.gate import gate_triton

    gate_triton(x, weight, out, q, s, cast_weight=cast_weight)


@_gate_quant_op.register_fake
def _(x, weight, out, q, s, cast_weight):
    return None


def _gate_blocker(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the gate kernel cannot run on these inputs, or None when it can."""
    if x.device.type != "cuda" and not interpreter_enabled():
        return f"x is on {x.device}; the kernel needs a CUDA tensor (or TRITON_INTERPRET=1)"
    if x.shape[0] > _GATE_MAX_M:
        return f"M={x.shape[0]} tokens; the kernel holds them in registers, up to {_GATE_MAX_M} (above: cuBLAS)"
    if x.dtype not in _GATE_DTYPES or weight.dtype not in _GATE_DTYPES:
        return f"x / weight have dtypes {x.dtype} / {weight.dtype}; the kernel takes {_GATE_DTYPES}"
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        return "x and weight need unit stride along H"
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return "an input requires grad and the kernel has no backward"
    return None


def gate_kernel_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``router_logits(x, weight)`` runs the gate kernel (impl "auto"), which with
    ``quantize`` quantises x in the same launch; elsewhere ``quantize`` costs a launch of its own."""
    return _gate_blocker(x, weight) is None


def router_logits(x: torch.Tensor, weight: torch.Tensor, *, float32: bool = False, quantize: bool = False,
                  impl: str = "auto"):
    """The router's logits, and optionally the fp8 experts' quantised input, in one pass:

        logits = float32(x) @ float32(weight).T      if float32 (DeepSeek-V3: HF casts both)
                 x @ weight.to(x.dtype).T            else (Mixtral, Qwen3-MoE), in x's dtype
        if quantize:  (x8, sx) = densemoe.quant.quantize_per_token(x)   (the same bits)

    x       [M, H] bf16 / fp16 / fp32;  weight [E, H] (the gate)
    returns (logits [M, E], (x8 [M, H] fp8, sx [M] float32) or None)

    impl "auto": the fused Triton kernel (``densemoe.kernels.triton.gate``: one launch, the
    products accumulated in float32 in another order than cuBLAS's, so logits may differ from
    F.linear's in the last bit) where it can run (CUDA or the interpreter, M <= 4, unit strides
    along H, no grad), else F.linear (+ ``quantize_per_token``). "triton" raises a ValueError
    naming why it cannot run; "torch" is always the twin.
    """
    op = "router_logits"
    _check_tensor(op, "x", x, 2)
    _check_tensor(op, "weight", weight, 2)
    _check_float(op, "x", x)
    _check_float(op, "weight", weight)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight must be [E, H={x.shape[1]}], got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{op}: x is on {x.device} but weight is on {weight.device}")
    _check_bool(op, "float32", float32)
    _check_bool(op, "quantize", quantize)
    impl = _check_impl(op, impl)
    if not _use_kernel(op, impl, _gate_blocker(x, weight)):  # the twin's math, the fast quantiser
        logits = router_logits_ref(x, weight, float32=float32)[0]
        return logits, (quantize_per_token(x) if quantize else None)
    M, H = x.shape
    out = torch.empty((M, weight.shape[0]), dtype=torch.float32 if float32 else x.dtype, device=x.device)
    if not quantize:
        _gate_op(x, weight, out, not float32)
        return out, None
    q = torch.empty((M, H), dtype=FP8, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    _gate_quant_op(x, weight, out, q, s, not float32)
    return out, (q, s)


# ----------------------------------------------------------------------------------------------
# softmax top-k (Mixtral, Qwen2-MoE, Qwen3-MoE)


def softmax_topk(router_logits: torch.Tensor, top_k: int, *, renormalize: bool,
                 impl: str = "auto") -> RouterOutput:
    """Softmax top-k routing, as Hugging Face transformers 5.x's MixtralTopKRouter (which always
    renormalises) and Qwen3MoeTopKRouter (renormalises iff config.norm_topk_prob).

        p = softmax(float32(router_logits), dim=-1)            # [M, E]
        topk_weights, topk_ids = topk(p, top_k, dim=-1)        # sorted: descending weight
        if renormalize:
            topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True)
        alpha = alpha_from_topk(topk_ids, topk_weights, E)

    router_logits  [M, E] any floating dtype (the gate's hidden @ W_gate.T)
    top_k          int in [1, E]
    renormalize    make each row's k weights sum to 1 (Mixtral: True; Qwen3-MoE: norm_topk_prob)
    impl           "auto" (default), "triton" (the fused kernel) or "torch" (see the module docstring)
    returns        RouterOutput(alpha [M, E] f32, topk_ids [M, k] i64, topk_weights [M, k] f32)

    The fused kernel gives the same slots in the same order, weights within ~1e-6 relative; among
    exactly equal probabilities it picks the lowest expert index.

    The weights stay float32. HF's Qwen3MoeTopKRouter casts them to router_logits.dtype (the hidden
    dtype) before returning; ``topk_weights.to(router_logits.dtype)`` equals it. Mixtral keeps them
    float32 as here.
    """
    op = "softmax_topk"
    E = _check_logits(op, router_logits)
    top_k = _check_top_k(op, top_k, E)
    _check_bool(op, "renormalize", renormalize)
    impl = _check_impl(op, impl)
    if _use_kernel(op, impl, _kernel_blocker(router_logits, E, top_k)):
        alpha, topk_ids, topk_weights = _router_outputs(router_logits.shape[0], E, top_k, router_logits.device)
        _softmax_topk_op(router_logits, top_k, renormalize, alpha, topk_ids, topk_weights)
        return RouterOutput(alpha, topk_ids, topk_weights)
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return RouterOutput(_alpha(topk_ids, topk_weights, E), topk_ids, topk_weights)


# ----------------------------------------------------------------------------------------------
# DeepSeek-V3 sigmoid grouped top-k


def deepseek_v3_topk(router_logits: torch.Tensor, top_k: int, *, n_group: int, topk_group: int,
                     e_score_correction_bias: torch.Tensor | None, routed_scaling_factor: float,
                     norm_topk_prob: bool, impl: str = "auto") -> RouterOutput:
    """DeepSeek-V3's "noaux_tc" routing, as Hugging Face transformers 5.x's DeepseekV3TopkRouter.

        G = E // n_group                                          # experts per group
        scores = sigmoid(float32(router_logits))                  # [M, E]
        choice = scores + e_score_correction_bias                 # [M, E]; bias only steers choice
        group_score = choice.view(M, n_group, G).topk(2).values.sum(-1)        # [M, n_group]
        keep = topk(group_score, topk_group).indices              # best topk_group groups
        choice = choice where the expert's group is in keep, else -inf
        topk_ids = topk(choice, top_k, sorted=False).indices      # [M, k]
        topk_weights = scores.gather(1, topk_ids)                 # the unbiased scores
        if norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(-1, keepdim=True) + 1e-20)
        topk_weights = topk_weights * routed_scaling_factor
        alpha = alpha_from_topk(topk_ids, topk_weights, E)

    router_logits            [M, E] floating (HF computes them in float32 from float32 hidden
                             states and gate weight; other dtypes are cast to float32 first)
    top_k                    int, 1 <= top_k <= topk_group * G
    n_group                  int dividing E with G = E // n_group >= 2
    topk_group               int in [1, n_group]
    e_score_correction_bias  [E] floating (cast to float32) or None (= zeros)
    routed_scaling_factor    Python float, applied after the optional normalisation
    norm_topk_prob           normalise the k unbiased scores to sum 1 (the 1e-20 is HF's)
    impl                     "auto" (default), "triton" (the fused kernel) or "torch" (see the
                             module docstring)
    returns                  RouterOutput(alpha [M, E] f32, topk_ids [M, k] i64, topk_weights [M, k] f32)

    impl="torch": the order of the k slots is whatever topk(sorted=False) gives on the device, as
    in HF (the same calls, so the same order and the same float32 sum). The fused kernel puts
    them in descending biased score (``choice``), breaks ties by the lowest index, and its
    weights agree within ~1e-6 relative. alpha does not depend on the order.
    """
    top_k, n_group, topk_group = _check_deepseek_args(
        router_logits, top_k, n_group, topk_group, e_score_correction_bias,
        routed_scaling_factor, norm_topk_prob)
    op = "deepseek_v3_topk"
    impl = _check_impl(op, impl)
    M, E = router_logits.shape
    G = E // n_group
    if _use_kernel(op, impl, _kernel_blocker(router_logits, E, top_k, e_score_correction_bias)):
        alpha, topk_ids, topk_weights = _router_outputs(M, E, top_k, router_logits.device)
        _deepseek_v3_topk_op(router_logits, e_score_correction_bias, top_k, n_group, topk_group,
                             float(routed_scaling_factor), norm_topk_prob, alpha, topk_ids, topk_weights)
        return RouterOutput(alpha, topk_ids, topk_weights)
    scores = router_logits.to(torch.float32).sigmoid()
    if e_score_correction_bias is None:
        scores_for_choice = scores
    else:
        scores_for_choice = scores + e_score_correction_bias.to(torch.float32)
    group_scores = scores_for_choice.view(-1, n_group, G).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, G).reshape(-1, E)
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_ids = torch.topk(scores_for_choice, k=top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
        topk_weights = topk_weights / denominator
    topk_weights = topk_weights * routed_scaling_factor
    return RouterOutput(_alpha(topk_ids, topk_weights, E), topk_ids, topk_weights)
