"""FC2 quantising y itself (``fc2_quant_y``: each program its token tile's picked segments,
then FC2) against the quantisation kernel followed by FC2, DeepSeek-V3 TP8 fp8 with skipping,
uniform top-8: the layer with ``layer.FC2_QUANT_MAX_M`` = 0 and 512 (outputs compared bit for
bit), the two FC2 variants alone; timed alternately (3 rounds, the benchmark's Timer: CUDA-graph
replays, L2 flushed); then the layer graph's kernels at the first M.
python bench/experiments/fc2_quant_probe.py [M,...]"""

import statistics
import sys

import torch

import densemoe
import densemoe.layer as layer
from densemoe.bench.common import Timer, graph_kernels
from densemoe.bench.layer import ExpertsCase
from densemoe.layer import DenseMoE
from densemoe.ops.fc2 import fc2_quant_y
from densemoe.quant import quantize_per_token, quantize_y_fold_alpha

ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8,16,32").split(",")]
timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
moe = DenseMoE(p, case.gate, case.k, renormalize=True)


def alternate(fns: dict) -> dict:
    t = {k: [] for k in fns}
    for _ in range(3):
        for k, fn in fns.items():
            t[k].append(timer(fn)["us"])
    return {k: statistics.median(v) for k, v in t.items()}


def lay(lim, x):
    def run():
        layer.FC2_QUANT_MAX_M = lim
        return moe(x)
    return run


print("| M | layer: pass + FC2 us | layer: FC2 quantising us | ratio | identical | FC2 fp8 + pass us "
      "| fc2_quant_y us |")
print("|---:|---:|---:|---:|---|---:|---:|")
for M in ms:
    x = case.x(M)
    alpha = moe.route(x).alpha
    same = torch.equal(lay(0, x)(), lay(512, x)())
    x8, sx = quantize_per_token(x)
    y = densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=alpha, skip=True, fill_unpicked=False)

    def two():
        y8, a2 = quantize_y_fold_alpha(y, alpha, p.w2_scale)
        return densemoe.fc2(y8, p.w2, a2, skip=True)
    t = alternate({"lq": lay(0, x), "lf": lay(512, x), "two": two,
                   "one": lambda: fc2_quant_y(y, p.w2, alpha, p.w2_scale)})
    print(f"| {M} | {t['lq']:.1f} | {t['lf']:.1f} | {t['lq'] / t['lf']:.3f} | {same} | {t['two']:.1f} | "
          f"{t['one']:.1f} |", flush=True)
layer.FC2_QUANT_MAX_M = 512
x = case.x(ms[0])
print(f"  M={ms[0]} layer graph kernels with FC2 quantising (start after the flush, duration), us:")
for name, start, dur in graph_kernels(lambda: moe(x), timer):
    print(f"    +{start:7.1f}  {dur:6.1f}  {name[:80]}")
