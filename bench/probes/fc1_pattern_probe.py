"""Is FC1's M = 1 stream limited by its 32 busy SMs or by its access pattern? A bare TMA read of
the 8 picked experts' w1 (DeepSeek-V3 TP8 fp8) in FC1's boxes (64 gate rows + 64 up rows x 256
bytes per k-step), one program per (expert, 64-row tile of I) like FC1 at M = 1 (32 programs,
28 k-steps each), or that range cut in S k-ranges over S times the programs; pipeline depth
4 or 8. Next to a trivial kernel, through the benchmark's Timer. python bench/probes/fc1_pattern_probe.py"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase


@triton.jit
def _fc1_pattern(w_desc, ids_ptr, out_ptr, I, KT, S: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr,
                 STAGES: tl.constexpr):
    pid = tl.program_id(0)
    ks = pid % S
    u = pid // S
    i_tiles = I // BI
    e = tl.load(ids_ptr + u // i_tiles)
    row0 = e * 2 * I + (u % i_tiles) * BI
    acc = tl.zeros((BI, BK), dtype=tl.int32)
    for kt in tl.range(ks * KT // S, (ks + 1) * KT // S, num_stages=STAGES):
        g = w_desc.load([row0, kt * BK]).to(tl.int8, bitcast=True)
        v = w_desc.load([row0 + I, kt * BK]).to(tl.int8, bitcast=True)
        acc ^= g.to(tl.int32) ^ v.to(tl.int32)
    tl.store(out_ptr + pid, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _nop(x_ptr):
    tl.store(x_ptr, 1)


timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H = case.E, case.I, case.H
ids = torch.randperm(E, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))[:8].to(torch.int32)
w_desc = TensorDescriptor.from_tensor(p.w1, [64, 256])
KT = H // 256
dummy = torch.zeros(4, dtype=torch.int32, device="cuda")
out = torch.empty(8 * 4 * 16, dtype=torch.int32, device="cuda")
fns, names = [lambda: _nop[(1,)](dummy)], ["trivial kernel"]
for S in (1, 2, 4, 7):
    for st in (4, 8):
        fns.append(lambda S=S, st=st: _fc1_pattern[(8 * (I // 64) * S,)](w_desc, ids, out, I, KT, S=S, BI=64, BK=256,
                                                                         STAGES=st, num_warps=4))
        names.append(f"FC1's boxes, 8 experts, {8 * (I // 64) * S} programs (k cut in {S}), {st} stages")
for n, r in zip(names, timer.compare(fns, rounds=3)):
    print(f"{n:75s} {r['us']:6.1f} us", flush=True)
