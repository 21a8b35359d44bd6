"""One FC2 call per backend under Nsight Compute: python bench/probes/cute_ncu.py M [backend [config]]."""
import sys

import torch

import densemoe
from densemoe.bench.fc2 import Fc2Case

M = int(sys.argv[1])
backend = sys.argv[2] if len(sys.argv) > 2 else "cute"
config = densemoe.Fc2CuteConfig.from_str(sys.argv[3]) if len(sys.argv) > 3 else None
case = Fc2Case("deepseek-v3-tp8", ["fp8"])
a, alpha = case.inputs(M)
out = torch.empty(M, case.N, dtype=torch.bfloat16, device="cuda")
for _ in range(3):
    densemoe.fc2(a["fp8"], case.w["fp8"], alpha, out=out, backend=backend, config=config)
torch.cuda.synchronize()
