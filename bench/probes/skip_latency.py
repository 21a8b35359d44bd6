"""Where the fixed cost of skipping at M = 1 goes (H100, DeepSeek-V3 TP8 fp8): FC1 and FC2 with
skipping for 1, 2, 4, 8 picked experts of one token (bytes grow 8x; does the time?), next to a
trivial kernel through the same timer. python bench/probes/skip_latency.py"""

import torch

import densemoe
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.skip import active_experts
from densemoe.quant import quantize_per_token

timer = Timer(reps=20)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
x8, sx = quantize_per_token(case.x(1))
a8 = torch.randn(1, E * I, device="cuda").to(torch.float8_e4m3fn)
fns, names = [], []
for n in (1, 2, 4, 8):
    alpha = torch.zeros(1, E, device="cuda")
    alpha[0, torch.randperm(E, device="cuda")[:n]] = 1.0 / n
    fns += [lambda a=alpha: densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=a, skip=True),
            lambda a=alpha: densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=a, skip=True, fill_unpicked=False),
            lambda a=alpha: densemoe.fc2(a8, p.w2, a, skip=True)]
    names += [f"fc1 {n} experts ({n * 2 * I * H / 1e6:.1f} MB)", f"fc1 {n} experts, no zero-fill",
              f"fc2 {n} experts ({n * H * I / 1e6:.1f} MB)"]
alpha = torch.zeros(1, E, device="cuda")
fns.append(lambda: active_experts(alpha, 16))
names.append("trivial kernel (active_experts)")
moe = densemoe.DenseMoE(p, case.gate, 8, renormalize=True)
xb = case.x(1)
fns.append(lambda: moe(xb))
names.append("layer M=1 (skip, no zero-fill)")
for name, r in zip(names, timer.compare(fns)):
    print(f"{name:40s} {r['us']:7.1f} us", flush=True)
