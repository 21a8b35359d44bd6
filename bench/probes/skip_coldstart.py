"""Is FC1's fixed ~20 us at M = 1 (skipping) a cold-start cost? The same calls timed with the
benchmark's L2 flush before each replay and without it, next to the dense grid kernel on a
1- and 8-expert slice of w1. python bench/probes/skip_coldstart.py"""

import torch

import densemoe
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc1 import Fc1TritonConfig, fc1_triton
from densemoe.kernels.triton.skip import active_experts
from densemoe.quant import quantize_per_token


class NoFlush(Timer):
    def flush(self):
        pass


case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
x8, sx = quantize_per_token(case.x(1))
cfg = Fc1TritonConfig(16, 64, 256, 4, 4, 1, 1)
fns, names = [], []
for n in (1, 8):
    alpha = torch.zeros(1, E, device="cuda")
    alpha[0, torch.randperm(E, device="cuda")[:n]] = 1.0 / n
    y_sl = torch.empty(1, n * I, dtype=torch.bfloat16, device="cuda")
    yy = torch.empty(1, E * I, dtype=torch.bfloat16, device="cuda")
    sk = Fc1TritonConfig(16, 32, 256, 4, 6, 0, 1, persistent=1)
    act = active_experts(alpha, 16)
    fns += [lambda a=alpha, y=yy: fc1_triton(x8, p.w1, p.alpha1, y, sk, x_scale=sx, routing=a, skip=True, fill=False),
            lambda a=alpha, y=yy, act=act: fc1_triton(x8, p.w1, p.alpha1, y, sk, x_scale=sx, routing=a, skip=True,
                                                      fill=False, active=act)]
    names += [f"fc1 skip kernel, {n} picked, lists in-kernel", f"fc1 skip kernel, {n} picked, lists given"]
    first = torch.zeros(1, E, device="cuda")
    first[0, :n] = 1.0 / n
    sk64 = Fc1TritonConfig(16, 64, 256, 4, 4, 1, 1, persistent=1)
    for label, a in (("random", alpha), ("the first", first)):
        for c in (sk, sk64):
            fns.append(lambda a=a, y=yy, c=c: fc1_triton(x8, p.w1, p.alpha1, y, c, x_scale=sx, routing=a, skip=True,
                                                         fill=False))
            names.append(f"fc1 skip kernel, {label} {n}, bi{c.block_i}")
    fns += [lambda a=alpha: densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=a, skip=True),
            lambda n=n, y=y_sl: fc1_triton(x8, p.w1[: n * 2 * I], p.alpha1[:n], y, cfg, x_scale=sx)]
    names += [f"fc1 skip, {n} experts picked of 256", f"fc1 dense grid kernel on a {n}-expert slice"]
a0 = torch.zeros(1, E, device="cuda")
fns.append(lambda: active_experts(a0, 16))
names.append("trivial kernel")
for label, timer in (("L2 flushed", Timer(reps=30)),):
    for name, r in zip(names, timer.compare(fns)):
        print(f"{label:10s} {name:45s} {r['us']:7.1f} us", flush=True)
