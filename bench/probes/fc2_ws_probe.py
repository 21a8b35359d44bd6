"""What FC2's zeroed split workspace costs (DeepSeek-V3 TP8 fp8, skipping, uniform top-8): FC2
(the default skip config: two programs per column tile from M = 3, partial sums in an fp32
workspace that ``split_workspace`` zeroes on every call) and the layer, timed as they are and
with ``split_workspace`` patched to hand back one buffer zeroed once (no memset per call; the
sums are then wrong after the first call: timing only). Timed alternately (3 rounds, the
benchmark's Timer: CUDA-graph replays, L2 flushed). python bench/probes/fc2_ws_probe.py [M,...]"""

import statistics
import sys


import densemoe
import densemoe.kernels.triton.fc2 as k2
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.layer import DenseMoE
from densemoe.quant import quantize_per_token, quantize_y_fold_alpha

ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "2,4,8,16,32,64").split(",")]
timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
moe = DenseMoE(p, case.gate, case.k, renormalize=True)
orig = k2.split_workspace
cache = {}


def once(m, n, m_tiles, n_tiles, cut, device, reuse=False):  # (probe written before the reuse existed)
    if not cut:
        return orig(m, n, m_tiles, n_tiles, cut, device)
    key = (m, n, m_tiles, n_tiles)
    if key not in cache:
        cache[key] = orig(m, n, m_tiles, n_tiles, cut, device)
    return cache[key]


def patched(on, fn):
    def run():
        k2.split_workspace = once if on else orig
        return fn()
    return run


print("| M | FC2 us | FC2 no memset us | layer us | layer no memset us |")
print("|---:|---:|---:|---:|---:|")
for M in ms:
    x = case.x(M)
    alpha = moe.route(x).alpha
    x8, sx = quantize_per_token(x)
    y = densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=alpha, skip=True, fill_unpicked=False)
    y8, a2 = quantize_y_fold_alpha(y, alpha, p.w2_scale)
    fns = {"f": patched(False, lambda: densemoe.fc2(y8, p.w2, a2, skip=True)),
           "f0": patched(True, lambda: densemoe.fc2(y8, p.w2, a2, skip=True)),
           "l": patched(False, lambda: moe(x)), "l0": patched(True, lambda: moe(x))}
    t = {k: [] for k in fns}
    for _ in range(3):
        for k, fn in fns.items():
            t[k].append(timer(fn)["us"])
    t = {k: statistics.median(v) for k, v in t.items()}
    print(f"| {M} | {t['f']:.1f} | {t['f0']:.1f} | {t['l']:.1f} | {t['l0']:.1f} |", flush=True)
k2.split_workspace = orig
