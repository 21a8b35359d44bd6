"""Is FC1 at M = 64-256 limited by power (clocks) rather than by the kernel? The same FC1 call
and cuBLAS's bare FP8 GEMM timed with random weights and with all-zero weights (the tensor
cores and DRAM then switch far fewer bits), interleaved rounds. A diagnostic only: every
result here is also checked against the fp32 reference first.
python bench/probes/fc1_power.py"""

import torch

import densemoe
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.quant import quantize_per_token
from densemoe.reference import fc1_ref

timer = Timer(reps=20)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
w_zero = torch.zeros_like(p.w1)
one = torch.ones((), device="cuda")
for M in (1, 64, 128, 256):
    x8, sx = quantize_per_token(case.x(M))
    out = densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx)
    ref = fc1_ref(x8, p.w1, p.alpha1, x_scale=sx, out_dtype=torch.float32, compute_dtype=torch.float32)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err
    assert not densemoe.fc1(x8, w_zero, p.alpha1, x_scale=sx).float().any()
    fns = {"ours_random": lambda: densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx),
           "ours_zero_w": lambda: densemoe.fc1(x8, w_zero, p.alpha1, x_scale=sx),
           "cublas_random": lambda: torch._scaled_mm(x8, p.w1.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
           "cublas_zero_w": lambda: torch._scaled_mm(x8, w_zero.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)}
    res = timer.compare(list(fns.values()))
    print(f"M={M}: " + " ".join(f"{k}={r['us']:.1f}" for k, r in zip(fns, res)), flush=True)
