"""FC2, the dense-MoE down projection: the public op, its argument checks and its custom op.

Which backend and config run a call is ``fc2_configs.choose``'s answer; whether to skip experts,
``strategy.resolve_skip``'s.
"""

from __future__ import annotations

import dataclasses

import torch

from densemoe.kernels.common import I_MULTIPLE, Fc2Problem
from densemoe.kernels.cute import fc2_sm90 as cute_fc2
from densemoe.kernels.cute.fc2_sm90 import Fc2CuteConfig
from densemoe.kernels.triton.fc2 import Fc2TritonConfig, can_implement, fc2_triton
from densemoe.ops import _validate as v
from densemoe.ops import fc2_configs, strategy
from densemoe.ops.fc2_configs import BACKENDS, OP

IN_DTYPES = (v.FP8, torch.bfloat16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _problem(a: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor) -> Fc2Problem:
    M, K = a.shape
    E = alpha.shape[1]
    return Fc2Problem(M, w.shape[0], E, K // E, a.dtype, out.dtype)


def _choose(a, w, alpha, out, config, backend: str, skip: bool):
    """``fc2_configs.choose`` for these tensors (the CuTe kernel's tensor rules checked on them)."""
    return fc2_configs.choose(_problem(a, w, alpha, out), a.device, backend=backend, config=config, skip=skip,
                              cute_check=lambda: cute_fc2.runtime_ok(a, w, alpha, out))


@torch.library.custom_op("densemoe::fc2", mutates_args=("out",))
def _fc2_op(a: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor,
            config: str, backend: str, skip: bool, w_scale: torch.Tensor | None,
            expert_ids: torch.Tensor | None = None, w_block_scale: torch.Tensor | None = None) -> None:
    which, cfg, _ = _choose(a, w, alpha, out, fc2_configs.parse_config(config) if config else None, backend, skip)
    if w_block_scale is not None:  # the Triton kernel (backend forced by fc2), tiles within a scale block
        fc2_triton(a, w, alpha, out, block_config(cfg, _problem(a, w, alpha, out)), skip=skip, w_scale=w_scale,
                   expert_ids=expert_ids, w_block_scale=w_block_scale)
        return
    if skip:
        fc2_triton(a, w, alpha, out, cfg, skip=True, w_scale=w_scale, expert_ids=expert_ids)
    elif which == "cute":  # the CuTe kernel has no per-expert factor: fold it into alpha here
        cute_fc2.fc2_cute(a, w, alpha * w_scale[None, :] if w_scale is not None else alpha, out, cfg)
    else:
        fc2_triton(a, w, alpha, out, cfg, w_scale=w_scale)


@_fc2_op.register_fake
def _(a, w, alpha, out, config, backend, skip, w_scale, expert_ids=None, w_block_scale=None):
    return None


def block_config(cfg: Fc2TritonConfig, problem: Fc2Problem | None = None) -> Fc2TritonConfig:
    """``cfg`` with its tile cut to fit one 128 x 128 weight-scale block (block_n and block_k at
    most 128: powers of two, so they divide it). With ``problem``, the load ring deepened by as
    much as each stage shrank, as far as ``can_implement`` allows (as FC1's ``block_config``)."""
    cut = dataclasses.replace(cfg, block_n=min(cfg.block_n, 128), block_k=min(cfg.block_k, 128))
    if problem is None:
        return cut
    grow = ((cfg.block_m + cfg.block_n) * cfg.block_k) // ((cut.block_m + cut.block_n) * cut.block_k)
    for stages in range(min(8, cfg.num_stages * grow), cfg.num_stages, -1):
        deeper = dataclasses.replace(cut, num_stages=stages)
        if can_implement(problem, deeper)[0]:
            return deeper
    return cut


def _skip_blocker(backend: str, config) -> str | None:
    """Why expert skipping cannot run with this backend / config, or None."""
    if backend == "cute" or (config is not None and config.backend == "cute"):
        return "it runs on the Triton kernel; backend='cute' or a CuTe config cannot skip"
    return None


def which_backend(a: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor,
                  config=None, backend: str = "auto", with_source: bool = False, skip: bool | None = False):
    """``fc2_configs.choose`` for these tensors, as ``fc2`` would call it: (backend, config), with
    ``with_source`` also where the config came from ("pinned", "cache", "shipped" or
    "heuristic"). ``skip`` as in ``fc2`` (default False here: the dense choice)."""
    sk = strategy.resolve_skip(OP, skip, a.shape[0], alpha.shape[1], blocker=_skip_blocker(backend, config))
    which = _choose(a, w, alpha, out, config, backend, sk)
    return tuple(which) if with_source else tuple(which[:2])


def fc2(a: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, *,
        out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
        config: Fc2TritonConfig | Fc2CuteConfig | None = None, backend: str = "auto",
        skip: bool | None = None, w_scale: torch.Tensor | None = None,
        expert_ids: torch.Tensor | None = None, w_block_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Dense-MoE FC2 (down projection) over all experts with a per-token, per-expert scale.
    ``w_block_scale`` [N/128, K/128] float32 (128 x 128 block-scaled fp8 w,
    ``PreparedWeights.w2_block_scale``): every k-step's products are scaled by alpha and their
    block's scale in fp32; Triton only, the config's tile cut to 128 where larger.

        out[m, n] = sum_e alpha[m, e] * sum_{i < I} a[m, e*I + i] * w[n, e*I + i]
        E = alpha.shape[1], I = a.shape[1] // E
        (times ``w_scale[e]`` on alpha[m, e] when given)

    With expert skipping the sum runs over the experts with alpha[m, e] != 0 only: a token tile
    never reads the weights (or ``a``) of experts none of its tokens picked, and what ``a``
    holds where alpha is 0 does not matter (it is never read there, or weighted out).

    Args:
        a:     [M, E*I] float8_e4m3fn or bfloat16: the activations (FC1's output).
        w:     [N, E*I] same dtype as ``a``: each expert's [N, I] down projection side by side
               along K (K-major).
        alpha: [M, E] float32: routing weight x dequantisation scales; 0 where token m did not
               pick expert e. Applied in fp32 to each expert's partial sum, per token row.
        out_dtype: bfloat16 (default), float16 or float32.
        out:   optional [M, N] tensor of ``out_dtype`` to write into (unit column stride).
        config: pin a kernel config (tests, tuning): a ``Fc2TritonConfig`` or a
               ``Fc2CuteConfig`` (which also picks the backend); default: a tuned entry for
               this problem if one exists, else the backend's deterministic rule
               (``fc2_configs.choose``).
        backend: "auto" (default): the CuTe DSL sm_90a kernel where it can run and is the
               measured winner for this M, else Triton; "triton" or "cute" forces one
               ("cute" raises if it cannot run: no CuTe DSL, not sm_90, strided a/w).
        skip:  expert skipping (Triton kernel, work lists built on the GPU, no host sync).
               None (default): on while ``strategy.skip_by_default(M, E)`` (top-8 of 256
               experts: M <= 64; of 128: M <= 31) unless the CuTe backend is asked for; True:
               always (raises with backend="cute"); False: the dense path.
        w_scale: optional [E] float32: a per-expert factor (w's dequantisation scale)
               multiplied into alpha in the Triton kernel (no separate pass over alpha; the
               CuTe backend gets alpha * w_scale). It is a load per k-tile: at small M (with
               skipping) it saves a launch; on the dense path at large M passing
               alpha * w_scale is the faster form (docs/layer.md).
        expert_ids: [k] or [1, k] integer, optional, with skipping at M = 1: the token's picked
               experts (its top-k ids: distinct, in [0, E), not checked on the device; a
               repeated id would count that expert twice), walked instead of a list built from
               alpha at the kernel's start. Experts with alpha 0 among them add nothing.

    Returns:
        out [M, N].

    Constraints (anything else raises TypeError/ValueError naming the argument):
        * E >= 1, K = a.shape[1] = w.shape[1] a multiple of E, and I = K / E a multiple of 32.
        * any M >= 0 (M = 0 returns an empty tensor) and any N >= 0.
        * all tensors on one CUDA device (sm_89+ for fp8, sm_80+ for bf16); CPU tensors only
          under TRITON_INTERPRET=1.
        * any strides are accepted. The fast path (TMA, sm_90+) needs a and w with unit column
          stride, 16-byte aligned row stride and base; other layouts run a slower pointer path.
          Nothing is copied.
    Inference only: inputs that require grad (with grad mode on) are rejected.
    Not bit-reproducible when a column tile is split across programs (fp32 atomics).
    """
    a = v.tensor(OP, "a", a, 2)
    w = v.tensor(OP, "w", w, 2)
    alpha = v.tensor(OP, "alpha", alpha, 2)
    v.dtype(OP, "a", a, IN_DTYPES)
    if w.dtype != a.dtype:
        raise TypeError(f"{OP}: w must have a's dtype ({v.dtype_name(a.dtype)}), got {v.dtype_name(w.dtype)}")
    v.dtype(OP, "alpha", alpha, (torch.float32,))
    M, K = a.shape
    N = w.shape[0]
    E = alpha.shape[1]
    if w.shape[1] != K:
        raise ValueError(f"{OP}: w has K={w.shape[1]} columns but a has K={K}; both must be E*I")
    if alpha.shape[0] != M:
        raise ValueError(f"{OP}: alpha has {alpha.shape[0]} rows, expected M={M} (a.shape[0])")
    if E < 1:
        raise ValueError(f"{OP}: alpha must have E >= 1 columns (one per expert), got shape {tuple(alpha.shape)}")
    if K == 0 or K % E:
        raise ValueError(f"{OP}: K={K} (a.shape[1]) must be a positive multiple of E={E} (alpha.shape[1])")
    I = K // E
    if I % I_MULTIPLE:
        raise ValueError(f"{OP}: I = K / E = {K} / {E} = {I} per expert must be a multiple of {I_MULTIPLE}")
    if w_scale is not None:
        w_scale = v.tensor(OP, "w_scale", w_scale, 1)
        v.dtype(OP, "w_scale", w_scale, (torch.float32,))
        if w_scale.shape[0] != E:
            raise ValueError(f"{OP}: w_scale must be [E={E}], got {tuple(w_scale.shape)}")
        w_scale = w_scale.contiguous()
    if out is not None:
        out = v.tensor(OP, "out", out, 2)
        if out_dtype is not None and out.dtype != out_dtype:
            raise TypeError(f"{OP}: out has dtype {v.dtype_name(out.dtype)} but out_dtype={v.dtype_name(out_dtype)}")
        v.dtype(OP, "out", out, OUT_DTYPES)
        if tuple(out.shape) != (M, N):
            raise ValueError(f"{OP}: out has shape {tuple(out.shape)}, expected (M, N) = ({M}, {N})")
        bad_cols = N > 1 and out.stride(1) != 1
        bad_rows = M > 1 and out.stride(0) < N
        if bad_cols or bad_rows:
            raise ValueError(f"{OP}: out must have unit column stride and non-overlapping rows, "
                             f"got strides {tuple(out.stride())}")
        dev = v.same_device(OP, a=a, w=w, alpha=alpha, out=out, **_opt(w_scale=w_scale))
    else:
        out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
        if out_dtype not in OUT_DTYPES:
            raise TypeError(f"{OP}: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
        dev = v.same_device(OP, a=a, w=w, alpha=alpha, **_opt(w_scale=w_scale))
        out = torch.empty((M, N), dtype=out_dtype, device=dev)
    v.device_supports(OP, dev, a.dtype)
    v.inference_only(OP, a=a, w=w, alpha=alpha, w_scale=w_scale)
    if backend not in BACKENDS:
        raise ValueError(f"{OP}: backend must be one of {BACKENDS}, got {backend!r}")
    if config is not None:
        if not isinstance(config, (Fc2TritonConfig, Fc2CuteConfig)):
            raise TypeError(f"{OP}: config must be a Fc2TritonConfig or Fc2CuteConfig, got {type(config).__name__}")
        if backend != "auto" and backend != config.backend:
            raise ValueError(f"{OP}: config is a {config.backend} config but backend={backend!r}")
        check = cute_fc2.can_implement if config.backend == "cute" else can_implement
        ok, why = check(Fc2Problem(M, N, E, I, a.dtype, out.dtype), config)
        if not ok:
            raise ValueError(f"{OP}: config {config} cannot run this problem: {why}")
    if w_block_scale is not None:
        if backend == "cute" or (config is not None and config.backend == "cute"):
            raise ValueError(f"{OP}: block-scaled w runs on the Triton kernel; backend='cute' or a CuTe config "
                             "cannot take it")
        want = (N // 128, K // 128)
        if a.dtype != v.FP8 or N % 128 or I % 128:
            raise ValueError(f"{OP}: block-scaled w needs fp8 a and w with N and I multiples of 128 "
                             f"(got {v.dtype_name(a.dtype)}, N={N}, I={I})")
        if not isinstance(w_block_scale, torch.Tensor) or w_block_scale.dtype != torch.float32 \
                or tuple(w_block_scale.shape) != want:
            raise ValueError(f"{OP}: w_block_scale must be a float32 {want} tensor, got "
                             f"{(tuple(w_block_scale.shape), w_block_scale.dtype) if isinstance(w_block_scale, torch.Tensor) else type(w_block_scale).__name__}")
        v.same_device(OP, a=a, w_block_scale=w_block_scale)
        if config is not None:
            ok, why = can_implement(Fc2Problem(M, N, E, I, a.dtype, out.dtype), block_config(config))
            if not ok:
                raise ValueError(f"{OP}: config {config} cut to 128-wide tiles cannot run: {why}")
        backend = "triton"
        w_block_scale = w_block_scale.contiguous()
    skip = strategy.resolve_skip(OP, skip, M, E, blocker=_skip_blocker(backend, config))
    if expert_ids is not None:
        expert_ids = v.expert_ids(OP, expert_ids, M, E, skip, dev)
    if M == 0 or N == 0:
        return out
    torch.ops.densemoe.fc2(a, w, alpha, out, config.to_str() if config is not None else "",
                           backend, skip, w_scale, expert_ids, w_block_scale)
    return out


def _opt(**tensors):
    """The optional tensors that are given (for the one-device check)."""
    return {k: t for k, t in tensors.items() if t is not None}
