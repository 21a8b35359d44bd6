"""Run one FC2 config (or cuBLAS FP8) a few times, for Nsight Compute.

ncu --clock-control none -k regex:_fc2_kernel|gemm|sm90 --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    python bench/probes/fc2_profile.py M CONFIG|cublas
"""

import sys

import torch

import densemoe
from densemoe import Fc2TritonConfig
from densemoe.bench.fc2 import routing_alpha

FP8 = torch.float8_e4m3fn
M, what = int(sys.argv[1]), sys.argv[2]
N, E, I = 7168, 256, 256
gen = torch.Generator(device="cuda").manual_seed(0)
w = torch.randn(N, E * I, device="cuda", dtype=torch.bfloat16, generator=gen).to(FP8)
a = torch.randn(M, E * I, device="cuda", generator=gen).to(FP8)
alpha = routing_alpha(M, E, 8, gen)
one = torch.ones((), device="cuda")
for _ in range(4):
    if what == "cublas":
        torch._scaled_mm(a, w.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    else:
        densemoe.fc2(a, w, alpha, config=Fc2TritonConfig.from_str(what))
torch.cuda.synchronize()
