"""How fast can the bytes FC1 and FC2 read at M = 1 be read at all, through the benchmark's
Timer (CUDA-graph replay, L2 flushed)? DeepSeek-V3 TP8 fp8, 8 random experts: FC1's (8
contiguous 3.67 MB blocks of w1) and FC2's (a 256-byte segment per expert in each of w2's 7168
rows, 14.7 MB) by plain Triton read kernels, next to a trivial kernel.
python bench/probes/read_pattern_probe.py"""

import torch
import triton
import triton.language as tl

from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase


@triton.jit
def _rows_read(w_ptr, ids_ptr, out_ptr, stride, R: tl.constexpr, NE: tl.constexpr, SEG: tl.constexpr):
    """Rows [pid*R, pid*R+R) of w (int32 view), the SEG int32s of each of the NE experts' segments."""
    pid = tl.program_id(0)
    rows = pid * R + tl.arange(0, R)
    acc = tl.zeros((R, SEG), dtype=tl.int32)
    for j in tl.static_range(NE):
        e = tl.load(ids_ptr + j)
        acc ^= tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride + e * SEG + tl.arange(0, SEG)[None, :])
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _block_read(x_ptr, ids_ptr, out_ptr, CHUNK, PER: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
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


timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
ids = torch.randperm(E, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))[:8].to(torch.int32)
w1i = p.w1.view(torch.int32).view(-1)
w2i = p.w2.view(torch.int32)  # [H, E*I/4]
dummy = torch.zeros(4, dtype=torch.int32, device="cuda")
fns, names = [lambda: _nop[(1,)](dummy)], ["trivial kernel"]
chunk = 2 * I * H // 4
for block, iters in ((2048, 4), (1024, 4)):
    per = chunk // (block * iters)
    o1 = torch.empty(8 * per, dtype=torch.int32, device="cuda")
    fns.append(lambda per=per, o1=o1, block=block, iters=iters:
               _block_read[(8 * per,)](w1i, ids, o1, chunk, PER=per, BLOCK=block, ITERS=iters))
    names.append(f"FC1's bytes: 8 experts of w1, 29.4 MB contiguous blocks, {8 * per} programs")
for R in (64, 16):
    o2 = torch.empty(H // R, dtype=torch.int32, device="cuda")
    fns.append(lambda R=R, o2=o2: _rows_read[(H // R,)](w2i, ids, o2, w2i.stride(0), R=R, NE=8, SEG=I // 4))
    names.append(f"FC2's bytes: 8 experts' 256-B segments of w2's rows, 14.7 MB, {H // R} programs")
for n, r in zip(names, timer.compare(fns, rounds=3)):
    print(f"{n:80s} {r['us']:6.1f} us", flush=True)
