"""The layer at M = 1 (DeepSeek-V3 TP8 fp8, uniform top-8) with FC1 and FC2 walking the token's
top-k ids instead of building their expert lists from the routing at their start (a scan of
alpha: load, cumsum, a reduction per unit in FC1; a list stored, a barrier and reloads in FC2):
the layer written out (router kernels, FC1, quantize_y_fold_alpha, FC2 at their default skip
configs) with and without ``expert_ids``, and DenseMoE itself; outputs compared; timed both ways
(Timer: one-op graph; Timer.in_graph), 3 interleaved rounds. python bench/probes/ids_probe.py"""

import statistics

import torch

from densemoe import routing
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc1 import fc1_triton
from densemoe.kernels.common import Fc1Problem
from densemoe.ops.fc1_configs import default_skip_config as fc1_cfg
from densemoe.kernels.triton.fc2 import fc2_triton
from densemoe.kernels.common import Fc2Problem
from densemoe.layer import DenseMoE
from densemoe.ops.fc2_configs import default_skip_config as fc2_cfg
from densemoe.quant import quantize_y_fold_alpha

timer = Timer(reps=40)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H, k = case.E, case.I, case.H, case.k
moe = DenseMoE(p, case.gate, k, renormalize=True)
c1 = fc1_cfg(Fc1Problem(1, H, E, I, p.w1.dtype, torch.bfloat16))
c2 = fc2_cfg(Fc2Problem(1, H, E, I, p.w2.dtype, torch.bfloat16))
x = case.x(1)


def layer(ids: bool):
    def run():
        logits, (x8, sx) = routing.router_logits(x, moe.gate_weight, quantize=True)
        r = routing.softmax_topk(logits, k, renormalize=True)
        y = torch.empty(1, E * I, dtype=torch.bfloat16, device="cuda")
        fc1_triton(x8, p.w1, p.alpha1, y, c1, x_scale=sx, routing=r.alpha, skip=True, fill=False,
                   expert_ids=r.topk_ids if ids else None)
        y8, a2 = quantize_y_fold_alpha(y, r.alpha, p.w2_scale)
        out = torch.empty(1, H, dtype=torch.bfloat16, device="cuda")
        fc2_triton(y8, p.w2, a2, out, c2, skip=True, expert_ids=r.topk_ids if ids else None)
        return out
    return run


ref = moe(x).float()
for name, fn in (("lists", layer(False)), ("ids", layer(True))):
    d = ((fn().float() - ref).norm() / ref.norm()).item()
    print(f"{name}: relative difference to DenseMoE {d:.1e}")
    assert d < 1e-2
fns = {"DenseMoE": lambda: moe(x), "lists": layer(False), "ids": layer(True)}
t = {n: [] for n in fns}
tg = {n: [] for n in fns}
for _ in range(3):
    for n, fn in fns.items():
        t[n].append(timer(fn)["us"])
        tg[n].append(timer.in_graph(fn)["us"])
for n in fns:
    print(f"{n}: {statistics.median(t[n]):.1f} us (one-op graph), {statistics.median(tg[n]):.1f} us in graph "
          f"(rounds {[round(v, 1) for v in tg[n]]})")
