"""FC1, the dense-MoE gate/up projection with SwiGLU fused: public op, validation, custom op."""

from __future__ import annotations

import torch

from densemoe.kernels.triton.fc1 import Fc1Problem, Fc1TritonConfig, can_implement, default_config, fc1_triton
from densemoe.ops import _validate as v
from densemoe.tuning import cache as tuning

OP = "densemoe.fc1"
IN_DTYPES = (v.FP8, torch.bfloat16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, v.FP8)


def _choose_src(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, out: torch.Tensor, config: str):
    """(config, source) for one call: pinned, else the tuned entry for the problem's key (the
    user's cache, then the shipped tables), else ``default_config``."""
    M, H = x.shape
    E = alpha1.shape[0]
    problem = Fc1Problem(M, H, E, w1.shape[0] // (2 * E), x.dtype, out.dtype)
    if config:
        return Fc1TritonConfig.from_str(config), "pinned"
    if tuning.tuned_lookups_enabled():
        key = tuning.make_key("fc1", tuning.device_name(x.device), problem)
        entry, where = tuning.lookup(key)
        item = (entry or {}).get("best")
        if item:
            try:
                cfg = Fc1TritonConfig.from_str(item["config"])
            except Exception as exc:  # noqa: BLE001 - any malformed entry: warn, fall back
                tuning.warn_stale(key, f"config {item.get('config')!r} does not parse ({type(exc).__name__}: {exc})")
            else:
                ok, why = can_implement(problem, cfg)
                if ok:
                    return cfg, where
                tuning.warn_stale(key, f"config {item['config']!r} does not fit this problem ({why})")
    return default_config(problem), "heuristic"


def which_config(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, out: torch.Tensor,
                 config: Fc1TritonConfig | None = None) -> tuple[Fc1TritonConfig, str]:
    """The (config, source) ``fc1`` would use for these tensors (for logs and benchmarks)."""
    return _choose_src(x, w1, alpha1, out, config.to_str() if config is not None else "")


@torch.library.custom_op("densemoe::fc1", mutates_args=("out",))
def _fc1_op(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, x_scale: torch.Tensor | None,
            alpha_post: torch.Tensor | None, out_scale: torch.Tensor | None, out: torch.Tensor, config: str) -> None:
    cfg, _ = _choose_src(x, w1, alpha1, out, config)
    fc1_triton(x, w1, alpha1, out, cfg, x_scale=x_scale, alpha_post=alpha_post, out_scale=out_scale)


@_fc1_op.register_fake
def _(x, w1, alpha1, x_scale, alpha_post, out_scale, out, config):
    return None


def fc1(x: torch.Tensor, w1: torch.Tensor, alpha1: torch.Tensor, *,
        x_scale: torch.Tensor | None = None, alpha_post: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None, out_scale: torch.Tensor | None = None,
        out: torch.Tensor | None = None, config: Fc1TritonConfig | None = None) -> torch.Tensor:
    """Dense-MoE FC1 (gate/up projection) over all experts with SwiGLU fused.

        s       = alpha1[e] * x_scale[m]                       (x_scale: 1 when None)
        g[m, i] = s * sum_k x[m, k] * w1[e*2I + i, k]          gate rows of expert e
        u[m, i] = s * sum_k x[m, k] * w1[e*2I + I + i, k]      up rows of expert e
        y[m, e*I + i] = silu(g) * u * alpha_post[m, e]         (alpha_post: 1 when None)
        fp8 output: y = clamp(y / out_scale, -448, 448).to(float8_e4m3fn)

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
        config:     pin a ``Fc1TritonConfig``; default: a tuned entry for this problem if one
                    exists (``densemoe.tune("fc1", ...)``, shipped tables), else ``default_config``.

    Returns:
        y [M, E*I], ready to be FC2's ``a``.

    Constraints (anything else raises TypeError/ValueError naming the argument): E >= 1,
    w1.shape[0] = 2*E*I with I >= 1, w1.shape[1] = H; tensors on one CUDA device (CPU only
    under TRITON_INTERPRET=1). Inference only.
    """
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
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        raise ValueError(f"{OP} is inference-only (no backward); call it under torch.no_grad()")
    if config is not None:
        if not isinstance(config, Fc1TritonConfig):
            raise TypeError(f"{OP}: config must be a Fc1TritonConfig, got {type(config).__name__}")
        ok, why = can_implement(Fc1Problem(M, H, E, I, x.dtype, out_dtype), config)
        if not ok:
            raise ValueError(f"{OP}: config {config.to_str()} cannot run: {why}")
    if out is None:
        out = torch.empty((M, E * I), dtype=out_dtype, device=dev)
    if M == 0:
        return out
    _fc1_op(x, w1, alpha1, x_scale, alpha_post, out_scale.reshape(1) if out_scale is not None else None,
            out, config.to_str() if config is not None else "")
    return out
