"""The per-token fp8 quantisation of x (``quant_rows_triton``) at H over one program's block:
the library's two passes (amax over the row, then the quantisation, the row read twice) against
one pass with the whole row in registers at a block of 8192 (4, 8 or 16 warps), on the same x,
checked bit for bit against the library first (issue 19: x's quantisation at DeepSeek-V3 TP8
M = 4096 took 43.3 us on an H100 against 27 of traffic, docs/routed-journal.md "Fourteenth session").

    python bench/probes/quant_rows_block.py [H,...] [M,...]

Timer: CUDA graphs behind an L2 flush, medians; GB/s counts x read once and x8, sx written."""

import sys

import torch
import triton

from densemoe.kernels.triton.pdl import launch_kwargs
from densemoe.kernels.triton.quant import _quant_rows_kernel, quant_rows_triton
from densemoe.timing import Timer

hs = [int(h) for h in (sys.argv[1] if len(sys.argv) > 1 else "7168,2048").split(",")]
ms = [int(m) for m in (sys.argv[2] if len(sys.argv) > 2 else "16,512,2048,4096").split(",")]
timer = Timer(reps=30)
print("# us (GB/s) of x's per-token fp8 quantisation; 'lib' is quant_rows_triton as shipped", flush=True)
for H in hs:
    for M in ms:
        g = torch.Generator(device="cuda").manual_seed(M)
        x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, generator=g)
        q = torch.empty(M, H, device="cuda", dtype=torch.float8_e4m3fn)
        s = torch.empty(M, device="cuda", dtype=torch.float32)

        def lib():
            quant_rows_triton(x, q, s)

        lib()
        want_q, want_s = q.clone(), s.clone()
        nbytes = M * H * 3 + M * 4

        def cell(fn):
            us = timer(fn)["us"]
            return f"{us:.1f} ({nbytes / us / 1e3:.0f})"

        line = [f"H={H} M={M} lib {cell(lib)}"]
        block = 1 << (H - 1).bit_length()
        for warps in (4, 8, 16):
            def one(warps=warps):
                _quant_rows_kernel[(M,)](x, q, s, H, x.stride(0), q.stride(0), BLOCK=block, ONE_PASS=True,
                                         num_warps=warps, **launch_kwargs(x.device))
            q.fill_(float("nan")), s.fill_(float("nan"))
            one()
            same = torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s, want_s)
            line.append(f"one-pass b{block} w{warps} {cell(one)}{'' if same else ' WRONG'}")
        print("  ".join(line), flush=True)
