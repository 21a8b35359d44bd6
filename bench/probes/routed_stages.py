"""Where the routed path's time goes (issue 19): each launch of ``routed_experts`` timed alone on
its own buffers (Timer: graph replays, L2 flushed) beside the whole path, the routed floor (the
picked experts' bytes over the read ceiling measured in the same process), and each GEMM's
TB/s of the weights it reads. Checked first: the whole path against the dense path.

    python bench/probes/routed_stages.py [shape] [dtype] [M,...] [config]

shape: deepseek-v3-tp8 (default) or any of ``python -m densemoe shapes``; dtype: fp8 (default) or
bf16; config: a ``RoutedConfig.to_str()`` to pin (default: the library's choice). One line per M:
us of quant (fp8), schedule, FC1, FC2, combine, their sum, the whole path, the floor."""

import sys

import torch

import densemoe
from densemoe.bench.common import read_ceiling
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.common import RoutedProblem
from densemoe.kernels.triton import routed as kern
from densemoe.kernels.triton.routed import RoutedConfig
from densemoe.ops import routed_configs
from densemoe.ops.routed import routed_experts
from densemoe.quant import FP8, quantize_per_token
from densemoe.timing import Timer
from densemoe.tuning.ops import routed_topk

shape = sys.argv[1] if len(sys.argv) > 1 else "deepseek-v3-tp8"
dt = sys.argv[2] if len(sys.argv) > 2 else "fp8"
ms = [int(m) for m in (sys.argv[3] if len(sys.argv) > 3 else "1,16,64,128,512,2048").split(",")]
pinned = RoutedConfig.from_str(sys.argv[4]) if len(sys.argv) > 4 else None
timer = Timer(reps=20)
ceiling = read_ceiling(timer)["tb_s"]
case = ExpertsCase(shape, "cuda")
p = case.prepared[dt]
E, H, I, k = p.num_experts, p.hidden, p.inter, case.k
print(f"# {shape} {dt} read ceiling {ceiling:.2f} TB/s; us per launch (TB/s of the weights read)")
for M in ms:
    x = case.x(M)
    # the same typical routing in every run (seeded; as many experts as expected, within one): the
    # stages compare across device calls and with the tuner's draws
    ids, wts = routed_topk(M, E, k, "cuda", torch.Generator(device="cuda").manual_seed(M))
    alpha = torch.zeros(M, E, device="cuda").scatter(1, ids, wts)
    cfg = pinned or routed_configs.choose(RoutedProblem(M, H, E, I, k, p.dtype, torch.bfloat16), "cuda").config
    whole = routed_experts(x, p, ids, wts, config=cfg)
    dense = densemoe.experts_forward(x, p, alpha, strategy="dense")
    err = ((whole.float() - dense.float()).norm() / dense.float().norm()).item()
    assert err < (0.05 if dt == "fp8" else 2e-2), f"M={M}: routed vs dense rel err {err:.3e}"
    P = M * k
    s_pairs = torch.empty(P, dtype=torch.int32, device="cuda")
    offs = torch.empty(E + 1, dtype=torch.int32, device="cuda")
    kern.schedule_launch(ids, E, s_pairs, offs)
    xq, sx = quantize_per_token(x) if p.dtype == FP8 else (x, None)
    y = torch.empty(P, I, dtype=FP8 if p.dtype == FP8 else torch.bfloat16, device="cuda")
    ys = torch.empty(P, -(-I // cfg.fc1_block_i), device="cuda") if p.dtype == FP8 else None
    rows = torch.empty(P, H, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(M, H, dtype=torch.bfloat16, device="cuda")
    kern.fc1_launch(xq, p.w1, p.alpha1, sx, s_pairs, offs, y, ys, k, cfg)
    stages = {
        "quant": (lambda: quantize_per_token(x)) if p.dtype == FP8 else None,
        "schedule": lambda: kern.schedule_launch(ids, E, s_pairs, offs),
        "fc1": lambda: kern.fc1_launch(xq, p.w1, p.alpha1, sx, s_pairs, offs, y, ys, k, cfg),
        "fc2": lambda: kern.fc2_launch(y, ys, p.w2, p.w2_scale, s_pairs, offs, wts.float(), rows, cfg.fc1_block_i,
                                       cfg, k),
        "combine": lambda: kern.combine_launch(rows, ids, out, E),
    }
    us = {n: timer(f)["us"] for n, f in stages.items() if f is not None}
    us["whole"] = timer(lambda: routed_experts(x, p, ids, wts, config=cfg))["us"]
    picked = int(torch.zeros(E, dtype=torch.bool, device="cuda").index_fill_(0, ids.reshape(-1), True).sum())
    w_bytes = picked * 3 * H * I * p.w1.element_size()
    floor = w_bytes / (ceiling * 1e6)
    tb = {n: (w_bytes * (2 / 3 if n == "fc1" else 1 / 3)) / (us[n] * 1e6) for n in ("fc1", "fc2")}
    parts = " ".join(f"{n} {v:.1f}" + (f" ({tb[n]:.2f})" if n in tb else "") for n, v in us.items() if n != "whole")
    print(f"M={M} {cfg.short()}: {parts} | sum {sum(v for n, v in us.items() if n != 'whole'):.1f} "
          f"whole {us['whole']:.1f} floor {floor:.1f} ({floor / us['whole']:.0%}) err_vs_dense {err:.1e}", flush=True)
