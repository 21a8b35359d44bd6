"""FC1 (as densemoe.fc1 picks it) and cuBLAS's bare FP8 GEMM at one M, three calls each, for
Nsight Compute (DeepSeek-V3 TP8, fp8):
  ncu --clock-control none --section SpeedOfLight ... -k regex:"_fc1_kernel|nvjet|fc1_sm90" \\
      --launch-skip 2 --launch-count 2 python3 bench/probes/fc1_ncu.py 128"""
import sys

import torch

import densemoe
from densemoe.bench.layer import ExpertsCase
from densemoe.quant import quantize_per_token

M = int(sys.argv[1])
config = None  # argv[2]: a pinned config string (fc1-triton:... or fc1-cute:...)
if len(sys.argv) > 2:
    cls = densemoe.Fc1CuteConfig if sys.argv[2].startswith("fc1-cute:") else densemoe.Fc1TritonConfig
    config = cls.from_str(sys.argv[2])
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
x8, sx = quantize_per_token(case.x(M))
one = torch.ones((), device="cuda")
for _ in range(3):
    densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, config=config)
torch.cuda.synchronize()
for _ in range(3):
    torch._scaled_mm(x8, p.w1.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
torch.cuda.synchronize()
