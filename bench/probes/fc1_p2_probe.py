"""FC1 with skipping at M = 4-32 (DeepSeek-V3 TP8 fp8), uniform and skewed routing: the default
skip config (one persistent program per SM, 4 stages) against two programs per SM (3 or 2
stages), so that more units are in flight at once where they outnumber the SMs (skewed M = 8:
35 active experts x 4 tiles of I = 140 units on 132 programs). Outputs checked against the
default's, timed in 3 interleaved rounds, one-op graph and in a graph.
python bench/probes/fc1_p2_probe.py"""

import dataclasses
import statistics

import torch

from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.bench.skip import routing_alpha
from densemoe.kernels.triton.fc1 import can_implement, fc1_triton
from densemoe.kernels.common import Fc1Problem
from densemoe.ops.fc1_configs import default_skip_config
from densemoe.quant import quantize_per_token

timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H, k = case.E, case.I, case.H, case.k
gen = torch.Generator(device="cuda").manual_seed(11)
for routing in ("uniform", "skewed"):
    for M in (4, 8, 16, 32):
        alpha = routing_alpha(M, E, k, routing, gen, "cuda")
        act = int((alpha != 0).any(0).sum())
        x8, sx = quantize_per_token(case.x(M))
        prob = Fc1Problem(M, H, E, I, p.w1.dtype, torch.bfloat16)
        base = default_skip_config(prob)
        vs = {"default": base, "p2 st3": dataclasses.replace(base, persistent=2, num_stages=3),
              "p2 st2": dataclasses.replace(base, persistent=2, num_stages=2)}
        y = torch.empty(M, E * I, dtype=torch.bfloat16, device="cuda")
        fc1_triton(x8, p.w1, p.alpha1, y, base, x_scale=sx, routing=alpha, skip=True)
        want = y.clone()
        fns = {}
        for n, c in vs.items():
            if not can_implement(prob, c)[0]:
                print(n, "cannot:", can_implement(prob, c)[1])
                continue
            y.fill_(float("nan"))
            fc1_triton(x8, p.w1, p.alpha1, y, c, x_scale=sx, routing=alpha, skip=True)
            assert torch.equal(y, want), n
            fns[n] = lambda c=c: fc1_triton(x8, p.w1, p.alpha1, y, c, x_scale=sx, routing=alpha, skip=True,
                                            fill=False)
        t = {n: [] for n in fns}
        tg = {n: [] for n in fns}
        for _ in range(3):
            for n, fn in fns.items():
                t[n].append(timer(fn)["us"])
                tg[n].append(timer.in_graph(fn)["us"])
        print(f"{routing} M={M} active {act} units {act * (I // base.block_i)}: " + ", ".join(
            f"{n} {statistics.median(t[n]):.1f} / {statistics.median(tg[n]):.1f}" for n in fns), flush=True)
