"""What the tuner needs to know about each tunable op, in one place per op.

A ``TunedOp`` says how to build the op's problem for a model shape and token count, list its
search space, make inputs, run one config, compute the reference, and what the heuristic picks.
The tuner, the precompiler and the CLI work through these only, so a new op (or backend) is one
more entry in ``OPS``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from densemoe.kernels.common import Fc1Problem, Fc2Problem
from densemoe.kernels.cute import fc1_sm90 as cute_fc1
from densemoe.kernels.cute import fc2_sm90 as cute_fc2
from densemoe.ops import fc1_configs, fc2_configs
from densemoe.ops.fc1 import fc1
from densemoe.ops.fc2 import fc2
from densemoe.quant import quantize_per_token
from densemoe.reference import fc1_ref, fc2_ref
from densemoe.tuning.space import fc1_space, fc2_space


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


def _fc2_ref(inputs):
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
    run=_fc2_run, reference=_fc2_ref, heuristic=_fc2_heuristic)


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


def _fc1_ref(inputs):
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
    run=_fc1_run, reference=_fc1_ref, heuristic=_fc1_heuristic)

OPS = {"fc2": FC2, "fc1": FC1}


def op_of(problem) -> TunedOp:
    """The op a problem belongs to (by its class)."""
    return FC1 if isinstance(problem, Fc1Problem) else FC2
