"""The layer's graph at small M, kernel by kernel (torch.profiler over CUDA-graph replays, L2
flushed before each), and the router's gate kernel against F.linear + quantize_per_token.
(The FC2-with-y-quantisation variants this script also timed, and fc2_quant_ncu.py, lived with
that code in commit a53b849.) python bench/probes/m1_layer_probe.py [M,...]"""

import sys

from densemoe import routing
from densemoe.bench.common import graph_kernels
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.layer import DenseMoE

ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,2,8").split(",")]
timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
moe = DenseMoE(case.prepared["fp8"], case.gate, case.k, renormalize=True)
for M in ms:
    xm = case.x(M)
    r = timer.compare([lambda: moe(xm)], rounds=2)[0]
    print(f"layer M={M}: {r['us']:.1f} us", flush=True)
    for name, start, dur in graph_kernels(lambda: moe(xm), timer):
        print(f"    +{start:7.1f}  {dur:6.1f}  {name[:80]}")
    fns = [lambda: routing.router_logits(xm, moe.gate_weight, quantize=True),
           lambda: routing.router_logits(xm, moe.gate_weight, quantize=True, impl="torch")]
    names = [f"router_logits+quant kernel M={M}", f"F.linear + quantize_per_token M={M}"]
    for n, r in zip(names, timer.compare(fns, rounds=2)):
        print(f"  {n:40s} {r['us']:7.1f} us", flush=True)
