"""Does FC1's output traffic set its speed at M = 64-256 (TP8 fp8)? The same call writing fp32,
bf16 and fp8 (static scale): 4, 2 and 1 bytes per output. Interleaved rounds; each output checked
against the fp32 reference first. python bench/probes/fc1_outbytes.py"""

import torch

import densemoe
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.quant import FP8, quantize_per_token
from densemoe.reference import fc1_ref

timer = Timer(reps=20)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
for M in (64, 128, 256):
    x8, sx = quantize_per_token(case.x(M))
    ref = fc1_ref(x8, p.w1, p.alpha1, x_scale=sx, out_dtype=torch.float32, compute_dtype=torch.float32)
    oscale = (ref.abs().amax() / 448).reshape(1)
    fns = {}
    for name, kw in (("fp32", dict(out_dtype=torch.float32)), ("bf16", dict(out_dtype=torch.bfloat16)),
                     ("fp8", dict(out_dtype=FP8, out_scale=oscale))):
        out = densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, **kw).float()
        if name == "fp8":
            out = out * oscale
        err = ((out - ref).norm() / ref.norm()).item()
        assert err < (0.08 if name == "fp8" else 1e-2), (name, err)
        fns[name] = lambda kw=kw: densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, **kw)
    res = timer.compare(list(fns.values()))
    print(f"M={M} " + " ".join(f"{k}={r['us']:.1f}" for k, r in zip(fns, res))
          + f" | output MB fp32/bf16/fp8 {M * case.E * case.I * 4 / 1e6:.1f}/{M * case.E * case.I * 2 / 1e6:.1f}/"
          f"{M * case.E * case.I / 1e6:.1f}", flush=True)
