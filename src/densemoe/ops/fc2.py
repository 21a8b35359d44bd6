"""FC2, the dense-MoE down projection: public op, validation, default config, custom op."""

from __future__ import annotations

import dataclasses

import torch

from densemoe.kernels.triton.fc2 import (
    SMEM_BYTES,
    Fc2Problem,
    Fc2TritonConfig,
    can_implement,
    fc2_triton,
)
from densemoe._runtime import sm_count
from densemoe.kernels.triton.skip import DEFAULT_TOP_K
from densemoe.kernels.cute import fc2_sm90 as cute_fc2
from densemoe.kernels.cute.fc2_sm90 import Fc2CuteConfig
from densemoe.ops import _validate as v
from densemoe.tuning import cache as tuning

OP = "densemoe.fc2"
IN_DTYPES = (v.FP8, torch.bfloat16)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
I_MULTIPLE = 32


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# (max M, block_m, block_n, num_warps, swap_ab, ctas_per_sm, split or None = by waves): measured on an H100 at the MISSION
# shapes (docs/fc2-triton.md has the sweeps; docs/tuning.md the tuner's results). Swap-AB keeps the token tile as
# the MMA's N while M is small; from 65 tokens a 64x128 tile with tokens as the MMA's M wins (the
# tuner's pick at M = 96 and 128 on DeepSeek-V3 TP8 fp8 and bf16 and TP4 fp8: 176 us against
# 184-196 us for the previous rows at TP8 fp8 M = 96); past 192 tokens the kernel is compute-bound
# and a 128x128 tile wins.
_TILE_TABLE = (
    (16, 16, 64, 4, True, 1, None),
    (32, 32, 64, 4, True, 1, None),
    (64, 64, 64, 4, True, 1, None),
    (128, 64, 128, 4, False, 1, None),
    (192, 64, 128, 4, False, 2, 0),  # stream-K, two programs per SM
    (None, 128, 128, 8, False, 1, None),
)


