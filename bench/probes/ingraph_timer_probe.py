"""How much of a small op's time through the benchmark's Timer is the graph's own launch: each op
timed (a) as the benchmarks do (the op alone in a CUDA graph, replayed after the L2 flush, events
around the replay) and (b) inside one graph behind the flush kernel, as it runs in a serving
engine's graph: median of [flush; op] replays minus median of [flush] replays (interleaved,
events around each replay). Ops: an empty kernel, a bare read of 29.4 MB (FC1's M = 1 bytes),
FC1 / FC2 with skipping and the layer at M = 1-2 (DeepSeek-V3 TP8 fp8, uniform top-8), cuBLAS's
fp8 GEMM of FC2's shape at M = 16 (a baseline). python bench/probes/ingraph_timer_probe.py"""

import statistics

import torch
import triton
import triton.language as tl

from densemoe.timing import Timer, capture
from densemoe.bench.layer import ExpertsCase
from densemoe.layer import DenseMoE
from densemoe.ops.fc1 import fc1
from densemoe.ops.fc2 import fc2
from densemoe.quant import quantize_per_token, quantize_y_fold_alpha


@triton.jit
def _noop(p):
    tl.store(p, 1.0)


@triton.jit
def _read(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + pid, tl.sum(v, axis=0))


timer = Timer(reps=50)


def in_graph(fn, reps=200):
    g1 = capture(lambda: (timer.flush(), fn()))[0]
    g0 = capture(timer.flush)[0]
    t1, t0 = [], []
    for _ in range(20):
        g1.replay()
        g0.replay()
    for _ in range(reps):
        for g, t in ((g1, t1), (g0, t0)):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            t.append(a.elapsed_time(b) * 1e3)
    return statistics.median(t1) - statistics.median(t0), statistics.median(t0)


case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
moe = DenseMoE(p, case.gate, case.k, renormalize=True)
buf = torch.empty(8, device="cuda")
n = 29_360_128 // 4
xs = torch.randint(-100, 100, (n,), dtype=torch.int32, device="cuda")
part = torch.empty(triton.cdiv(n, 4096), dtype=torch.int32, device="cuda")
ops = {"empty kernel": lambda: _noop[(1,)](buf),
       "bare read 29.4 MB": lambda: _read[(triton.cdiv(n, 4096),)](xs, part, n, BLOCK=4096)}
for M in (1, 2):
    x = case.x(M)
    alpha = moe.route(x).alpha
    x8, sx = quantize_per_token(x)
    y = fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=alpha, skip=True)
    y8, a2 = quantize_y_fold_alpha(y, alpha, p.w2_scale)
    ops[f"FC1 skip M={M}"] = lambda x8=x8, sx=sx, alpha=alpha: fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=alpha,
                                                                  skip=True)
    ops[f"FC2 skip M={M}"] = lambda y8=y8, a2=a2: fc2(y8, p.w2, a2, skip=True)
    ops[f"layer M={M}"] = lambda x=x: moe(x)
a16 = torch.randn(16, E * I, device="cuda").to(torch.float8_e4m3fn)
one = torch.ones(1, device="cuda")
w2t = p.w2.T
ops["cuBLAS fp8 FC2 shape M=16"] = lambda: torch._scaled_mm(a16, w2t, scale_a=one, scale_b=one,
                                                             out_dtype=torch.bfloat16)
print("| op | Timer us (op alone in a graph) | in a graph behind the flush, us | difference |")
print("|---|---:|---:|---:|")
for name, fn in ops.items():
    fn()
    alone = statistics.median(timer(fn)["us"] for _ in range(3))
    ig, flush = in_graph(fn)
    print(f"| {name} | {alone:.1f} | {ig:.1f} | {alone - ig:.1f} |", flush=True)
print(f"(flush graph alone: {flush:.1f} us)")
