"""Is the persistent FC1 kernel's k-loop pipelined? (H100, fp8, H = 7168, I = 256, M = 1.) The
same 8 experts' FC1 three ways: the grid kernel on an 8-expert slice of w1 (one program per
tile), the persistent kernel on the same slice, and the skipping kernel picking those 8 of 256.
python bench/probes/skip_pipeline.py"""

import dataclasses

import torch

from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc1 import Fc1TritonConfig, fc1_triton
from densemoe.quant import quantize_per_token

R = dataclasses.replace
timer = Timer(reps=20)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
x8, sx = quantize_per_token(case.x(1))
n = 8
w_sl, a_sl = p.w1[: n * 2 * I], p.alpha1[:n]
y_sl = torch.empty(1, n * I, dtype=torch.bfloat16, device="cuda")
y = torch.empty(1, E * I, dtype=torch.bfloat16, device="cuda")
alpha = torch.zeros(1, E, device="cuda")
alpha[0, :n] = 1.0
fns, names = [], []
for cfg in (Fc1TritonConfig(16, 64, 256, 4, 4, 1, 1), Fc1TritonConfig(16, 32, 256, 4, 6, 0, 1),
            Fc1TritonConfig(16, 64, 128, 4, 8, 1, 1)):
    fns += [lambda c=cfg: fc1_triton(x8, w_sl, a_sl, y_sl, c, x_scale=sx),
            lambda c=cfg: fc1_triton(x8, w_sl, a_sl, y_sl, R(c, persistent=1), x_scale=sx),
            lambda c=cfg: fc1_triton(x8, p.w1, p.alpha1, y, R(c, persistent=1), x_scale=sx, routing=alpha, skip=True)]
    s = cfg.to_str().split(":")[1]
    names += [f"grid       {s}", f"persistent {s}", f"skip       {s}"]
for name, r in zip(names, timer.compare(fns)):
    print(f"{name:100s} {r['us']:7.1f} us", flush=True)
