"""Where the routed path's time goes (issue 19): each launch of ``routed_experts`` timed alone on
its own buffers (Timer: graph replays, L2 flushed) beside the whole path, the routed floor (the
picked experts' bytes over the read ceiling measured in the same process), and each GEMM's
TB/s of the weights it reads. Checked first: the whole path against the dense path.

    python bench/probes/routed_stages.py [shape] [dtype] [M,...] [config]

shape: deepseek-v3-tp8 (default) or any of ``python -m densemoe shapes``; dtype: fp8 (default) or
bf16; config: a ``RoutedConfig.to_str()`` to pin (default: the library's choice). One line per M:
us of quant (fp8), schedule, FC1 (the library's FC1 stage, schedule, tile list and any sorted copy
included, less the schedule timed alone), FC2, combine, their sum, the whole path, the floor."""

import sys

import torch

import densemoe
from densemoe.bench.common import read_ceiling
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.common import RoutedProblem
from densemoe.kernels.triton import routed as kern
from densemoe.kernels.triton.routed import RoutedConfig
from densemoe.ops import routed_configs
from densemoe.ops.routed import _fc1_stage, _fc2_stage, routed_experts
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
    xq, sx = quantize_per_token(x) if p.dtype == FP8 else (x, None)
    # FC1 as the library runs it (Triton, or CuTe on the sorted copy or gathering x), schedule included
    s_pairs, offs, y, ys = _fc1_stage(xq, sx, p.w1, p.alpha1, ids, cfg)
    rows = torch.empty(P, H, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(M, H, dtype=torch.bfloat16, device="cuda")
    plain_fc2 = not (cfg.fc2_cute or cfg.atomic_combine or cfg.fused_combine)
    stages = {
        "quant": (lambda: quantize_per_token(x)) if p.dtype == FP8 else None,
        "schedule": lambda: kern.schedule_launch(ids, E, s_pairs, offs),
        "sched+fc1": lambda: _fc1_stage(xq, sx, p.w1, p.alpha1, ids, cfg),
        # FC2 on its own tiles (cfg.fc2_part), rows in pair order; a config whose FC2 also combines
        # (CuTe, atomic, fused) is timed with its combine
        "fc2" if plain_fc2 else "fc2+combine": (
            (lambda: kern.fc2_launch(y, ys, p.w2, p.w2_scale, s_pairs, offs, wts.float(), rows, cfg.fc1_block_i,
                                     cfg, k)) if plain_fc2 else
            (lambda: _fc2_stage(y, ys, p.w2, p.w2_scale, s_pairs, offs, ids, wts.float(), out, cfg))),
        "combine": (lambda: kern.combine_launch(rows, ids, out, E)) if plain_fc2 else None,
    }
    us = {n: timer(f)["us"] for n, f in stages.items() if f is not None}
    us["whole"] = timer(lambda: routed_experts(x, p, ids, wts, config=cfg))["us"]
    picked = int(torch.zeros(E, dtype=torch.bool, device="cuda").index_fill_(0, ids.reshape(-1), True).sum())
    w_bytes = picked * 3 * H * I * p.w1.element_size()
    floor = w_bytes / (ceiling * 1e6)
    us["fc1"] = us["sched+fc1"] - us["schedule"]  # (the difference of two timings: FC1's own launches)
    share = {"fc1": 2 / 3, "fc2": 1 / 3, "fc2+combine": 1 / 3}  # w1 is 2/3 of an expert's bytes, w2 1/3
    tb = {n: w_bytes * f / (us[n] * 1e6) for n, f in share.items() if n in us}
    # each launch's least HBM traffic at the read ceiling: FC1 its weights; FC2 its weights and the
    # pairs' bf16 rows it writes; the combine those rows read and the output written
    row_bytes = P * H * 2
    bound = {"fc1": w_bytes * 2 / 3, "fc2": w_bytes / 3 + row_bytes, "combine": row_bytes + M * H * 2}
    bound["fc2+combine"] = w_bytes / 3 + M * H * 2
    bounds = " ".join(f"{n} {b / (ceiling * 1e6):.1f}" for n, b in bound.items() if n in us)
    parts = " ".join(f"{n} {v:.1f}" + (f" ({tb[n]:.2f})" if n in tb else "") for n, v in us.items()
                     if n not in ("whole", "sched+fc1"))
    total = sum(v for n, v in us.items() if n not in ("whole", "sched+fc1"))
    print(f"M={M} {cfg.short()}: {parts} | sum {total:.1f} "
          f"whole {us['whole']:.1f} floor {floor:.1f} ({floor / us['whole']:.0%}) err_vs_dense {err:.1e} | "
          f"bounds us: {bounds}", flush=True)
