"""Expert skipping on the H100, DeepSeek-V3 TP8 fp8, uniform random top-8 routing: FC1 and FC2
with skipping (config variants) against their dense path and the skipping floor (bytes of the
picked experts / read ceiling), and the layer's pieces at small M. Every variant is checked
against the fp32 reference first; interleaved timing. python bench/probes/skip_variants.py"""

import dataclasses
import json
import os
import sys

import torch

import densemoe
from densemoe.bench.common import read_ceiling
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc1 import Fc1TritonConfig, fc1_triton
from densemoe.kernels.common import Fc1Problem
from densemoe.ops.fc1_configs import default_skip_config
from densemoe.kernels.triton.fc2 import fc2_triton
from densemoe.kernels.common import Fc2Problem
from densemoe.kernels.triton.skip import active_experts
from densemoe.layer import DenseMoE
from densemoe.ops.fc2_configs import default_skip_config as fc2_skip_config
from densemoe.quant import quantize_per_token, quantize_y_fold_alpha
from densemoe.reference import fc1_ref, fc2_ref

R = dataclasses.replace
ms = [int(a) for a in sys.argv[1:]] or [1, 2, 4, 8, 16, 32, 64, 128]
timer = Timer(reps=20)
ceiling = read_ceiling(timer)["tb_s"]
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H, k = case.E, case.I, case.H, case.k
gen = torch.Generator(device="cuda").manual_seed(1)
print(f"{torch.cuda.get_device_name()} read ceiling {ceiling:.3f} TB/s", flush=True)
records = []


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def show(M, op, name, us, floor, dense=None, extra=""):
    tgt = 1.15 * floor + 5
    rec = dict(M=M, op=op, variant=name, us=us, floor_us=floor, target_us=tgt, meets=us <= tgt)
    if dense:
        rec["dense_us"] = dense
    records.append(rec)
    print(f"M={M:4d} {op:6s} {name:34s} {us:8.1f} us  floor {floor:6.1f}  target {tgt:6.1f} "
          f"{'MEETS' if us <= tgt else '     '}" + (f"  x dense {dense / us:.2f}" if dense else "") + extra, flush=True)


