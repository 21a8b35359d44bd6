"""Why the FC1 benchmark and the tuner disagree for fp8 (TP8 M=1: 364 vs 308 us, same config):
one config timed on the benchmark's prepared weights and on the tuner's, with and without a
preallocated output, before and after cuBLAS. python bench/experiments/fc1_gap.py"""

import torch

import densemoe
from densemoe.bench.common import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc1 import Fc1Problem
from densemoe.quant import quantize_per_token
from densemoe.tuning.ops import FC1

timer = Timer(reps=20)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
for M in (1, 128):
    x8, sx = quantize_per_token(case.x(M))
    prob = Fc1Problem(M, H, E, I, torch.float8_e4m3fn, torch.bfloat16)
    (tx, tw, ta, txs), _ = FC1.make_inputs(prob, "cuda", 0, None)
    out = torch.full((M, E * I), float("nan"), dtype=torch.bfloat16, device="cuda")
    w_stats = lambda w: f"{w.float()[:64].abs().mean().item():.1f}/{(w.view(torch.uint8)[:64] == 0).float().mean().item():.3f}"  # noqa: E731
    print(f"M={M} prepared w1 {p.w1.shape} {p.w1.stride()} mean|w|/zeros {w_stats(p.w1)}; tuner w1 {tw.shape} "
          f"{tw.stride()} {w_stats(tw)}; x8 {x8.stride()} {x8.data_ptr() % 256} txs {None if txs is None else txs.shape}")
    fns = {
        "prepared": lambda: densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx),
        "prepared_out": lambda: densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, out=out),
        "tuner_w": lambda: densemoe.fc1(tx, tw, ta, x_scale=txs),
        "prepared_w_tuner_x": lambda: densemoe.fc1(tx, p.w1, p.alpha1, x_scale=txs),
        "cublas": lambda: torch._scaled_mm(x8, p.w1.T, scale_a=torch.ones((), device="cuda"),
                                           scale_b=torch.ones((), device="cuda"), out_dtype=torch.bfloat16),
    }
    for f in fns.values():
        f()
    res = timer.compare(list(fns.values()))
    print("  " + " ".join(f"{k}={r['us']:.1f} {r['us_rounds']}" for k, r in zip(fns, res)), flush=True)
