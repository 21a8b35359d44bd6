"""Split-k for FC1 with skipping at small M (H100, DeepSeek-V3 TP8 fp8, uniform top-8): each
tile's 28 k-tiles cut into S units that meet in an fp32 workspace, against S = 1. Checked
against the fp32 reference first; interleaved timing. python bench/experiments/skip_splitk.py"""

import json
import os

import torch

from densemoe.bench.common import Timer, read_ceiling
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc1 import Fc1Problem, Fc1TritonConfig, default_skip_config, fc1_triton
from densemoe.quant import quantize_per_token
from densemoe.reference import fc1_ref

timer = Timer(reps=20)
ceiling = read_ceiling(timer)["tb_s"]
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H, k = case.E, case.I, case.H, case.k
gen = torch.Generator(device="cuda").manual_seed(1)
records = []
for M in (1, 2, 4, 8, 16, 32):
    top = torch.rand(M, E, device="cuda", generator=gen).topk(k, dim=1)
    alpha = torch.zeros(M, E, device="cuda").scatter_(1, top.indices, top.values.softmax(dim=1))
    n_act = int((alpha != 0).any(0).sum())
    x8, sx = quantize_per_token(case.x(M))
    ref = fc1_ref(x8, p.w1, p.alpha1, x_scale=sx, out_dtype=torch.float32, compute_dtype=torch.float32)
    ref = ref * (alpha != 0).float().repeat_interleave(I, 1)
    base = default_skip_config(Fc1Problem(M, H, E, I, torch.float8_e4m3fn, torch.bfloat16))
    bm = base.block_m
    variants = {"default " + base.to_str().split(":")[1]: base}
    for bi, swap, st in ((64, 1, 4), (32, 0, 6)):
        for sk in (2, 4, 7):
            for pers in (1, 2):
                c = Fc1TritonConfig(bm if swap else 16, bi, 256, 4, st if pers == 1 else max(2, st // 2), swap, 1,
                                    persistent=pers, split_k=sk)
                if (swap or M <= 16) and c != base:
                    variants[f"bi{bi} p{pers} split{sk}"] = c
    names, fns = [], []
    for name, cfg in variants.items():
        y = torch.full((M, E * I), float("nan"), dtype=torch.bfloat16, device="cuda")
        try:
            fc1_triton(x8, p.w1, p.alpha1, y, cfg, x_scale=sx, routing=alpha, skip=True)
            torch.cuda.synchronize()
        except Exception as exc:
            print(f"M={M} {name}: failed {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            print(f"M={M} {name}: WRONG {err:.3e}", flush=True)
            continue
        names.append(name)
        fns.append(lambda cfg=cfg, y=y: fc1_triton(x8, p.w1, p.alpha1, y, cfg, x_scale=sx, routing=alpha, skip=True))
    floor = (n_act * 2 * I * H + M * H + M * E * I * 2) / ceiling / 1e6
    for name, r in zip(names, timer.compare(fns)):
        tgt = 1.15 * floor + 5
        records.append(dict(M=M, variant=name, us=r["us"], floor_us=floor, target_us=tgt, active=n_act))
        print(f"M={M:3d} [{n_act:3d} act] {name:70s} {r['us']:7.1f} us floor {floor:6.1f} target {tgt:6.1f}"
              f" {'MEETS' if r['us'] <= tgt else ''}", flush=True)
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "skip_splitk.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), read_ceiling_tb_s=ceiling, records=records), f)
