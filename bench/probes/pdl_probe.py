"""The layer (DeepSeek-V3 TP8 fp8, DenseMoE with its defaults) with a feature switched on and
off by an environment variable (default DENSEMOE_PDL: programmatic dependent launch;
DENSEMOE_L2_PREFETCH: FC1's idle programs prefetching FC2's weights), same outputs checked, then
timed alternately (3 rounds, the benchmark's Timer: CUDA-graph replays, L2 flushed), and the
graph's kernels with it on. python bench/probes/pdl_probe.py [M,...] [VAR]"""

import os
import statistics
import sys

import torch

from densemoe.bench.common import graph_kernels
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.layer import DenseMoE

ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8,16,64").split(",")]
VAR = sys.argv[2] if len(sys.argv) > 2 else "DENSEMOE_PDL"
timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
moe = DenseMoE(case.prepared["fp8"], case.gate, case.k, renormalize=True)
for M in ms:
    x = case.x(M)
    outs = {}
    for flag in ("0", "1"):
        os.environ[VAR] = flag
        outs[flag] = moe(x)
    same = torch.equal(outs["0"], outs["1"])
    t = {"0": [], "1": []}
    for _ in range(3):
        for flag in ("0", "1"):
            os.environ[VAR] = flag
            t[flag].append(timer(lambda: moe(x))["us"])
    off, on = statistics.median(t["0"]), statistics.median(t["1"])
    print(f"layer M={M}: {VAR}=0 {off:.1f} us, =1 {on:.1f} us ({off / on:.3f}x), outputs identical: {same}", flush=True)
os.environ[VAR] = "1"
for M in ms[:2]:
    x = case.x(M)
    print(f"  M={M} graph kernels with {VAR}=1 (start after the flush, duration), us:")
    for name, start, dur in graph_kernels(lambda: moe(x), timer):
        print(f"    +{start:7.1f}  {dur:6.1f}  {name[:80]}")