def default_config(problem: Fc2Problem, num_sms: int = 132) -> Fc2TritonConfig:
    """Deterministic config choice, no timing: the same problem always gets the same config.

    Tile shape from ``_TILE_TABLE`` by M; the largest k-tile that divides I (256 B per row);
    the deepest load ring (<= 6; 8 measured 2-4% slower at M <= 16) that fits shared memory; and the split of each column tile's
    experts: below one wave of ``num_sms * ctas_per_sm`` tiles, as many expert ranges as keep
    the launch within the wave; above it, stream-K (split=0) when the last wave would be less
    than half full, else one program per tile.
    """
    p = problem
    for max_m, bm, bn, warps, swap, cps, forced_split in _TILE_TABLE:
        if max_m is None or p.m <= max_m:
            break
    block_k = (256 if p.dtype == v.FP8 else 128) // cps
    while p.i % block_k:
        block_k //= 2
    slots = num_sms * cps
    tiles = max(1, -(-p.m // bm) * -(-p.n // bn))
    if forced_split is not None:
        split = forced_split
    elif tiles < slots:
        split = max(1, min(slots // tiles, p.e))
    else:
        rem = tiles % slots
        split = 0 if 0 < rem <= slots // 2 else 1
    stage = (bm + bn) * block_k * p.dtype.itemsize
    stages = max(2, min(6, (SMEM_BYTES // cps - 1024) // stage))
    config = Fc2TritonConfig(bm, bn, block_k, warps, stages, swap, True, split, cps)
    ok, why = can_implement(p, config)
    assert ok, f"default_config produced an invalid config for {p}: {why}"
    return config


# Expert skipping: "auto" (skip=None) skips while the share of experts that M tokens are expected
# to pick (uniform top-k routing) stays at or below SKIP_MAX_SHARE; above, the dense schedule
# runs. Measured on the H100 (fp8 layer, bench/results/layer_h100_2026-11-26.md): DeepSeek-V3
# TP8 at M = 64 (87% of 256 experts picked) is 11% faster with skipping (457 against 514 us);
# Qwen3-30B-A3B at M = 32 (87% of 128) and 64 (98%) was 5% and 30% slower.
SKIP_MAX_SHARE = 0.87
SKIP_TOP_K = DEFAULT_TOP_K  # the top-k assumed when the caller does not say (one constant for kernels and ops)


def expected_share(m: int, e: int, top_k: int = SKIP_TOP_K) -> float:
    """Expected share of E experts picked by at least one of m tokens (uniform top-k)."""
    return 1.0 - (1.0 - min(1.0, top_k / max(e, 1))) ** max(m, 0)


def skip_by_default(m: int, e: int, top_k: int = SKIP_TOP_K) -> bool:
    """The rule behind skip=None: skip while ``expected_share(m, e, top_k) <= SKIP_MAX_SHARE``
    (top-8 of 256: M <= 64; of 128: M <= 31)."""
    return expected_share(m, e, top_k) <= SKIP_MAX_SHARE


def default_skip_config(problem: Fc2Problem, num_sms: int = 132) -> Fc2TritonConfig:
    """The Triton config for FC2 with expert skipping: the dense rule's tile; each column tile's
    picked experts in one program up to M = 2 (no workspace, no atomics), in two halves above.
    Measured on the H100 (TP8 fp8, uniform top-8, ``bench/experiments/skip_variants.py``):
    M = 1: 12.2 us (one program per tile) against 14.2 (halves) and 15.2 (stream-K);
    M = 8: 46.5 (halves) against 47.3 and 50.0; M = 64: 155.4 against 184.8 and 170.5. Up to
    M = 2, 8 stages where they fit (``bench/experiments/skip_sweep.py``: 12.3 against 12.6 us at
    M = 1, 17.6 against 18.1 at M = 2; 6 stays better from M = 4)."""
    cfg = dataclasses.replace(default_config(problem, num_sms), split=1 if problem.m <= 2 else 2)
    if problem.m <= 2:
        deeper = dataclasses.replace(cfg, num_stages=max(cfg.num_stages, 8))
        if can_implement(problem, deeper)[0]:
            cfg = deeper
    return cfg


# CuTe DSL backend: (max M, k-tile bytes per row, Fc2CuteConfig fields), the fastest CuTe configs
# per M bucket measured on an H100 at DeepSeek-V3 TP8 fp8 (bench/experiments/cute_sweep.py;
# docs/fc2-cute.md). Up to M = 128 tokens are wgmma's N (swap-AB); above, tokens are wgmma's M
# in a 128 x 192 tile with the experts visited in lock step across clusters (M = 512: 450 us
# against 552 us without lockstep); cluster_m = 2 (weights multicast to two token tiles) when
# the number of 128-token tiles is even, else 1 (a 3-tile M = 384 wastes a quarter with pairs:
# 440 us against 362 us).
_CUTE_TABLE = (
    (16, 256, dict(tile_n=128, tile_m=16, consumers=1, acc_buffers=2, cluster_n=2, cluster_m=1)),
    (32, 256, dict(tile_n=64, tile_m=32, consumers=1, acc_buffers=1, cluster_n=2, cluster_m=1)),
    (64, 256, dict(tile_n=64, tile_m=64, consumers=1, acc_buffers=1, cluster_n=2, cluster_m=1)),
    (96, 256, dict(tile_n=64, tile_m=96, consumers=1, acc_buffers=1, cluster_n=1, cluster_m=1)),
    (128, 256, dict(tile_n=64, tile_m=128, consumers=1, acc_buffers=1, cluster_n=1, cluster_m=1)),
    (None, 128, dict(tile_n=192, tile_m=128, consumers=2, acc_buffers=1, cluster_n=1, cluster_m=0,
                     swap_ab=0, lockstep=1)),  # cluster_m=0: 2 or 1 by the token-tile count
)
# Where "auto" picks CuTe: (N, E, I, dtype) -> M buckets (lo, hi] (hi None: no upper bound),
# measured on an H100 (_CUTE_WINS_SOURCE, each backend's default timed in one run). At every
# measured point where one default is at least 3% faster, the table picks it; inside that band
# either pick stands (the same config measured 1-3% apart between the tuner's and the
# benchmark's runs). tests/test_fc2_cute.py checks this against the file point by point. A bucket
# reaches down to the previous sweep point. Above M = 512 (not measured) CuTe stays chosen where it
# won at 256..512: both backends are compute-bound there and CuTe's lead grew with M on every
# shape. Unmeasured shapes stay on Triton.
_CUTE_WINS_SOURCE = "bench/results/fc2_h100_2026-11-26_tuned.json.gz"
_CUTE_WINS = {
    (7168, 256, 256, v.FP8): ((192, None),),
    (7168, 256, 256, torch.bfloat16): ((128, None),),
    (7168, 256, 512, v.FP8): ((128, None),),
    (7168, 256, 512, torch.bfloat16): ((128, None),),
    (2048, 128, 768, v.FP8): ((256, None),),
    (2048, 128, 768, torch.bfloat16): ((256, None),),
}


def default_cute_config(problem: Fc2Problem) -> Fc2CuteConfig:
    """Deterministic CuTe config: tile by M from ``_CUTE_TABLE``, deepest ring, one wave.
    Raises ValueError when no CuTe config fits (an expert's k-slice below 128 bytes)."""
    p = problem
    if (p.i * p.dtype.itemsize) % 128:
        raise ValueError(f"the CuTe kernel needs I * element size to be a multiple of 128 bytes "
                         f"(k-tiles of 128B swizzle atoms); I={p.i} {p.dtype} gives {p.i * p.dtype.itemsize}")
    for max_m, k_bytes, fields in _CUTE_TABLE:
        if max_m is None or p.m <= max_m:
            break
    tk = k_bytes // p.dtype.itemsize
    while p.i % tk and tk * p.dtype.itemsize > 128:
        tk //= 2
    if fields["cluster_m"] == 0:
        fields = dict(fields, cluster_m=2 if -(-p.m // fields["tile_m"]) % 2 == 0 else 1)
    cfg = Fc2CuteConfig(tile_k=tk, **fields)
    if not cute_fc2.can_implement(p, cfg)[0]:  # e.g. too few stages for two temporaries
        cfg = dataclasses.replace(cfg, acc_buffers=1)
    ok, why = cute_fc2.can_implement(p, cfg)
    assert ok, f"default_cute_config produced an invalid config for {p}: {why}"
    return cfg


def cute_preferred(problem: Fc2Problem) -> bool:
    """The measured rule: does "auto" prefer the CuTe backend for this problem?"""
    p = problem
    return any(lo < p.m and (hi is None or p.m <= hi) for lo, hi in _CUTE_WINS.get((p.n, p.e, p.i, p.dtype), ()))


BACKENDS = ("auto", "triton", "cute")


def _parse_config(config: str):
    return Fc2CuteConfig.from_str(config) if config.startswith("cute:") else Fc2TritonConfig.from_str(config)


def _heuristic(problem: Fc2Problem, a, w, alpha, out, backend: str):
    """(backend, config) from the deterministic rules alone: no tuned table, no timing."""
    if backend in ("auto", "cute"):
        ok, why = cute_fc2.runtime_ok(a, w, alpha, out)
        if ok:
            try:
                cfg = default_cute_config(problem)
            except ValueError as exc:
                ok, why = False, str(exc)
        if ok and (backend == "cute" or cute_preferred(problem)):
            return "cute", cfg
        if backend == "cute":
            raise ValueError(f"{OP}: backend='cute' cannot run this call: {why}")
    return "triton", default_config(problem, sm_count(a.device))


def _tuned(problem: Fc2Problem, a, w, alpha, out, backend: str):
    """(backend, config, source) from the tuned tables (source "cache" for the user's, else
    "shipped"), or None. With
    DENSEMOE_AUTOTUNE=1 a missing key on a CUDA device is tuned first (not while a CUDA graph
    is being captured: capture never starts tuning)."""
    if not tuning.tuned_lookups_enabled():
        return None
    key = tuning.make_key("fc2", tuning.device_name(a.device), problem)
    entry, where = tuning.lookup(key)
    if (entry is None and tuning.autotune_enabled() and a.device.type == "cuda"
            and not torch.cuda.is_current_stream_capturing()):
        from densemoe.tuning.tuner import tune_problem

        tune_problem(problem, a.device, save=True)
        entry, where = tuning.lookup(key)
    if entry is None:
        return None
    slots = ("best", "triton") if backend == "auto" else (backend,)
    for slot in slots:
        item = entry.get(slot)
        if not item:
            continue
        try:
            cfg = _parse_config(item["config"])
        except Exception as exc:  # noqa: BLE001 - any malformed entry: warn, fall back
            tuning.warn_stale(key, f"config {item.get('config')!r} does not parse ({type(exc).__name__}: {exc})")
            return None
        if cfg.backend == "cute" and not cute_fc2.runtime_ok(a, w, alpha, out)[0]:
            continue  # fine on the tuning machine, not for these tensors here: next slot
        ok, why = (cute_fc2.can_implement if cfg.backend == "cute" else can_implement)(problem, cfg)
        if ok:
            return cfg.backend, cfg, where
        tuning.warn_stale(key, f"config {item['config']!r} does not fit this problem ({why})")
    return None


def _choose(a, w, alpha, out, config: str, backend: str):
    """(backend, config object) for one call (see ``_choose_src``)."""
    return _choose_src(a, w, alpha, out, config, backend)[:2]


def _choose_src(a, w, alpha, out, config: str, backend: str, skip: bool = False):
    """(backend, config object, source) for one call: the pinned config (source "pinned"), else
    the tuned entry for this problem's key ("cache" / "shipped"), else the deterministic
    heuristic ("heuristic"). With ``skip`` (Triton only): the pinned config or
    ``default_skip_config`` ("heuristic"). Raises when a forced backend cannot run."""
    problem = _problem(a, w, alpha, out)
    if skip:
        if config:
            return "triton", _parse_config(config), "pinned"
        return "triton", default_skip_config(problem, sm_count(a.device)), "heuristic"
    if config:
        cfg = _parse_config(config)
        if cfg.backend == "cute":
            ok, why = cute_fc2.runtime_ok(a, w, alpha, out)
            if not ok:
                raise ValueError(f"{OP}: backend='cute' cannot run this call: {why}")
        return cfg.backend, cfg, "pinned"
    return _tuned(problem, a, w, alpha, out, backend) or (*_heuristic(problem, a, w, alpha, out, backend), "heuristic")


def _problem(a: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor) -> Fc2Problem:
    M, K = a.shape
    E = alpha.shape[1]
    return Fc2Problem(M, w.shape[0], E, K // E, a.dtype, out.dtype)


@torch.library.custom_op("densemoe::fc2", mutates_args=("out",))
def _fc2_op(a: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor,
            config: str, backend: str, skip: bool, w_scale: torch.Tensor | None,
            expert_ids: torch.Tensor | None = None) -> None:
    if skip:
        _, cfg, _ = _choose_src(a, w, alpha, out, config, backend, skip=True)
        fc2_triton(a, w, alpha, out, cfg, skip=True, w_scale=w_scale, expert_ids=expert_ids)
        return
    which, cfg = _choose(a, w, alpha, out, config, backend)
    if which == "cute":  # the CuTe kernel has no per-expert factor: fold it into alpha here
        cute_fc2.fc2_cute(a, w, alpha * w_scale[None, :] if w_scale is not None else alpha, out, cfg)
    else:
        fc2_triton(a, w, alpha, out, cfg, w_scale=w_scale)


@_fc2_op.register_fake
def _(a, w, alpha, out, config, backend, skip, w_scale, expert_ids=None):
    return None


def _resolve_skip(skip: bool | None, m: int, e: int, backend: str, config) -> bool:
    """skip=None -> the rule (``skip_by_default``), off where the CuTe backend is asked for."""
    if skip is None:
        wants_cute = backend == "cute" or (config is not None and config.backend == "cute")
        return skip_by_default(m, e) and not wants_cute
    if skip and (backend == "cute" or (config is not None and config.backend == "cute")):
        raise ValueError(f"{OP}: expert skipping (skip=True) runs on the Triton kernel; "
                         "backend='cute' or a CuTe config cannot skip")
    return bool(skip)


def which_backend(a: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor,
                  config=None, backend: str = "auto", with_source: bool = False, skip: bool | None = False):
    """The (backend, config) ``fc2`` would use for these tensors (for logs and benchmarks);
    with ``with_source`` also where the config came from: "pinned", "cache" (the user's tuned
    cache), "shipped" (the package's tuned tables) or "heuristic". ``skip`` as in ``fc2``
    (default False here: the dense choice)."""
    sk = _resolve_skip(skip, a.shape[0], alpha.shape[1], backend, config)
    which = _choose_src(a, w, alpha, out, config.to_str() if config is not None else "", backend, sk)
    return which if with_source else which[:2]


def fc2(a: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, *,
        out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
        config: Fc2TritonConfig | Fc2CuteConfig | None = None, backend: str = "auto",
        skip: bool | None = None, w_scale: torch.Tensor | None = None,
        expert_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Dense-MoE FC2 (down projection) over all experts with a per-token, per-expert scale.

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
               ``Fc2CuteConfig`` (which also picks the backend); default: the backend's
               deterministic rule (``default_config`` / ``default_cute_config``).
        backend: "auto" (default): the CuTe DSL sm_90a kernel where it can run and is the
               measured winner for this M, else Triton; "triton" or "cute" forces one
               ("cute" raises if it cannot run: no CuTe DSL, not sm_90, strided a/w).
        skip:  expert skipping (Triton kernel, work lists built on the GPU, no host sync).
               None (default): on while ``skip_by_default(M, E)`` (top-8 of 256 experts:
               M <= 64; of 128: M <= 31) unless the CuTe backend is asked for; True:
               always (raises with backend="cute"); False: the dense path.
        w_scale: optional [E] float32: a per-expert factor (w's dequantisation scale)
               multiplied into alpha in the Triton kernel (no separate pass over alpha; the
               CuTe backend gets alpha * w_scale). It is a load per k-tile: at small M (with
               skipping) it saves a launch, on the dense path at large M it cost 8% on the H100
               (TP8 bf16 M = 96), where passing alpha * w_scale is the faster form.
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
    if torch.is_grad_enabled() and (a.requires_grad or w.requires_grad or alpha.requires_grad
                                    or (w_scale is not None and w_scale.requires_grad)):
        raise ValueError(f"{OP} is inference-only (no backward); call it under torch.no_grad() "
                         "or on tensors that do not require grad")
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
    if skip not in (None, True, False):
        raise TypeError(f"{OP}: skip must be None, True or False, got {skip!r}")
    skip = _resolve_skip(skip, M, E, backend, config)
    if expert_ids is not None:
        expert_ids = v.expert_ids(OP, expert_ids, M, E, skip, dev)
    if M == 0 or N == 0:
        return out
    torch.ops.densemoe.fc2(a, w, alpha, out, config.to_str() if config is not None else "",
                           backend, skip, w_scale, expert_ids)
    return out


def _opt(**tensors):
    """The optional tensors that are given (for the one-device check)."""
    return {k: t for k, t in tensors.items() if t is not None}
