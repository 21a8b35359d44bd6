"""FC1 with skipping at small M (DeepSeek-V3 TP8 fp8, uniform top-8) with each tile's k-range
cut in split_k units (partial sums meeting in the reused workspace), split_k 1 / 2 / 4 on the
default skip config: FC1 alone and the layer (the ops' default patched), outputs checked
against split_k = 1, timed alternately (3 rounds, the benchmark's Timer: CUDA-graph replays, L2
flushed). python bench/probes/fc1_splitk_probe.py [M,...]"""

import dataclasses
import statistics
import sys

import torch

import densemoe.ops.fc1_configs as ops1
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc1 import fc1_triton
from densemoe.kernels.common import Fc1Problem
from densemoe.ops.fc1_configs import default_skip_config
from densemoe.layer import DenseMoE
from densemoe.quant import quantize_per_token

ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8").split(",")]
splits = (1, 2, 3, 4)
timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
moe = DenseMoE(p, case.gate, case.k, renormalize=True)


def with_split(sk, fn):
    def run():
        ops1.default_skip_config = lambda prob, sms=132: dataclasses.replace(default_skip_config(prob, sms), split_k=sk)
        return fn()
    return run


print("| M | " + " | ".join(f"FC1 split {s} us" for s in splits) + " | " + " | ".join(f"layer split {s} us" for s in splits)
      + " | max rel diff |")
print("|---:|" + "---:|" * (2 * len(splits) + 1))
for M in ms:
    x = case.x(M)
    alpha = moe.route(x).alpha
    x8, sx = quantize_per_token(x)
    base = default_skip_config(Fc1Problem(M, H, E, I, p.w1.dtype, torch.bfloat16))
    y = torch.empty(M, E * I, dtype=torch.bfloat16, device="cuda")
    outs = {}
    for sk in splits:
        y.fill_(float("nan"))
        fc1_triton(x8, p.w1, p.alpha1, y, dataclasses.replace(base, split_k=sk), x_scale=sx, routing=alpha,
                   skip=True)
        outs[sk] = y.float().clone()
    diff = max(((outs[s] - outs[1]).norm() / outs[1].norm()).item() for s in splits)
    assert diff < 1e-2 and not any(torch.isnan(o).any() for o in outs.values())
    fns = {}
    for sk in splits:
        c = dataclasses.replace(base, split_k=sk)
        fns[f"f{sk}"] = lambda c=c: fc1_triton(x8, p.w1, p.alpha1, y, c, x_scale=sx, routing=alpha, skip=True,
                                               fill=False)
    for sk in splits:
        fns[f"l{sk}"] = with_split(sk, lambda: moe(x))
    t = {k: [] for k in fns}
    for _ in range(3):
        for k, fn in fns.items():
            t[k].append(timer(fn)["us"])
    t = {k: statistics.median(v) for k, v in t.items()}
    print(f"| {M} | " + " | ".join(f"{t[f'f{s}']:.1f}" for s in splits) + " | "
          + " | ".join(f"{t[f'l{s}']:.1f}" for s in splits) + f" | {diff:.1e} |", flush=True)
ops1.default_skip_config = default_skip_config
