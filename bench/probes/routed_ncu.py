"""The routed path's launches (quantise x, schedule, grouped FC1, grouped FC2, combine) with the
config the library picks (or a pinned one), three calls, nothing timed: for Nsight Compute.

  ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \\
      --section WarpStateStats --section Occupancy --section LaunchStats \\
      -k regex:"_fc2_kernel" --launch-skip 2 --launch-count 1 \\
      python3 bench/probes/routed_ncu.py deepseek-v3-tp8 512 [routed-config-string]

Arguments: shape, M, and optionally a ``RoutedConfig.to_str()`` to pin. fp8, uniform top-k
routing (seeded). The output is checked once against the dense path before the three calls."""
import sys

import torch

import densemoe
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.common import RoutedProblem
from densemoe.kernels.triton.routed import RoutedConfig
from densemoe.ops import routed_configs
from densemoe.ops.routed import routed_experts

shape, M = sys.argv[1], int(sys.argv[2])
case = ExpertsCase(shape, "cuda")
p = case.prepared["fp8"]
E, H, I, k = p.num_experts, p.hidden, p.inter, case.k
cfg = RoutedConfig.from_str(sys.argv[3]) if len(sys.argv) > 3 else \
    routed_configs.choose(RoutedProblem(M, H, E, I, k, p.dtype, torch.bfloat16), "cuda").config
torch.manual_seed(M)
x = case.x(M)
ids = torch.rand(M, E, device="cuda").topk(k, dim=1).indices
wts = torch.softmax(torch.randn(M, k, device="cuda"), dim=1)
out = routed_experts(x, p, ids, wts, config=cfg)
dense = densemoe.experts_forward(x, p, torch.zeros(M, E, device="cuda").scatter(1, ids, wts), strategy="dense")
err = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
assert err < 0.05, f"routed vs dense rel err {err:.3e}"
print(f"# {shape} M={M} config {cfg.to_str()} err_vs_dense {err:.1e}", flush=True)
for _ in range(3):
    routed_experts(x, p, ids, wts, config=cfg)
torch.cuda.synchronize()
