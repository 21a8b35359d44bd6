"""The layer (DeepSeek-V3 TP8 fp8, DenseMoE, uniform routing) with the router in one launch
(``routing.fused_router``: the gate kernel's last program computes the top-k) and in two (the
module's arrival counter removed), outputs compared bit for bit, timed alternately (3 rounds,
the benchmark's Timer: CUDA-graph replays, L2 flushed); then the graph's kernels at the first M.
python bench/experiments/router_fusion_probe.py [M,...]"""

import statistics
import sys

import torch

from densemoe.bench.common import Timer, graph_kernels
from densemoe.bench.layer import ExpertsCase
from densemoe.layer import DenseMoE

ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8").split(",")]
timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
moes = {}
for router in ("softmax", "deepseek_v3"):
    kw = dict(renormalize=True) if router == "softmax" else dict(
        router="deepseek_v3", logits_fp32=True, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        e_score_correction_bias=torch.randn(case.E, device="cuda") * 0.01)
    moes[router] = DenseMoE(case.prepared["fp8"], case.gate, case.k, **kw)
counter = {r: m._arrivals for r, m in moes.items()}


def fused(moe, router, on):
    def run(x):
        moe._arrivals = counter[router] if on else None
        return moe(x)
    return run


print("| router | M | fused us | two launches us | ratio | identical |")
print("|---|---:|---:|---:|---:|---|")
for router, moe in moes.items():
    for M in ms:
        x = case.x(M)
        on, off = fused(moe, router, True), fused(moe, router, False)
        same = torch.equal(on(x), off(x))
        t = {"on": [], "off": []}
        for _ in range(3):
            t["on"].append(timer(lambda: on(x))["us"])
            t["off"].append(timer(lambda: off(x))["us"])
        a, b = statistics.median(t["on"]), statistics.median(t["off"])
        print(f"| {router} | {M} | {a:.1f} | {b:.1f} | {b / a:.3f} | {same} |", flush=True)
moe = moes["softmax"]
moe._arrivals = counter["softmax"]
x = case.x(ms[0])
print(f"  M={ms[0]} softmax layer graph kernels, fused router (start after the flush, duration), us:")
for name, start, dur in graph_kernels(lambda: moe(x), timer):
    print(f"    +{start:7.1f}  {dur:6.1f}  {name[:80]}")
