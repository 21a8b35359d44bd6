"""FC2 on FC1's bf16 output with w2's fp8 tiles converted in registers (W8A16) against the y
quantisation pass + fp8 FC2, DeepSeek-V3 TP8 fp8 with skipping, uniform top-8.

For each M: the layer (DenseMoE) with ``layer.W8A16_MAX_M`` = 0 (quantisation pass) and 512
(W8A16), each output's error against the fp32 reference; then FC2 alone both ways and the
quantisation pass alone; timed alternately (3 rounds, the benchmark's Timer: CUDA-graph replays,
L2 flushed); then the layer graph's kernels at the first M.
python bench/experiments/w8a16_probe.py [M,...]"""

import statistics
import sys

import torch

import densemoe
import densemoe.layer as layer
from densemoe.bench.common import Timer, graph_kernels
from densemoe.bench.layer import ExpertsCase
from densemoe.layer import DenseMoE
from densemoe.quant import quantize_per_token, quantize_y_fold_alpha
from densemoe.reference import experts_ref

ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8,16,32,64").split(",")]
timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
moe = DenseMoE(p, case.gate, case.k, renormalize=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def alternate(fns: dict) -> dict:
    t = {k: [] for k in fns}
    for _ in range(3):
        for k, fn in fns.items():
            t[k].append(timer(fn)["us"])
    return {k: statistics.median(v) for k, v in t.items()}


print("| M | layer quant pass us | layer W8A16 us | ratio | err quant | err W8A16 | FC2 fp8 us | FC2 W8A16 us "
      "| quant pass us |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for M in ms:
    x = case.x(M)
    route = moe.route(x)
    ref = experts_ref(x, case.w13, case.w2, route.alpha, compute_dtype=torch.float32, experts_per_chunk=16)
    outs = {}
    for lim in (0, 512):
        layer.W8A16_MAX_M = lim
        outs[lim] = moe(x)
    x8, sx = quantize_per_token(x)
    y = densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=route.alpha, skip=True, fill_unpicked=False)
    y8, a2 = quantize_y_fold_alpha(y, route.alpha, p.w2_scale)

    def lay(lim):
        def run():
            layer.W8A16_MAX_M = lim
            return moe(x)
        return run
    lt = alternate({"q": lay(0), "w": lay(512)})
    ft = alternate({"fp8": lambda: densemoe.fc2(y8, p.w2, a2, skip=True),
                    "w8a16": lambda: densemoe.fc2(y, p.w2, route.alpha, skip=True, w_scale=p.w2_scale),
                    "quant": lambda: quantize_y_fold_alpha(y, route.alpha, p.w2_scale)})
    print(f"| {M} | {lt['q']:.1f} | {lt['w']:.1f} | {lt['q'] / lt['w']:.3f} | {rel(outs[0], ref):.4f} | "
          f"{rel(outs[512], ref):.4f} | {ft['fp8']:.1f} | {ft['w8a16']:.1f} | {ft['quant']:.1f} |", flush=True)
layer.W8A16_MAX_M = 512
x = case.x(ms[0])
print(f"  M={ms[0]} layer graph kernels with W8A16 (start after the flush, duration), us:")
for name, start, dur in graph_kernels(lambda: moe(x), timer):
    print(f"    +{start:7.1f}  {dur:6.1f}  {name[:80]}")
