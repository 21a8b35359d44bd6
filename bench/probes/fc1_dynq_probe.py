"""The fp8 layer's experts at small M with skipping (DeepSeek-V3 TP8, uniform top-8): FC1 quantising
its own output per (token, expert) in the epilogue (tiles holding all of I, k-range split over
split_k units) against today's FC1 (bf16 out) + quantize_y_fold_alpha; FC2 the same in both.

Timed with the benchmark's Timer (CUDA-graph replays, L2 flushed), 3 interleaved rounds:
  old3   FC1 (default skip config, bf16) + quantize_y_fold_alpha + FC2   (the layer today)
  new2   FC1 (dynamic fp8 out, config shown) + FC2 on alpha2 = alpha * y_scale * w2_scale
         (alpha2 formed once outside the timing: in the real op FC2 multiplies y_scale in)
  fc1    FC1 alone, old config / each dynamic config
Outputs checked first: each new output against the old pipeline's (relative Frobenius).
python bench/probes/fc1_dynq_probe.py [M,...]"""

import statistics
import sys

import torch

from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc1 import Fc1TritonConfig, can_implement, fc1_triton
from densemoe.kernels.common import Fc1Problem
from densemoe.ops.fc1_configs import default_skip_config
from densemoe.layer import DenseMoE
from densemoe.experts import experts_forward
from densemoe.ops.fc2 import fc2
from densemoe.quant import quantize_per_token, quantize_y_fold_alpha

ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8").split(",")]
SPLITS = {1: (8, 12, 16), 2: (4, 8, 16), 4: (2, 4, 8), 8: (1, 2, 4), 16: (1, 2)}
timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
moe = DenseMoE(p, case.gate, case.k, renormalize=True)
FP8 = torch.float8_e4m3fn

for M in ms:
    x = case.x(M)
    alpha = moe.route(x).alpha
    x8, sx = quantize_per_token(x)
    prob = Fc1Problem(M, H, E, I, FP8, torch.bfloat16)
    base = default_skip_config(prob)
    ref = experts_forward(x, p, alpha, skip=True, x_quant=(x8, sx)).float()
    y = torch.empty(M, E * I, dtype=torch.bfloat16, device="cuda")
    y8 = torch.empty(M, E * I, dtype=FP8, device="cuda")
    ys = torch.empty(M, E, dtype=torch.float32, device="cuda")
    fns = {"old3": lambda: experts_forward(x, p, alpha, skip=True, x_quant=(x8, sx)),
           "fc1old": lambda: fc1_triton(x8, p.w1, p.alpha1, y, base, x_scale=sx, routing=alpha, skip=True, fill=False)}
    fc1_triton(x8, p.w1, p.alpha1, y, base, x_scale=sx, routing=alpha, skip=True, fill=False)
    yq, a2q = quantize_y_fold_alpha(y, alpha, p.w2_scale)
    fns["quant"] = lambda: quantize_y_fold_alpha(y, alpha, p.w2_scale)
    fns["fc2"] = lambda: fc2(yq, p.w2, a2q, skip=True)
    names = {}
    for bk in (64, 128):
        for warps in (4, 8):
            for sk in SPLITS.get(M, (1, 2, 4)):
                stages = max(1, min(8, (227 * 1024 - 2048) // ((16 + 2 * 256) * bk)))
                cfg = Fc1TritonConfig(16, 256, bk, warps, stages, 1, 1, persistent=1, split_k=sk)
                ok, why = can_implement(prob, cfg, dynamic_scale=True)
                if not ok:
                    print("skip", cfg, why)
                    continue
                y8.fill_(float("nan"))
                ys.fill_(float("nan"))
                fc1_triton(x8, p.w1, p.alpha1, y8, cfg, x_scale=sx, routing=alpha, skip=True, fill=False, y_scale=ys)
                live = alpha != 0
                a2 = torch.where(live, alpha * torch.where(live, ys, 0.0) * p.w2_scale[None, :], 0.0)
                out = fc2(y8, p.w2, a2, skip=True).float()
                err = ((out - ref).norm() / ref.norm()).item()
                assert err < 3e-2 and not torch.isnan(out).any(), (cfg, err)
                key = f"bk{bk}w{warps}s{sk}"
                names[key] = err
                fns["f" + key] = (lambda cfg=cfg: fc1_triton(x8, p.w1, p.alpha1, y8, cfg, x_scale=sx, routing=alpha,
                                                             skip=True, fill=False, y_scale=ys))
                fns["n" + key] = (lambda cfg=cfg, a2=a2: (
                    fc1_triton(x8, p.w1, p.alpha1, y8, cfg, x_scale=sx, routing=alpha, skip=True, fill=False,
                               y_scale=ys), fc2(y8, p.w2, a2, skip=True)))
    t = {k: [] for k in fns}
    for _ in range(3):
        for k, fn in fns.items():
            t[k].append(timer(fn)["us"])
    t = {k: statistics.median(v) for k, v in t.items()}
    print(f"M={M} base {base.to_str()}: old3 {t['old3']:.1f} = fc1 {t['fc1old']:.1f} + quant {t['quant']:.1f} "
          f"+ fc2 {t['fc2']:.1f} (separately)", flush=True)
    for key, err in sorted(names.items(), key=lambda kv: t["n" + kv[0]]):
        print(f"  M={M} {key}: new2 {t['n' + key]:.1f}  fc1 {t['f' + key]:.1f}  err vs old {err:.1e}", flush=True)
