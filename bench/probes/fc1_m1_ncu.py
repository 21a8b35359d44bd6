"""FC1 at M = 1 (TP8 fp8, 8 random experts picked) for Nsight Compute: the skipping kernel
(default config), the same with the lists built beforehand, and the dense grid kernel over an
8-expert slice of w1 (the same bytes). Each variant launches 3 times; profile the 3rd.
ncu --kernel-name regex:_fc1 python bench/probes/fc1_m1_ncu.py <variant>"""

import sys

import torch

from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc1 import Fc1TritonConfig, fc1_triton
from densemoe.kernels.common import Fc1Problem
from densemoe.ops.fc1_configs import default_skip_config
from densemoe.kernels.triton.skip import active_experts
from densemoe.quant import quantize_per_token

variant = sys.argv[1] if len(sys.argv) > 1 else "skip"
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
g = torch.Generator(device="cuda").manual_seed(3)
ids = torch.randperm(E, device="cuda", generator=g)[:8]
alpha = torch.zeros(1, E, device="cuda")
alpha[0, ids] = 0.125
x8, sx = quantize_per_token(case.x(1))
y = torch.empty(1, E * I, dtype=torch.bfloat16, device="cuda")
cfg = default_skip_config(Fc1Problem(1, H, E, I, p.w1.dtype, torch.bfloat16))
print(variant, cfg)
act = active_experts(alpha, cfg.block_m)
w1s = p.w1[: 8 * 2 * I]
ys = torch.empty(1, 8 * I, dtype=torch.bfloat16, device="cuda")
for _ in range(3):
    if variant == "skip":
        fc1_triton(x8, p.w1, p.alpha1, y, cfg, x_scale=sx, routing=alpha, skip=True, fill=False)
    elif variant == "skip_given":
        fc1_triton(x8, p.w1, p.alpha1, y, cfg, x_scale=sx, routing=alpha, skip=True, fill=False, active=act)
    elif variant == "dense_slice":
        fc1_triton(x8, w1s, p.alpha1[:8], ys, Fc1TritonConfig(16, 64, 256, 4, 4, 1, 1), x_scale=sx)
    elif variant == "dense_slice_route":
        fc1_triton(x8, w1s, p.alpha1[:8], ys, Fc1TritonConfig(16, 64, 256, 4, 4, 1, 1), x_scale=sx,
                   routing=alpha[:, :8] + 1)
torch.cuda.synchronize()
