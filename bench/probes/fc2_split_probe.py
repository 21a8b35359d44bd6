"""FC2 with skipping at small M (DeepSeek-V3 TP8 fp8, uniform top-8) with each column tile's
picked experts cut over `split` programs (partial sums meeting in the stream's reused, self-zeroing
workspace; the split was last measured before that workspace existed, with a memset per call),
pipeline depth 4-8: each output checked against the default config's, timed in 3 interleaved
rounds (the benchmark's Timer). With "ids" (M = 1 only): FC2 walking the token's top-k ids
(``expert_ids``), one-op graph and in a graph. python bench/probes/fc2_split_probe.py [M,...] [ids]"""

import dataclasses
import statistics
import sys

import torch

from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.bench.skip import routing_alpha
from densemoe.kernels.triton.fc2 import can_implement, fc2_triton
from densemoe.kernels.common import Fc2Problem
from densemoe.ops.fc2_configs import default_skip_config
from densemoe.quant import quantize_y_fold_alpha

ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8").split(",")]
IDS = len(sys.argv) > 2 and sys.argv[2] == "ids"
timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H, k = case.E, case.I, case.H, case.k
gen = torch.Generator(device="cuda").manual_seed(3)
for M in ms:
    alpha = routing_alpha(M, E, k, "uniform", gen, "cuda")
    y = torch.randn(M, E * I, device="cuda").to(torch.bfloat16)
    y8, a2 = quantize_y_fold_alpha(y, alpha, p.w2_scale)
    ids = alpha[0].nonzero().reshape(-1) if IDS and M == 1 else None
    prob = Fc2Problem(M, H, E, I, y8.dtype, torch.bfloat16)
    base = default_skip_config(prob)
    out = torch.empty(M, H, dtype=torch.bfloat16, device="cuda")
    fc2_triton(y8, p.w2, a2, out, base, skip=True)
    ref = out.float().clone()
    fns = {}
    for split in (1, 2, 3, 4):
        for st in (4, 6, 8):
            for cps in (1, 2):
                c = dataclasses.replace(base, split=split, num_stages=st, ctas_per_sm=cps)
                if not can_implement(prob, c)[0] or (cps == 2 and split == 1):
                    continue
                out.fill_(float("nan"))
                fc2_triton(y8, p.w2, a2, out, c, skip=True, expert_ids=ids)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                assert err < 1e-3 and not torch.isnan(out).any(), (c, err)
                fns[f"split{split} st{st} cps{cps}"] = lambda c=c: fc2_triton(y8, p.w2, a2, out, c, skip=True,
                                                                                expert_ids=ids)
    t = {kk: [] for kk in fns}
    tg = {kk: [] for kk in fns}
    for _ in range(3):
        for kk, fn in fns.items():
            t[kk].append(timer(fn)["us"])
            if IDS:
                tg[kk].append(timer.in_graph(fn)["us"])
    t = {kk: statistics.median(v) for kk, v in t.items()}
    if IDS:
        print(f"M={M} in a graph: " + ", ".join(f"{kk} {statistics.median(v):.1f}" for kk, v in
                                               sorted(tg.items(), key=lambda kv: statistics.median(kv[1]))))
    print(f"M={M} default split={base.split} stages={base.num_stages}: " + ", ".join(
        f"{kk} {v:.1f}" for kk, v in sorted(t.items(), key=lambda kv: kv[1])), flush=True)
