"""FC1, the dense-MoE gate/up projection with SwiGLU fused: the public ops (``fc1``,
``fc1_fp8_dynamic``), their argument checks and custom ops.

Two backends: the Triton kernel (``kernels/triton/fc1.py``, every device the package supports)
and the CuTe DSL kernel for sm_90a (``kernels/cute/fc1_sm90.py``). Which runs a call, with which
config, is ``fc1_configs.choose``'s answer; whether to skip experts, ``strategy.resolve_skip``'s.
"""

from __future__ import annotations

import dataclasses

import torch

from densemoe.kernels.common import Fc1Problem
from densemoe.kernels.cute import fc1_sm90 as cute_fc1
from densemoe.kernels.cute.fc1_sm90 import Fc1CuteConfig
from densemoe.kernels.triton.fc1 import Fc1TritonConfig, can_implement, fc1_triton
from densemoe.ops import _validate as v
from densemoe.ops import fc1_configs, strategy
from densemoe.ops.fc1_configs import BACKENDS, OP

IN_DTYPES = (v.FP8, torch.bfloat16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, v.FP8)


def _problem(x, w1, alpha1, out) -> Fc1Problem:
    M, H = x.shape
    E = alpha1.shape[0]
    return Fc1Problem(M, H, E, w1.shape[0] // (2 * E), x.dtype, out.dtype)


def _choose(x, w1, alpha1, out, config, backend: str, *, x_scale=None, alpha_post=None, out_scale=None,
            skip: bool = False, routing: bool = False):
    """``fc1_configs.choose`` for these tensors (the CuTe kernel's tensor rules checked on them)."""
    def cute_check():
        return cute_fc1.runtime_ok(x, w1, alpha1, out, x_scale=x_scale, alpha_post=alpha_post, out_scale=out_scale)
    return fc1_configs.choose(_problem(x, w1, alpha1, out), x.device, backend=backend, config=config, skip=skip,
                              routing=routing, cute_check=cute_check)


def which_backend(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, out: torch.Tensor,
                  config=None, backend: str = "auto", with_source: bool = False, *,
                  x_scale: torch.Tensor | None = None, alpha_post: torch.Tensor | None = None,
                  out_scale: torch.Tensor | None = None, routing: bool = False, skip: bool = False):
    """``fc1_configs.choose`` for these tensors, as ``fc1`` would call it: (backend, config), with
    ``with_source`` also where the config came from ("pinned", "cache", "shipped" or
    "heuristic"). ``routing`` / ``skip``: the choice with a routing mask / with expert skipping
    (default: neither, the dense choice)."""
    which = _choose(x, w1, alpha1, out, config, backend, x_scale=x_scale, alpha_post=alpha_post,
                    out_scale=out_scale, skip=skip, routing=routing)
    return tuple(which) if with_source else tuple(which[:2])


@torch.library.custom_op("densemoe::fc1", mutates_args=("out",))
def _fc1_op(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, x_scale: torch.Tensor | None,
            alpha_post: torch.Tensor | None, out_scale: torch.Tensor | None, routing: torch.Tensor | None,
            out: torch.Tensor, config: str, backend: str, skip: bool, fill: bool = True,
            expert_ids: torch.Tensor | None = None, x_group_scale: torch.Tensor | None = None,
            w_block_scale: torch.Tensor | None = None) -> None:
    which, cfg, _ = _choose(x, w1, alpha1, out, fc1_configs.parse_config(config) if config else None, backend,
                            x_scale=x_scale, alpha_post=alpha_post, out_scale=out_scale, skip=skip,
                            routing=routing is not None)
    if w_block_scale is not None:  # the Triton kernel (backend forced by fc1), tiles within a scale block
        fc1_triton(x, w1, alpha1, out, block_config(cfg, _problem(x, w1, alpha1, out)), alpha_post=alpha_post,
                   out_scale=out_scale, routing=routing, skip=skip, fill=fill, expert_ids=expert_ids,
                   x_group_scale=x_group_scale, w_block_scale=w_block_scale)
        return
    if which == "cute":
        cute_fc1.fc1_cute(x, w1, alpha1, out, cfg, x_scale=x_scale, alpha_post=alpha_post, out_scale=out_scale)
        return
    fc1_triton(x, w1, alpha1, out, cfg, x_scale=x_scale, alpha_post=alpha_post, out_scale=out_scale,
               routing=routing, skip=skip, fill=fill, expert_ids=expert_ids)


@_fc1_op.register_fake
def _(x, w1, alpha1, x_scale, alpha_post, out_scale, routing, out, config, backend, skip, fill=True, expert_ids=None,
      x_group_scale=None, w_block_scale=None):
    return None


def block_config(cfg: Fc1TritonConfig, problem: Fc1Problem | None = None) -> Fc1TritonConfig:
    """``cfg`` with its tile cut to fit one 128 x 128 weight-scale block (block_i and block_k at
    most 128: powers of two, so they divide it). With ``problem``, the load ring deepened by as
    much as each stage shrank, as far as ``can_implement`` allows: the same bytes in flight as
    the per-expert config (the block path runs at small M, where FC1 waits on the loads; a 256
    k-tile cut to 128 with the same ring had half of them in flight)."""
    cut = dataclasses.replace(cfg, block_i=min(cfg.block_i, 128), block_k=min(cfg.block_k, 128))
    if problem is None:
        return cut
    grow = ((cfg.block_m + 2 * cfg.block_i) * cfg.block_k) // ((cut.block_m + 2 * cut.block_i) * cut.block_k)
    for stages in range(min(8, cfg.num_stages * grow), cfg.num_stages, -1):
        deeper = dataclasses.replace(cut, num_stages=stages)
        if can_implement(problem, deeper)[0]:
            return deeper
    return cut


def _check_inputs(x, w1, alpha1, x_scale, alpha_post):
    """The checks every FC1 entry point shares: (x, w1, alpha1, x_scale, alpha_post, I, tensors)."""
    x = v.tensor(OP, "x", x, 2)
    w1 = v.tensor(OP, "w1", w1, 2)
    alpha1 = v.tensor(OP, "alpha1", alpha1, 1)
    v.dtype(OP, "x", x, IN_DTYPES)
    if w1.dtype != x.dtype:
        raise TypeError(f"{OP}: w1 must have x's dtype ({v.dtype_name(x.dtype)}), got {v.dtype_name(w1.dtype)}")
    v.dtype(OP, "alpha1", alpha1, (torch.float32,))
    M, H = x.shape
    E = alpha1.shape[0]
    if E < 1:
        raise ValueError(f"{OP}: alpha1 must have E >= 1 entries (one per expert), got shape {tuple(alpha1.shape)}")
    if w1.shape[1] != H:
        raise ValueError(f"{OP}: w1 has {w1.shape[1]} columns but x has H={H}")
    if w1.shape[0] == 0 or w1.shape[0] % (2 * E):
        raise ValueError(f"{OP}: w1 has {w1.shape[0]} rows, expected a positive multiple of 2*E = {2 * E} "
                         "(gate and up rows of each expert)")
    I = w1.shape[0] // (2 * E)
    tensors = dict(x=x, w1=w1, alpha1=alpha1)
    if x_scale is not None:
        x_scale = v.tensor(OP, "x_scale", x_scale, 1)
        v.dtype(OP, "x_scale", x_scale, (torch.float32,))
        if x_scale.shape[0] != M:
            raise ValueError(f"{OP}: x_scale has {x_scale.shape[0]} entries, expected M={M}")
        tensors["x_scale"] = x_scale
    if alpha_post is not None:
        alpha_post = v.tensor(OP, "alpha_post", alpha_post, 2)
        v.dtype(OP, "alpha_post", alpha_post, (torch.float32,))
        if tuple(alpha_post.shape) != (M, E):
            raise ValueError(f"{OP}: alpha_post has shape {tuple(alpha_post.shape)}, expected (M, E) = ({M}, {E})")
        tensors["alpha_post"] = alpha_post
    return x, w1, alpha1, x_scale, alpha_post, I, tensors


def fc1(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, *,
        x_scale: torch.Tensor | None = None, alpha_post: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None, out_scale: torch.Tensor | None = None,
        out: torch.Tensor | None = None, config: Fc1TritonConfig | Fc1CuteConfig | None = None,
        backend: str = "auto", routing: torch.Tensor | None = None, skip: bool | None = None,
        fill_unpicked: bool = True, expert_ids: torch.Tensor | None = None,
        x_group_scale: torch.Tensor | None = None, w_block_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Dense-MoE FC1 (gate/up projection) over all experts with SwiGLU fused.

        s       = alpha1[e] * x_scale[m]                       (x_scale: 1 when None)
        g[m, i] = s * sum_k x[m, k] * w1[e*2I + i, k]          gate rows of expert e
        u[m, i] = s * sum_k x[m, k] * w1[e*2I + I + i, k]      up rows of expert e
        y[m, e*I + i] = silu(g) * u * alpha_post[m, e]         (alpha_post: 1 when None)
        with routing: y[m, e*I + i] = 0 where routing[m, e] == 0
        fp8 output: y = clamp(y / out_scale, -448, 448).to(float8_e4m3fn)

    Expert skipping (``skip``, needs ``routing`` or ``alpha_post``): a token tile never reads the
    weights of experts none of its tokens picked (routing, else alpha_post, == 0 for all of
    them); their output segments are written as zeros. Same result as without skipping.

    Args:
        x:          [M, H] float8_e4m3fn or bfloat16: the tokens.
        w1:         [E*2I, H] same dtype: each expert's gate rows then up rows, as checkpoints
                    hold w13 [E, 2I, H] (``prepare_weights`` makes this from a checkpoint).
        alpha1:     [E] float32: per-expert dequantisation scale of w1 (ones for bf16).
        x_scale:    [M] float32, optional: per-token dequantisation scale of an fp8 ``x``.
        alpha_post: [M, E] float32, optional: per-token, per-expert factor after the activation.
        out_dtype:  bfloat16 (default), float16, float32, or float8_e4m3fn (needs ``out_scale``).
        out_scale:  one-element float32 tensor: the static scale of an fp8 output (FC2 then takes
                    ``alpha * out_scale``). For a dynamic per-token-per-expert scale, take a
                    bf16 output through ``densemoe.quant.quantize_per_token_expert``.
        out:        optional [M, E*I] output tensor (unit column stride).
        config:     pin a ``Fc1TritonConfig`` or a ``Fc1CuteConfig`` (which also picks the
                    backend); default: a tuned entry for this problem if one exists
                    (``densemoe.tune("fc1", ...)``, shipped tables), else the backend's
                    deterministic rule (``fc1_configs.choose``).
        backend:    "auto" (default): a tuned entry's choice, else Triton (no default-vs-default
                    CuTe win is recorded: ``fc1_configs.CUTE_WINS``); "triton" or "cute" forces
                    one. "cute" (the sm_90a CuTe DSL
                    kernel) raises, naming why, when it cannot run: no CuTe DSL, not sm_90,
                    strided or misaligned x / w1, or no CuTe config fits the shape.
        routing:    [M, E] tensor (float, bf16 or bool), optional: nonzero where token m picked
                    expert e (the router's alpha). Runs on the Triton kernel.
        skip:       expert skipping. None (default): on when ``routing`` or ``alpha_post`` is
                    given, ``strategy.skip_by_default(M, E)`` holds and no non-persistent or
                    CuTe config is pinned; True: always (needs routing or alpha_post; Triton; a
                    pinned config must be persistent); False: off.
        fill_unpicked: with skipping, write the zeros of experts a token tile did not pick
                    (default). False leaves them unwritten: only for consumers that never read
                    them (``quantize_y_fold_alpha``, ``fc2`` with skipping and the same routing;
                    the layer does this).
        expert_ids: [k] or [1, k] integer, optional, with skipping at M = 1 and
                    ``fill_unpicked=False``: the token's picked experts (its top-k ids: distinct,
                    in [0, E), not checked on the device), walked as they are instead of a list
                    built from ``routing`` at the kernel's start (``docs/skipping.md``).
                    ``routing`` still zeroes where it is 0.
        w_block_scale, x_group_scale: 128 x 128 block-scaled fp8 w1 ([E*2I/128, H/128] float32,
                    ``PreparedWeights.w1_block_scale``) with x quantised per token in groups of
                    128 ([M, H/128] float32, ``quant.quantize_per_token_group``; ``x_scale`` then
                    None): each k-step's products are scaled by both in fp32 (DeepGEMM's
                    promotion). Triton only (``backend="cute"`` or a CuTe config raises); the
                    config's tile is cut to 128 where larger (``block_config``).

    Returns:
        y [M, E*I], ready to be FC2's ``a``.

    Constraints (anything else raises TypeError/ValueError naming the argument): E >= 1,
    w1.shape[0] = 2*E*I with I >= 1, w1.shape[1] = H; tensors on one CUDA device (CPU only
    under TRITON_INTERPRET=1). Inference only.
    """
    x, w1, alpha1, x_scale, alpha_post, I, tensors = _check_inputs(x, w1, alpha1, x_scale, alpha_post)
    M, H = x.shape
    E = alpha1.shape[0]
    if out is not None:
        out = v.tensor(OP, "out", out, 2)
        if out_dtype is not None and out.dtype != out_dtype:
            raise TypeError(f"{OP}: out has dtype {v.dtype_name(out.dtype)} but out_dtype={v.dtype_name(out_dtype)}")
        v.dtype(OP, "out", out, OUT_DTYPES)
        if tuple(out.shape) != (M, E * I):
            raise ValueError(f"{OP}: out has shape {tuple(out.shape)}, expected (M, E*I) = ({M}, {E * I})")
        if E * I > 1 and out.stride(1) != 1:
            raise ValueError(f"{OP}: out must have unit column stride, got strides {tuple(out.stride())}")
        out_dtype = out.dtype
        tensors["out"] = out
    else:
        out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
        if out_dtype not in OUT_DTYPES:
            raise TypeError(f"{OP}: out_dtype must be bfloat16, float16, float32 or float8_e4m3fn, got {out_dtype}")
    if out_dtype == v.FP8:
        if out_scale is None:
            raise ValueError(f"{OP}: an fp8 output needs out_scale (a one-element float32 tensor)")
        v.dtype(OP, "out_scale", out_scale, (torch.float32,))
        if out_scale.numel() != 1:
            raise ValueError(f"{OP}: out_scale must have one element, got shape {tuple(out_scale.shape)}")
        tensors["out_scale"] = out_scale
    elif out_scale is not None:
        raise ValueError(f"{OP}: out_scale is only for an fp8 output (out_dtype=float8_e4m3fn)")
    dev = v.same_device(OP, **tensors)
    v.device_supports(OP, dev, x.dtype)
    v.inference_only(OP, **tensors)
    if backend not in BACKENDS:
        raise ValueError(f"{OP}: backend must be one of {BACKENDS}, got {backend!r}")
    if config is not None:
        if not isinstance(config, (Fc1TritonConfig, Fc1CuteConfig)):
            raise TypeError(f"{OP}: config must be a Fc1TritonConfig or Fc1CuteConfig, got {type(config).__name__}")
        if backend != "auto" and backend != config.backend:
            raise ValueError(f"{OP}: config is a {config.backend} config but backend={backend!r}")
        check = cute_fc1.can_implement if config.backend == "cute" else can_implement
        ok, why = check(Fc1Problem(M, H, E, I, x.dtype, out_dtype), config)
        if not ok:
            raise ValueError(f"{OP}: config {config.to_str()} cannot run: {why}")
    if routing is not None:
        routing = v.tensor(OP, "routing", routing, 2)
        v.dtype(OP, "routing", routing, (torch.float32, torch.bfloat16, torch.float16, torch.bool))
        if tuple(routing.shape) != (M, E):
            raise ValueError(f"{OP}: routing has shape {tuple(routing.shape)}, expected (M, E) = ({M}, {E})")
        v.same_device(OP, x=x, routing=routing)
    wants_cute = backend == "cute" or (config is not None and config.backend == "cute")
    if routing is None and alpha_post is None:
        blocker = "it needs routing (or alpha_post) to know which experts were picked"
    elif wants_cute:
        blocker = "it runs on the Triton kernel; backend='cute' or a CuTe config cannot skip"
    elif config is not None and not config.persistent:
        blocker = f"it needs a persistent config (persistent >= 1), got {config.to_str()}"
    else:
        blocker = None
    skip = strategy.resolve_skip(OP, skip, M, E, blocker=blocker)
    if routing is not None and wants_cute:
        raise ValueError(f"{OP}: routing runs on the Triton kernel; backend='cute' or a CuTe config cannot take it")
    if (w_block_scale is None) != (x_group_scale is None):
        raise ValueError(f"{OP}: w_block_scale and x_group_scale go together (block-scaled w1, x in 1 x 128 groups)")
    if w_block_scale is not None:
        if wants_cute:
            raise ValueError(f"{OP}: block-scaled w1 runs on the Triton kernel; backend='cute' or a CuTe config "
                             "cannot take it")
        if x.dtype != v.FP8 or x_scale is not None or H % 128 or I % 128:
            raise ValueError(f"{OP}: block-scaled w1 needs fp8 x with x_group_scale (no x_scale) and H, I multiples "
                             f"of 128 (got {v.dtype_name(x.dtype)}, H={H}, I={I})")
        for name, t, want in (("w_block_scale", w_block_scale, (E * 2 * I // 128, H // 128)),
                              ("x_group_scale", x_group_scale, (M, H // 128))):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != want:
                raise ValueError(f"{OP}: {name} must be a float32 {want} tensor, got "
                                 f"{(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__}")
        v.same_device(OP, x=x, w_block_scale=w_block_scale, x_group_scale=x_group_scale)
        if config is not None:
            ok, why = can_implement(Fc1Problem(M, H, E, I, x.dtype, out_dtype), block_config(config))
            if not ok:
                raise ValueError(f"{OP}: config {config.to_str()} cut to 128-wide tiles cannot run: {why}")
        backend = "triton"
    if expert_ids is not None:
        expert_ids = v.expert_ids(OP, expert_ids, M, E, bool(skip), dev)
        if fill_unpicked:
            raise ValueError(f"{OP}: expert_ids lists the picked experts only; it needs fill_unpicked=False "
                             "(the zeros of the others are written from a full list)")
    if out is None:
        out = torch.empty((M, E * I), dtype=out_dtype, device=dev)
    if M == 0:
        return out
    _fc1_op(x, w1, alpha1, x_scale, alpha_post, out_scale.reshape(1) if out_scale is not None else None,
            routing, out, config.to_str() if config is not None else "", backend, bool(skip), bool(fill_unpicked),
            expert_ids, x_group_scale.contiguous() if x_group_scale is not None else None,
            w_block_scale.contiguous() if w_block_scale is not None else None)
    return out


DYNAMIC_MAX_I = 256  # fc1_fp8_dynamic: the largest I one Triton tile holds


@torch.library.custom_op("densemoe::fc1_fp8_dynamic", mutates_args=("out", "out_scale"))
def _fc1_dyn_op(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, x_scale: torch.Tensor | None,
                alpha_post: torch.Tensor | None, out: torch.Tensor, out_scale: torch.Tensor, config: str) -> None:
    M, H = x.shape
    E = alpha1.shape[0]
    problem = Fc1Problem(M, H, E, w1.shape[0] // (2 * E), x.dtype, v.FP8)
    cfg = Fc1TritonConfig.from_str(config) if config else fc1_configs.default_config_dynamic(problem)
    fc1_triton(x, w1, alpha1, out, cfg, x_scale=x_scale, alpha_post=alpha_post, y_scale=out_scale)


@_fc1_dyn_op.register_fake
def _(x, w1, alpha1, x_scale, alpha_post, out, out_scale, config):
    return None


def fc1_fp8_dynamic(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, *,
                    x_scale: torch.Tensor | None = None, alpha_post: torch.Tensor | None = None,
                    config: Fc1TritonConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FC1 with its output quantised to fp8 in the epilogue, one scale per (token, expert):

        v[m, e*I + i] as in ``fc1`` (fp32, after SwiGLU and alpha_post)
        y_scale[m, e] = amax_i |v[m, e*I + i]| / 448            (1 where all zero)
        y[m, e*I + i] = fp8(clamp(v[m, e*I + i] / y_scale[m, e], +-448))

    FC2 then takes ``alpha * y_scale`` (times w2's dequantisation scale). One Triton program
    holds all of an expert's I, so I <= 256 (DeepSeek-V3 TP8: I = 256); for a larger I use
    ``fc1`` with a bf16 output and ``densemoe.quant.quantize_y_fold_alpha``. The layer does not
    use it (``strategy.quantize_y_in_fc1``): its tiles must hold all of I, which measured slower
    than that pair (``docs/layer.md``).

    Args: as ``fc1`` (x, w1, alpha1, x_scale, alpha_post); ``config`` pins a Fc1TritonConfig
    whose ``block_i`` >= I (default: ``fc1_configs.default_config_dynamic``).
    Returns (y [M, E*I] float8_e4m3fn, y_scale [M, E] float32).
    """
    x, w1, alpha1, x_scale, alpha_post, I, tensors = _check_inputs(x, w1, alpha1, x_scale, alpha_post)
    M, H = x.shape
    E = alpha1.shape[0]
    dev = v.same_device(OP, **tensors)
    v.device_supports(OP, dev, x.dtype)
    v.inference_only(OP, **tensors)
    problem = Fc1Problem(M, H, E, I, x.dtype, v.FP8)
    if config is not None:
        if not isinstance(config, Fc1TritonConfig):
            raise TypeError(f"{OP}: fc1_fp8_dynamic runs the Triton kernel: config must be a Fc1TritonConfig, "
                            f"got {type(config).__name__}")
        ok, why = can_implement(problem, config, dynamic_scale=True)
    else:
        try:
            fc1_configs.default_config_dynamic(problem)
            ok, why = True, ""
        except ValueError as exc:
            ok, why = False, str(exc)
    if not ok:
        raise ValueError(f"{OP}: a dynamic fp8 output cannot run here: {why}")
    out = torch.empty((M, w1.shape[0] // 2), dtype=v.FP8, device=x.device)
    out_scale = torch.empty((M, E), dtype=torch.float32, device=x.device)
    if M:
        _fc1_dyn_op(x, w1, alpha1, x_scale, alpha_post, out, out_scale, config.to_str() if config is not None else "")
    return out, out_scale
