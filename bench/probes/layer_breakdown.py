"""Where the layer's time goes: each piece of DenseMoE's fp8 forward timed alone (Timer: graph
replays, L2 flushed) and the whole, in two orders, plus the kernels of one eager forward from
torch.profiler. python bench/probes/layer_breakdown.py [shape] [M,...]"""

import sys

import torch

import densemoe
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.layer import DenseMoE
from densemoe.quant import quantize_per_token, quantize_y_fold_alpha

shape = sys.argv[1] if len(sys.argv) > 1 else "deepseek-v3-tp8"
ms = [int(m) for m in (sys.argv[2] if len(sys.argv) > 2 else "1,64,256").split(",")]
timer = Timer(reps=20)
case = ExpertsCase(shape, "cuda")
p = case.prepared["fp8"]
moe = DenseMoE(p, case.gate, case.k, renormalize=True)
for M in ms:
    x = case.x(M)
    alpha = moe.route(x).alpha
    x8, sx = quantize_per_token(x)
    y = densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx)
    y8, a2 = quantize_y_fold_alpha(y, alpha, p.w2_scale)
    parts = {
        "layer": lambda: moe(x),
        "experts": lambda: densemoe.experts_forward(x, p, alpha),
        "router": lambda: moe.route(x),
        "quant_x": lambda: quantize_per_token(x),
        "fc1": lambda: densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx),
        "quant_y": lambda: quantize_y_fold_alpha(y, alpha, p.w2_scale),
        "fc2": lambda: densemoe.fc2(y8, p.w2, a2),
        "layer_again": lambda: moe(x),
    }
    res = {k: timer(fn)["us"] for k, fn in parts.items()}
    print(f"{shape} M={M}: " + " ".join(f"{k}={v:.1f}" for k, v in res.items())
          + f" | sum(router..fc2)={sum(res[k] for k in ('router', 'quant_x', 'fc1', 'quant_y', 'fc2')):.1f}", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            moe(x)
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total / 3, e.count // 3) for e in prof.key_averages()), key=lambda r: -r[1])
    for k, t, c in rows[:14]:
        print(f"    {t:8.1f} us  x{c}  {k[:110]}")
