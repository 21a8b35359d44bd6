"""FC1 with skipping at small M (DeepSeek-V3 TP8 fp8, uniform top-8): its few units spread over
the grid (``fc1.SPREAD_UNITS``, every step-th program) or packed on the first programs, against
a launch of only as many programs as units and the dense grid kernel over a slice of w1 with as
many experts (the same bytes); then the layer with the spread on and off. Timed alternately (3
rounds, the benchmark's Timer: CUDA-graph replays, L2 flushed).
python bench/probes/fc1_spread_probe.py [M,...]"""

import statistics
import sys

import torch

import densemoe.kernels.triton.fc1 as k1
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc1 import Fc1TritonConfig, fc1_triton
from densemoe.kernels.common import Fc1Problem
from densemoe.ops.fc1_configs import default_skip_config
from densemoe.layer import DenseMoE
from densemoe.quant import quantize_per_token

ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8").split(",")]
timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
moe = DenseMoE(p, case.gate, case.k, renormalize=True)


def alternate(fns: dict) -> dict:
    t = {k: [] for k in fns}
    for _ in range(3):
        for k, fn in fns.items():
            t[k].append(timer(fn)["us"])
    return {k: statistics.median(v) for k, v in t.items()}


def spread(on, fn):
    def run():
        k1.SPREAD_UNITS = on
        return fn()
    return run


print("| M | experts | units | FC1 spread us | packed us | programs = units us | dense slice us | layer spread us "
      "| layer packed us |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for M in ms:
    x = case.x(M)
    alpha = moe.route(x).alpha
    n_act = int((alpha != 0).any(0).sum())
    x8, sx = quantize_per_token(x)
    cfg = default_skip_config(Fc1Problem(M, H, E, I, p.w1.dtype, torch.bfloat16))
    units = n_act * (I // cfg.block_i)
    y = torch.empty(M, E * I, dtype=torch.bfloat16, device="cuda")
    outs = {}
    for on in (True, False):
        k1.SPREAD_UNITS = on
        y.fill_(float("nan"))
        fc1_triton(x8, p.w1, p.alpha1, y, cfg, x_scale=sx, routing=alpha, skip=True, fill=True)
        outs[on] = y.clone()
    assert torch.equal(outs[True], outs[False])
    w1s = p.w1[: n_act * 2 * I]
    ys = torch.empty(M, n_act * I, dtype=torch.bfloat16, device="cuda")
    dense = Fc1TritonConfig(cfg.block_m, cfg.block_i, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.swap_ab, 1)
    t = alternate({
        "on": spread(True, lambda: fc1_triton(x8, p.w1, p.alpha1, y, cfg, x_scale=sx, routing=alpha, skip=True,
                                              fill=False)),
        "off": spread(False, lambda: fc1_triton(x8, p.w1, p.alpha1, y, cfg, x_scale=sx, routing=alpha, skip=True,
                                                fill=False)),
        "exact": spread(False, lambda: fc1_triton(x8, p.w1, p.alpha1, y, cfg, x_scale=sx, routing=alpha, skip=True,
                                                  fill=False, num_programs=units)),
        "slice": lambda: fc1_triton(x8, w1s, p.alpha1[:n_act], ys, dense, x_scale=sx),
        "layer_on": spread(True, lambda: moe(x)),
        "layer_off": spread(False, lambda: moe(x)),
    })
    print(f"| {M} | {n_act} | {units} | {t['on']:.1f} | {t['off']:.1f} | {t['exact']:.1f} | {t['slice']:.1f} | "
          f"{t['layer_on']:.1f} | {t['layer_off']:.1f} |", flush=True)
k1.SPREAD_UNITS = True
