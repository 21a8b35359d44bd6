"""What the tuner needs to know about each tunable op, in one place per op.

A ``TunedOp`` says how to build the op's problem for a model shape and token count, list its
search space, make inputs, run one config, compute the reference, and what the heuristic picks.
The tuner, the precompiler and the CLI work through these only, so a new op (or backend) is one
more entry in ``OPS``.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import torch

from densemoe.kernels.triton.fc1 import Fc1Problem, Fc1TritonConfig
from densemoe.kernels.triton.fc1 import can_implement as fc1_can_implement
from densemoe.kernels.triton.fc2 import Fc2Problem


@dataclasses.dataclass(frozen=True)
class TunedOp:
    name: str
    problem: Callable      # (m, shape: MoEShape-like with hidden/experts/inter, dtype, out_dtype) -> problem
    space: Callable        # (problem, backends, num_sms) -> [config]
    make_inputs: Callable  # (problem, device, seed, shared or None) -> (inputs tuple, shared)
    make_out: Callable     # (problem, device) -> out tensor
    run: Callable          # (inputs, out, config) -> None
    reference: Callable    # (inputs) -> fp32 reference of out
    heuristic: Callable    # (problem, inputs, out) -> config


# ------------------------------------------------------------------------------------------ fc2

def _fc2_inputs(p, device, seed, shared):
    from densemoe.tuning.tuner import make_inputs

    a, w, alpha = make_inputs(p, device, seed=seed, w=shared)
    return (a, w, alpha), w


def _fc2_run(inputs, out, cfg):
    import densemoe

    a, w, alpha = inputs
    densemoe.fc2(a, w, alpha, out=out, config=cfg, skip=False)


def _fc2_ref(inputs):
    from densemoe.reference import fc2_ref

    a, w, alpha = inputs
    return fc2_ref(a, w, alpha, torch.float32, compute_dtype=torch.float32)


def _fc2_heuristic(p, inputs, out):
    from densemoe.ops.fc2 import _heuristic

    a, w, alpha = inputs
    return _heuristic(p, a, w, alpha, out, "auto")[1]


def _fc2_space(p, backends, sms):
    from densemoe.tuning.space import fc2_space

    return fc2_space(p, backends, sms)


FC2 = TunedOp(
    "fc2",
    problem=lambda m, s, dtype, out_dtype: Fc2Problem(m, s.hidden, s.experts, s.inter, dtype, out_dtype),
    space=_fc2_space,
    make_inputs=_fc2_inputs,
    make_out=lambda p, device: torch.empty(p.m, p.n, dtype=p.out_dtype, device=device),
    run=_fc2_run, reference=_fc2_ref, heuristic=_fc2_heuristic)


# ------------------------------------------------------------------------------------------ fc1

def fc1_space(problem: Fc1Problem, backends=("triton",), num_sms: int = 132) -> list:
    """FC1 tactics, in a fixed order, each passing its backend's ``can_implement``.

    Triton: orientation x token tile x tile of I x k-tile x warps; the pipeline depth is 4 (3
    where 4 stages of both operands would not fit shared memory), and also the depth at which
    two programs share an SM where that is 2 or more and shallower; above M = 128 the tokens-as-M
    tiles also as one persistent program per SM; the heuristic's choice first.
    CuTe DSL (sm_90a), always the deepest ring and one CTA per SM (whole clusters):
    swap-AB up to M = 128 (token tile from ``_token_tiles``, tile of I 64/128, k-tile 128/256
    bytes, 1 or 2 consumer warpgroups) and tokens as wgmma's M from M = 64 (64 or 128 tokens,
    tile of I 64/128, both k-tiles); then the same with ``cluster_n=2`` (the token tile
    multicast to two CTAs on neighbouring tiles of I; swap-AB: tile of I 64 with one consumer
    or 128 with two; tokens as M: two consumers above M = 64); above M = 128 also 256-token
    tiles (two 64-row atoms per consumer, tile of I 64/96) alone, with ``cluster_n=2`` and,
    where there are two or more such tiles, ``cluster_m=2``, and the 128-token tiles with
    ``cluster_m=2`` (the weight tile multicast to two token tiles) and with both. At most 30
    CuTe tactics per M bucket."""
    from densemoe.kernels.cute import fc1_sm90 as cute_fc1
    from densemoe.kernels.triton.fc1 import default_config
    from densemoe.tuning.space import _token_tiles

    p = problem
    out: list = []
    ks = sorted({kb // p.dtype.itemsize for kb in (128, 256)})
    if "triton" in backends:
        swaps = ([1] if p.m <= 128 else []) + ([0] if p.m >= 32 else [])
        for swap in swaps:
            tokens = _token_tiles(p.m, (16, 32, 64, 128) if swap else (32, 64, 128), keep=2)
            for bm, bi, bk, warps in itertools.product(tokens, (64, 128), ks, (4, 8)):
                stage = (bm + 2 * bi) * bk * p.dtype.itemsize
                stages = 4 if 4 * stage <= 200 * 1024 else 3
                two = min(4, 100 * 1024 // stage)  # the depth at which two programs share an SM
                cands = [Fc1TritonConfig(bm, bi, bk, warps, stages, swap, 1)]
                if 2 <= two < stages:
                    cands.append(Fc1TritonConfig(bm, bi, bk, warps, two, swap, 1))
                if not swap and p.m > 128:
                    cands.append(Fc1TritonConfig(bm, bi, bk, warps, stages, swap, 1, persistent=1))
                for cfg in cands:
                    if fc1_can_implement(p, cfg)[0] and cfg not in out:
                        out.append(cfg)
        h = default_config(p)
        out = ([h] if h not in out else []) + out
    if "cute" in backends:
        C = cute_fc1.Fc1CuteConfig
        cands = []
        swap_tokens = _token_tiles(p.m, (16, 32, 64, 128), keep=2) if p.m <= 128 else []
        for tm, ti, tk, cons in itertools.product(swap_tokens, (64, 128), ks, (1, 2)):
            cands.append(C(tile_i=ti, tile_m=tm, tile_k=tk, consumers=cons, swap_ab=1))
        if p.m >= 64:
            for cons, ti, tk in itertools.product((1, 2) if p.m > 64 else (1,), (64, 128), ks):
                cands.append(C(tile_i=ti, tile_m=64 * cons, tile_k=tk, consumers=cons, swap_ab=0))
        # clusters: cluster_n=2 (the token tile read from L2 once per two tiles of I)
        for tm, (ti, cons), tk in itertools.product(swap_tokens, ((64, 1), (128, 2)), ks):
            cands.append(C(tile_i=ti, tile_m=tm, tile_k=tk, consumers=cons, swap_ab=1, cluster_n=2))
        if p.m >= 64:
            cons = 2 if p.m > 64 else 1
            for ti, tk in itertools.product((64, 128), ks):
                cands.append(C(tile_i=ti, tile_m=64 * cons, tile_k=tk, consumers=cons, swap_ab=0, cluster_n=2))
        if p.m > 128:
            # 256 tokens per tile (two atoms per consumer): M <= 256 is one token tile
            two_big = -(-p.m // 256) >= 2
            for ti, tk in itertools.product((64, 96), ks):
                for cn, cm in ((1, 1), (2, 1)) + (((1, 2),) if two_big else ()):
                    cands.append(C(tile_i=ti, tile_m=256, tile_k=tk, consumers=2, swap_ab=0, cluster_n=cn,
                                   cluster_m=cm))
            # 128-token tiles with the weight tile multicast to two token tiles (and both)
            for ti, tk in itertools.product((64, 128), ks):
                cands.append(C(tile_i=ti, tile_m=128, tile_k=tk, consumers=2, swap_ab=0, cluster_m=2))
            for tk in ks:
                cands.append(C(tile_i=128, tile_m=128, tile_k=tk, consumers=2, swap_ab=0, cluster_n=2, cluster_m=2))
        for cfg in cands:
            if cute_fc1.can_implement(p, cfg)[0] and cfg not in out:
                out.append(cfg)
    return out


def _fc1_inputs(p, device, seed, shared):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(p.m, p.h, generator=gen, device=device)
    xs = None
    if p.dtype == torch.float8_e4m3fn:
        from densemoe.quant import quantize_per_token

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
    import densemoe

    x, w1, alpha1, xs = inputs
    densemoe.fc1(x, w1, alpha1, x_scale=xs, out=out, config=cfg)


def _fc1_ref(inputs):
    from densemoe.reference import fc1_ref

    x, w1, alpha1, xs = inputs
    return fc1_ref(x, w1, alpha1, x_scale=xs, out_dtype=torch.float32, compute_dtype=torch.float32)


def _fc1_heuristic(p, inputs, out):
    from densemoe.ops.fc1 import _extras, _heuristic

    x, w1, alpha1, xs = inputs
    return _heuristic(p, x, w1, alpha1, out, "auto", _extras(x_scale=xs))[1]


FC1 = TunedOp(
    "fc1",
    problem=lambda m, s, dtype, out_dtype: Fc1Problem(m, s.hidden, s.experts, s.inter, dtype, out_dtype),
    space=fc1_space,
    make_inputs=_fc1_inputs,
    make_out=lambda p, device: torch.empty(p.m, p.e * p.i, dtype=p.out_dtype, device=device),
    run=_fc1_run, reference=_fc1_ref, heuristic=_fc1_heuristic)

OPS = {"fc2": FC2, "fc1": FC1}


def op_of(problem) -> TunedOp:
    """The op a problem belongs to (by its class)."""
    return FC1 if isinstance(problem, Fc1Problem) else FC2