for M in ms:
    top = torch.rand(M, E, device="cuda", generator=gen).topk(k, dim=1)
    alpha = torch.zeros(M, E, device="cuda").scatter_(1, top.indices, top.values.softmax(dim=1))
    n_act = int((alpha != 0).any(0).sum())
    x8, sx = quantize_per_token(case.x(M))
    # ---- FC1
    prob = Fc1Problem(M, H, E, I, torch.float8_e4m3fn, torch.bfloat16)
    base = default_skip_config(prob)
    fc1_vars = {"skip default": base}
    for bi in (16, 32, 64):
        for pers in (1, 2):
            if bi < 64:
                bk = 256
                st = max(2, min(6, (120 * 1024 // pers) // ((16 + 2 * bi) * bk)))
                c = Fc1TritonConfig(16, bi, bk, 4, st, 0, 1, persistent=pers)
            else:
                bm = base.block_m if base.swap_ab else 16
                c = Fc1TritonConfig(bm, 64, 256, 4, 4 if pers == 1 else 2, 1, 1, persistent=pers)
            if c != base and (M <= 16 or bi == 64):
                fc1_vars[f"bi{bi} p{pers} st{c.num_stages}"] = c
    if M <= 4:
        fc1_vars["bi32 p1 st3"] = Fc1TritonConfig(16, 32, 256, 4, 3, 0, 1, persistent=1)
        fc1_vars["bi32 p1 st4 bk128"] = Fc1TritonConfig(16, 32, 128, 4, 4, 0, 1, persistent=1)
        fc1_vars["bi64 p1 st6 bk128"] = Fc1TritonConfig(16, 64, 128, 4, 6, 1, 1, persistent=1)
    if M == 1:  # is the persistent kernel's inner loop pipelined? dense grid vs dense persistent
        from densemoe.ops.fc1_configs import default_config
        dc = default_config(prob)
        yy = torch.empty(M, E * I, dtype=torch.bfloat16, device="cuda")
        rr = timer.compare([lambda: fc1_triton(x8, p.w1, p.alpha1, yy, dc, x_scale=sx),
                            lambda: fc1_triton(x8, p.w1, p.alpha1, yy, R(dc, persistent=1), x_scale=sx)])
        print(f"M=1 fc1 dense grid {rr[0]['us']:.1f} us, dense persistent {rr[1]['us']:.1f} us", flush=True)
    ref1 = fc1_ref(x8, p.w1, p.alpha1, x_scale=sx, out_dtype=torch.float32, compute_dtype=torch.float32)
    ref1 = ref1 * (alpha != 0).float().repeat_interleave(I, 1)
    names, fns = ["dense"], [lambda: densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=alpha, skip=False)]
    for name, cfg in fc1_vars.items():
        y = torch.full((M, E * I), float("nan"), dtype=torch.bfloat16, device="cuda")
        try:
            fc1_triton(x8, p.w1, p.alpha1, y, cfg, x_scale=sx, routing=alpha, skip=True)
            torch.cuda.synchronize()
        except Exception as exc:
            print(f"M={M} fc1 {name}: failed {type(exc).__name__}: {str(exc)[:150]}", flush=True)
            continue
        err = rel(y, ref1)
        if not err < 1e-2:
            print(f"M={M} fc1 {name}: WRONG {err:.3e}", flush=True)
            continue
        names.append(name)
        fns.append(lambda cfg=cfg, y=y: fc1_triton(x8, p.w1, p.alpha1, y, cfg, x_scale=sx, routing=alpha, skip=True))
    del ref1
    res = timer.compare(fns)
    floor1 = (n_act * 2 * I * H + M * H + M * E * I * 2) / ceiling / 1e6
    for name, r in zip(names, res):
        show(M, "fc1", name + ("" if name == "dense" else f" [{n_act} act]"), r["us"], floor1, res[0]["us"])
    # ---- FC2
    y = densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=alpha)
    y8, alpha2 = quantize_y_fold_alpha(y, alpha, p.w2_scale)
    prob2 = Fc2Problem(M, H, E, I, torch.float8_e4m3fn, torch.bfloat16)
    b2 = fc2_skip_config(prob2)
    fc2_vars = {"skip default": b2, "split1": R(b2, split=1), "cps2": R(b2, ctas_per_sm=2, num_stages=max(2, b2.num_stages // 2)),
                "bn128 st4": R(b2, block_n=128, num_stages=4), "bn128 split1 st4": R(b2, block_n=128, split=1, num_stages=4),
                "split2": R(b2, split=2), "st3": R(b2, num_stages=3)}
    ref2 = fc2_ref(y8, p.w2, alpha2, out_dtype=torch.float32, compute_dtype=torch.float32)
    names, fns = ["dense"], [lambda: densemoe.fc2(y8, p.w2, alpha2, skip=False)]
    for name, cfg in fc2_vars.items():
        out = torch.full((M, H), float("nan"), dtype=torch.bfloat16, device="cuda")
        try:
            fc2_triton(y8, p.w2, alpha2, out, cfg, skip=True)
            torch.cuda.synchronize()
        except Exception as exc:
            print(f"M={M} fc2 {name}: failed {type(exc).__name__}: {str(exc)[:150]}", flush=True)
            continue
        err = rel(out, ref2)
        if not err < 1e-2:
            print(f"M={M} fc2 {name}: WRONG {err:.3e}", flush=True)
            continue
        names.append(name)
        fns.append(lambda cfg=cfg, out=out: fc2_triton(y8, p.w2, alpha2, out, cfg, skip=True))
    res = timer.compare(fns)
    floor2 = (n_act * H * I + M * E * I + M * H * 2) / ceiling / 1e6
    for name, r in zip(names, res):
        show(M, "fc2", name, r["us"], floor2, res[0]["us"], f" {b2.to_str() if name == 'skip default' else ''}")
    # ---- layer pieces and the layer
    if M <= 64:
        moe_s = DenseMoE(p, case.gate, k, renormalize=True, skip=True)
        moe_d = DenseMoE(p, case.gate, k, renormalize=True, skip=False)
        xb = case.x(M)
        route = moe_s.route(xb)
        a_r = route.alpha
        n_r = int((a_r != 0).any(0).sum())
        pieces = {
            "layer skip": lambda: moe_s(xb), "layer dense": lambda: moe_d(xb),
            "experts skip": lambda: densemoe.experts_forward(xb, p, a_r, skip=True),
            "router": lambda: moe_s.route(xb),
            "quant x": lambda: quantize_per_token(xb),
            "active lists (standalone)": lambda: active_experts(a_r, 16),
            "quant y": lambda: quantize_y_fold_alpha(y, alpha, p.w2_scale),
        }
        out_s, out_d = moe_s(xb), moe_d(xb)
        print(f"M={M} layer skip vs dense rel diff {rel(out_s, out_d):.2e} ({n_r} experts active)", flush=True)
        res = timer.compare(list(pieces.values()))
        floor_l = (n_r * 3 * I * H + 2 * M * H * 2) / ceiling / 1e6
        for name, r in zip(pieces, res):
            show(M, "layer", name, r["us"], floor_l if name.startswith(("layer", "experts")) else 0.0)
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "skip_variants.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), read_ceiling_tb_s=ceiling, records=records), f)
