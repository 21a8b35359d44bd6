"""Skipping configs at small M (H100, DeepSeek-V3 TP8 fp8, uniform top-8): FC1 and FC2 config
variants around the defaults, each checked against the default's output, timed in interleaved
rounds (the benchmark's Timer). python bench/probes/skip_sweep.py [M,...] [narrow]
("narrow": the narrower tiles only: FC1 with 32 / 16 rows of I, FC2 with 32 / 16 columns)."""

import dataclasses
import json
import os
import sys

import torch

from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.bench.skip import routing_alpha
from densemoe.kernels.triton.fc1 import fc1_triton
from densemoe.kernels.common import Fc1Problem
from densemoe.ops.fc1_configs import default_skip_config as fc1_skip
from densemoe.kernels.triton.fc2 import can_implement as fc2_ok, fc2_triton
from densemoe.kernels.common import Fc2Problem
from densemoe.kernels.triton.fc1 import can_implement as fc1_ok
from densemoe.ops.fc2_configs import default_skip_config as fc2_skip
from densemoe.quant import quantize_per_token, quantize_y_fold_alpha

R = dataclasses.replace
ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8,16,32").split(",")]
NARROW = len(sys.argv) > 2 and sys.argv[2] == "narrow"
timer = Timer(reps=25)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H, k = case.E, case.I, case.H, case.k
gen = torch.Generator(device="cuda").manual_seed(7)
res = []
for M in ms:
    alpha = routing_alpha(M, E, k, "uniform", gen, "cuda")
    x8, sx = quantize_per_token(case.x(M))
    y = torch.empty(M, E * I, dtype=torch.bfloat16, device="cuda")
    prob1 = Fc1Problem(M, H, E, I, p.w1.dtype, torch.bfloat16)
    b1 = fc1_skip(prob1)
    v1 = {"default": b1}
    if NARROW:  # 2x / 4x the units at small M (tokens as the MMA's M: 16-token tiles)
        for bi in (32, 16):
            for st in (6, 8):
                v1[f"bi{bi} st{st}"] = R(b1, block_m=16, block_i=bi, swap_ab=0, num_stages=st)
    else:
        for st in (3, 5, 6):
            v1[f"st{st}"] = R(b1, num_stages=st)
        v1["w8"] = R(b1, num_warps=8)
        v1["bk128 st6"] = R(b1, block_k=128, num_stages=6)
        v1["p2 st2"] = R(b1, persistent=2, num_stages=2)
    fns, names = [], []
    fc1_triton(x8, p.w1, p.alpha1, y, b1, x_scale=sx, routing=alpha, skip=True, fill=True)
    want = y.clone()
    for n, c in v1.items():
        if not fc1_ok(prob1, c)[0] and n != "default":
            print(f"M={M} fc1 {n}: cannot implement: {fc1_ok(prob1, c)[1]}")
            continue
        y.fill_(float("nan"))
        fc1_triton(x8, p.w1, p.alpha1, y, c, x_scale=sx, routing=alpha, skip=True, fill=True)
        # (a tile of another shape sums in another order: bf16 outputs within a rounding)
        if not (torch.equal(y, want) if c.swap_ab == b1.swap_ab and c.block_i == b1.block_i
                else torch.allclose(y.float(), want.float(), rtol=1e-2, atol=1e-2)):
            print(f"M={M} fc1 {n}: WRONG")
            continue
        fns.append(lambda c=c: fc1_triton(x8, p.w1, p.alpha1, y, c, x_scale=sx, routing=alpha, skip=True, fill=False))
        names.append(("fc1", n, c.to_str()))
    y8, a2 = quantize_y_fold_alpha(want, alpha, p.w2_scale)
    out = torch.empty(M, H, dtype=torch.bfloat16, device="cuda")
    prob2 = Fc2Problem(M, H, E, I, p.w2.dtype, torch.bfloat16)
    b2 = fc2_skip(prob2)
    v2 = {"default": b2}
    if NARROW:  # 2x / 4x the column tiles (programs)
        for bn, cps in ((32, 1), (32, 2), (16, 2), (16, 3)):
            for sp in (1, 2):
                v2[f"bn{bn} cps{cps} sp{sp}"] = R(b2, block_n=bn, ctas_per_sm=cps, split=sp,
                                                  num_stages=min(8, (220 * 1024 // cps) // ((16 + bn) * 256)))
    else:
        for st in (4, 8):
            v2[f"st{st}"] = R(b2, num_stages=st)
        v2["split1" if b2.split != 1 else "split2"] = R(b2, split=1 if b2.split != 1 else 2)
        v2["split4"] = R(b2, split=4)
        v2["w8"] = R(b2, num_warps=8)
    fc2_triton(y8, p.w2, a2, out, b2, skip=True)
    want2 = out.clone()
    for n, c in v2.items():
        if not fc2_ok(prob2, c)[0] and n != "default":
            print(f"M={M} fc2 {n}: cannot implement: {fc2_ok(prob2, c)[1]}")
            continue
        out.fill_(float("nan"))
        fc2_triton(y8, p.w2, a2, out, c, skip=True)
        if not torch.allclose(out.float(), want2.float(), rtol=1e-2, atol=1e-2):
            print(f"M={M} fc2 {n}: WRONG")
            continue
        fns.append(lambda c=c: fc2_triton(y8, p.w2, a2, out, c, skip=True))
        names.append(("fc2", n, c.to_str()))
    for (op, n, cs), r in zip(names, timer.compare(fns, rounds=3)):
        res.append(dict(M=M, op=op, variant=n, config=cs, us=r["us"], us_rounds=r["us_rounds"]))
        print(f"M={M:3d} {op} {n:10s} {r['us']:7.1f} us  rounds {' '.join(f'{u:.1f}' for u in r['us_rounds'])}",
              flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "skip_sweep.json"), "w"), indent=1)
