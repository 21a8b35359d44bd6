"""The layer's graph at small M, kernel by kernel (torch.profiler over CUDA-graph replays, L2
flushed before each), and FC2 with the y quantisation inside at several pipeline depths.
python bench/experiments/m1_layer_probe.py [M,...]"""

import dataclasses
import sys

import torch

from densemoe.bench.common import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc2 import Fc2Problem, fc2_triton
from densemoe.layer import DenseMoE
from densemoe.ops.fc2 import default_skip_config, fc2_quant_y
from densemoe.quant import quantize_per_token

ms = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,2,8").split(",")]
timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
moe = DenseMoE(p, case.gate, case.k, renormalize=True)
for M in ms:
    xm = case.x(M)
    r = timer.compare([lambda: moe(xm)], rounds=2)[0]
    print(f"layer M={M}: {r['us']:.1f} us", flush=True)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe(xm)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        moe(xm)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            timer.flush()
            g.replay()
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    last = max(i for i, e in enumerate(evs) if "_read_kernel" in e.name)
    t0 = evs[last].time_range.end
    for e in evs[last + 1:]:
        print(f"    +{e.time_range.start - t0:7.1f}  {e.time_range.end - e.time_range.start:6.1f}  {e.name[:80]}")
    # FC2 with the quantisation inside: the default depth and others
    route = moe.route(xm)
    x8, sx = quantize_per_token(xm)
    import densemoe
    y = densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=route.alpha)
    prob = Fc2Problem(M, H, E, I, p.w2.dtype, torch.bfloat16)
    base = default_skip_config(prob)
    out = torch.empty(M, H, dtype=torch.bfloat16, device="cuda")
    want = fc2_quant_y(y, p.w2, route.alpha, p.w2_scale, skip=True)
    fns, names = [], []
    from densemoe.quant import quantize_y_fold_alpha
    y8, a2 = quantize_y_fold_alpha(y, route.alpha, p.w2_scale)
    for swap in (True, False):
        c = dataclasses.replace(base, swap_ab=swap)
        fc2_triton(y, p.w2, route.alpha, out, c, skip=True, quant_a=True, w_scale=p.w2_scale)
        assert torch.equal(out, want) or not swap
        fns.append(lambda c=c: fc2_triton(y, p.w2, route.alpha, out, c, skip=True, quant_a=True, w_scale=p.w2_scale))
        names.append(f"fc2 quant inside M={M} swap={swap}")
        fns.append(lambda c=c: fc2_triton(y8, p.w2, a2, out, c, skip=True))
        names.append(f"fc2 fp8 input M={M} swap={swap}")
    # the router: the gate kernel (+ quantisation) against F.linear + quantize_per_token
    from densemoe import routing
    fns.append(lambda: routing.router_logits(xm, moe.gate_weight, quantize=True))
    names.append(f"router_logits+quant kernel M={M}")
    fns.append(lambda: routing.router_logits(xm, moe.gate_weight, quantize=True, impl="torch"))
    names.append(f"F.linear + quantize_per_token M={M}")
    for n, r in zip(names, timer.compare(fns, rounds=2)):
        print(f"  {n:40s} {r['us']:7.1f} us", flush=True)
