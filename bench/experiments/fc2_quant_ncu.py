"""One launch of FC2 with the y quantisation inside (M = 1, TP8), for Nsight Compute:
ncu --kernel-name _fc2_kernel --launch-skip 2 --launch-count 1 python bench/experiments/fc2_quant_ncu.py [swap]"""

import dataclasses
import sys

import torch

import densemoe
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc2 import Fc2Problem, fc2_triton
from densemoe.layer import DenseMoE
from densemoe.ops.fc2 import default_skip_config
from densemoe.quant import quantize_per_token, quantize_y_fold_alpha

quant = "fp8" not in sys.argv
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
moe = DenseMoE(p, case.gate, case.k, renormalize=True)
x = case.x(1)
alpha = moe.route(x).alpha
x8, sx = quantize_per_token(x)
y = densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=alpha)
y8, a2 = quantize_y_fold_alpha(y, alpha, p.w2_scale)
c = default_skip_config(Fc2Problem(1, H, E, I, p.w2.dtype, torch.bfloat16))
out = torch.empty(1, H, dtype=torch.bfloat16, device="cuda")
for _ in range(4):
    if quant:
        fc2_triton(y, p.w2, alpha, out, c, skip=True, quant_a=True, w_scale=p.w2_scale)
    else:
        fc2_triton(y8, p.w2, a2, out, c, skip=True)
torch.cuda.synchronize()
