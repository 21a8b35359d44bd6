"""Where M = 1 time goes (issue 6), H100, DeepSeek-V3 TP8 fp8, 8 random experts picked:
small-read ceilings through the benchmark's timer, FC1 / FC2 skipping-kernel variants (deeper
pipelines, smaller tiles), and the kernels of the layer's graph from torch.profiler.
python bench/probes/m1_probe.py"""

import dataclasses
import json
import os

import torch
import triton
import triton.language as tl

import densemoe
from densemoe.bench.common import graph_kernels
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.triton.fc1 import Fc1TritonConfig, fc1_triton
from densemoe.kernels.triton.fc2 import Fc2TritonConfig, fc2_triton
from densemoe.layer import DenseMoE
from densemoe.quant import quantize_per_token, quantize_y_fold_alpha
from densemoe.reference import fc1_ref, fc2_ref

R = dataclasses.replace
out_dir = os.environ.get("OUT", "/tmp")
timer = Timer(reps=30)
res = {}


@triton.jit
def _gather_read(x_ptr, ids_ptr, out_ptr, CHUNK, PER: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.load(ids_ptr + pid // PER)
    base = e.to(tl.int64) * CHUNK + (pid % PER).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in tl.range(ITERS):
        acc ^= tl.load(x_ptr + base + i * BLOCK + tl.arange(0, BLOCK))
    tl.store(out_ptr + pid, tl.sum(acc, 0))


@triton.jit
def _nop(x_ptr):
    tl.store(x_ptr, 1)


def show(name, r, nbytes=None):
    res[name] = r["us"]
    bw = f"  {nbytes / r['us'] / 1e6:.2f} TB/s" if nbytes else ""
    print(f"{name:60s} {r['us']:7.1f} us{bw}", flush=True)


case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
gen = torch.Generator(device="cuda").manual_seed(3)
dummy = torch.zeros(4, dtype=torch.int32, device="cuda")
show("trivial kernel", timer(lambda: _nop[(1,)](dummy)))

# ---- small reads: 8 random experts' w1 (3.67 MB each) and w2-sized chunks, as int32
w1i = p.w1.view(torch.int32).view(-1)
ids = torch.randperm(E, device="cuda", generator=gen)[:8].to(torch.int32).contiguous()
chunk1 = 2 * I * H // 4
for nexp in (1, 8):
    for block, iters in ((1024, 4), (2048, 4), (1024, 16), (4096, 4), (512, 8)):
        per = chunk1 // (block * iters)
        o = torch.empty(nexp * per, dtype=torch.int32, device="cuda")
        show(f"read {nexp} expert(s) of w1 ({nexp * 2 * I * H / 1e6:.1f} MB) b{block} i{iters} grid {nexp * per}",
             timer(lambda: _gather_read[(nexp * per,)](w1i, ids, o, chunk1, PER=per, BLOCK=block, ITERS=iters)), nexp * 2 * I * H)

# ---- FC1, M = 1, 8 random experts
M = 1
alpha = torch.zeros(M, E, device="cuda")
alpha[0, ids.long()] = torch.rand(8, device="cuda", generator=gen) + 0.1
x = case.x(M)
x8, sx = quantize_per_token(x)
ref1 = fc1_ref(x8, p.w1, p.alpha1, x_scale=sx).float() * (alpha != 0).repeat_interleave(I, 1)
y = torch.empty(M, E * I, dtype=torch.bfloat16, device="cuda")
fc1_vars = {
    "default 64r bk256 st4 w4": Fc1TritonConfig(16, 64, 256, 4, 4, 1, 1, persistent=1),
    "64r bk256 st5": Fc1TritonConfig(16, 64, 256, 4, 5, 1, 1, persistent=1),
    "64r bk256 st6": Fc1TritonConfig(16, 64, 256, 4, 6, 1, 1, persistent=1),
    "64r bk128 st8": Fc1TritonConfig(16, 64, 128, 4, 8, 1, 1, persistent=1),
    "64r bk128 st11": Fc1TritonConfig(16, 64, 128, 4, 11, 1, 1, persistent=1),
    "64r bk256 st4 w8": Fc1TritonConfig(16, 64, 256, 8, 4, 1, 1, persistent=1),
    "32r bk256 st6": Fc1TritonConfig(16, 32, 256, 4, 6, 0, 1, persistent=1),
    "32r bk256 st10": Fc1TritonConfig(16, 32, 256, 4, 10, 0, 1, persistent=1),
    "16r bk256 st8": Fc1TritonConfig(16, 16, 256, 4, 8, 0, 1, persistent=1),
    "16r bk256 st16": Fc1TritonConfig(16, 16, 256, 4, 16, 0, 1, persistent=1),
    "16r bk128 st24": Fc1TritonConfig(16, 16, 128, 4, 24, 0, 1, persistent=1),
}
fns, names = [], []
for name, c in fc1_vars.items():
    try:
        y.fill_(float("nan"))
        fc1_triton(x8, p.w1, p.alpha1, y, c, x_scale=sx, routing=alpha, skip=True, fill=True)
        err = ((y.float() - ref1).norm() / ref1.norm()).item()
        if not err < 1e-2:
            print(f"FC1 {name}: WRONG {err}")
            continue
    except Exception as ex:  # noqa: BLE001
        print(f"FC1 {name}: {type(ex).__name__} {str(ex)[:200]}")
        continue
    fns.append(lambda c=c: fc1_triton(x8, p.w1, p.alpha1, y, c, x_scale=sx, routing=alpha, skip=True, fill=False))
    names.append("fc1 M=1 8exp " + name)
ysl = torch.empty(M, 8 * I, dtype=torch.bfloat16, device="cuda")
for st in (4, 6):
    c = Fc1TritonConfig(16, 64, 256, 4, st, 1, 1)
    fns.append(lambda c=c: fc1_triton(x8, p.w1[: 8 * 2 * I], p.alpha1[:8], ysl, c, x_scale=sx))
    names.append(f"fc1 dense grid on an 8-expert slice st{st}")
for n, r in zip(names, timer.compare(fns, rounds=2)):
    show(n, r, 8 * 2 * I * H)

# ---- FC2, M = 1
yfull = densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=alpha)
y8, a2 = quantize_y_fold_alpha(yfull, alpha, p.w2_scale)
ref2 = fc2_ref(y8, p.w2, a2).float()
o = torch.empty(M, H, dtype=torch.bfloat16, device="cuda")
fc2_vars = {
    "default 16x64 bk256 st6": Fc2TritonConfig(16, 64, 256, 4, 6, True, True, 1, 1),
    "16x64 bk256 st8": Fc2TritonConfig(16, 64, 256, 4, 8, True, True, 1, 1),
    "16x64 bk128 st8": Fc2TritonConfig(16, 64, 128, 4, 8, True, True, 1, 1),
    "16x64 bk128 st12": Fc2TritonConfig(16, 64, 128, 4, 12, True, True, 1, 1),
    "16x64 bk256 st4": Fc2TritonConfig(16, 64, 256, 4, 4, True, True, 1, 1),
    "16x64 bk256 st3": Fc2TritonConfig(16, 64, 256, 4, 3, True, True, 1, 1),
    "16x128 bk256 st4 w4": Fc2TritonConfig(16, 128, 256, 4, 4, True, True, 1, 1),
    "16x64 bk256 st6 split2": Fc2TritonConfig(16, 64, 256, 4, 6, True, True, 2, 1),
    "16x64 bk256 st3 cps2": Fc2TritonConfig(16, 64, 256, 4, 3, True, True, 1, 2),
}
fns, names = [], []
for name, c in fc2_vars.items():
    try:
        o.fill_(float("nan"))
        fc2_triton(y8, p.w2, a2, o, c, skip=True)
        err = ((o.float() - ref2).norm() / ref2.norm()).item()
        if not err < 1e-2:
            print(f"FC2 {name}: WRONG {err}")
            continue
    except Exception as ex:  # noqa: BLE001
        print(f"FC2 {name}: {type(ex).__name__} {str(ex)[:200]}")
        continue
    fns.append(lambda c=c: fc2_triton(y8, p.w2, a2, o, c, skip=True))
    names.append("fc2 M=1 8exp " + name)
for n, r in zip(names, timer.compare(fns, rounds=2)):
    show(n, r, 8 * I * H)

# ---- the layer's kernels (graph replays under torch.profiler)
moe = DenseMoE(p, case.gate, case.k, renormalize=True)
for M in (1, 8):
    xm = case.x(M)
    show(f"layer M={M}", timer(lambda: moe(xm)))
    kernels = graph_kernels(lambda: moe(xm), timer)
    print(f"  layer M={M} graph kernels (start offset after the flush, duration), us:")
    for name, start, dur in kernels:
        print(f"    +{start:7.1f}  {dur:6.1f}  {name[:90]}")
    res[f"layer M={M} kernels"] = [(name[:60], start, dur) for name, start, dur in kernels]
print("triton", triton.__version__, "pdl:", hasattr(tl.extra.cuda, "gdc_wait") if hasattr(tl, "extra") else "?")
json.dump(res, open(os.path.join(out_dir, "m1_probe.json"), "w"), indent=1)
