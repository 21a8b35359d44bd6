"""Persistent Triton FC1 (one tile after another per program) and two programs per SM, against the
grid kernel, at
DeepSeek-V3 TP8 fp8. Every variant checked against the fp32 reference, then all timed in
interleaved rounds with cuBLAS's bare FP8 GEMM; floor = weight + x + output bytes / the measured
read ceiling. python bench/probes/fc1_persistent.py [M ...] (JSON to $OUT if set)"""

import dataclasses
import json
import os
import sys

import torch

from densemoe.bench.common import read_ceiling
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc1 import can_implement, fc1_triton
from densemoe.kernels.common import Fc1Problem
from densemoe.ops.fc1_configs import default_config
from densemoe.quant import quantize_per_token
from densemoe.reference import fc1_ref

ms = [int(a) for a in sys.argv[1:]] or [1, 32, 64, 96, 128, 192, 256]
timer = Timer(reps=20)
ceiling = read_ceiling(timer)["tb_s"]
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
N = 2 * E * I
one = torch.ones((), device="cuda")
print(f"{torch.cuda.get_device_name()} read ceiling {ceiling:.3f} TB/s", flush=True)


def variants(M):
    base = default_config(Fc1Problem(M, H, E, I, torch.float8_e4m3fn, torch.bfloat16))
    out = {"grid(default)": base}
    R = dataclasses.replace
    out["pers1"] = R(base, persistent=1)
    # (the run in bench/results/fc1_persistent_h100_2026-11-26.md also timed a flattened and a
    # warp-specialised persistent loop, config fields dropped since: commit 191b8d0)
    small = R(base, block_k=128, num_stages=3) if base.swap_ab else R(base, block_i=64, block_k=128, num_warps=4,
                                                                          num_stages=3)
    out["grid(2/SM)"] = small
    out["pers2"] = R(small, persistent=2)
    if base.swap_ab and base.block_m >= 64:
        out["grid bi128"] = R(base, block_i=128, num_warps=8, block_k=128, num_stages=4)
        out["pers1 bi128"] = R(base, block_i=128, num_warps=8, block_k=128, num_stages=4, persistent=1)
    return out


records = []
for M in ms:
    x8, sx = quantize_per_token(case.x(M))
    ref = fc1_ref(x8, p.w1, p.alpha1, x_scale=sx, out_dtype=torch.float32, compute_dtype=torch.float32)
    names, fns, cfgs = ["cublas_fp8"], [lambda: torch._scaled_mm(x8, p.w1.T, scale_a=one, scale_b=one,
                                                                 out_dtype=torch.bfloat16)], [None]
    prob = Fc1Problem(M, H, E, I, torch.float8_e4m3fn, torch.bfloat16)
    for name, cfg in variants(M).items():
        ok, why = can_implement(prob, cfg)
        if not ok:
            print(f"M={M} {name}: cannot implement: {why}", flush=True)
            continue
        out = torch.full((M, E * I), float("nan"), dtype=torch.bfloat16, device="cuda")
        try:
            fc1_triton(x8, p.w1, p.alpha1, out, cfg, x_scale=sx)
            torch.cuda.synchronize()
        except Exception as exc:  # a variant the device's Triton cannot compile
            print(f"M={M} {name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            print(f"M={M} {name}: WRONG rel err {err:.3e}", flush=True)
            continue
        names.append(name)
        cfgs.append(cfg)
        fns.append(lambda cfg=cfg, out=out: fc1_triton(x8, p.w1, p.alpha1, out, cfg, x_scale=sx))
    del ref
    res = timer.compare(fns)
    nbytes = N * H + M * H + M * E * I * 2
    floor = nbytes / ceiling / 1e6
    cub = res[0]["us"]
    for name, cfg, r in zip(names, cfgs, res):
        rec = dict(M=M, variant=name, config=cfg.to_str() if cfg else "cublas", us=r["us"],
                   us_rounds=r["us_rounds"], floor_us=floor, pct_floor=100 * floor / r["us"],
                   tb_s=nbytes / r["us"] / 1e6, tflops=2 * M * N * H / r["us"] / 1e6, x_cublas=cub / r["us"])
        records.append(rec)
        print(f"M={M:4d} {name:18s} {r['us']:7.1f} us  {rec['pct_floor']:5.1f}% floor  x cuBLAS {rec['x_cublas']:.3f}"
              f"  rounds {' '.join(f'{u:.1f}' for u in r['us_rounds'])}", flush=True)
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "fc1_persistent.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), read_ceiling_tb_s=ceiling, records=records), f, indent=1)
