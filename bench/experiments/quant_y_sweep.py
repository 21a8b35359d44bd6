"""quantize_y_fold_alpha's launch shape on the GPU: elements per program x warps, at the model
shapes, routing top-k of E (alpha mostly zero). python bench/experiments/quant_y_sweep.py"""

import torch

from densemoe.bench.common import Timer
from densemoe.kernels.triton.quant import quant_y_triton
from densemoe.quant import FP8, quantize_y_fold_alpha_ref
from densemoe.shapes import SHAPES

timer = Timer(reps=20)
for shape in ("deepseek-v3-tp8", "qwen3-30b-a3b"):
    s = SHAPES[shape]
    for M in (1, 64, 256, 512):
        y = torch.randn(M, s.experts * s.inter, device="cuda").to(torch.bfloat16)
        logits = torch.randn(M, s.experts, device="cuda")
        top = logits.topk(s.topk, dim=1)
        alpha = torch.zeros_like(logits).scatter_(1, top.indices, top.values.softmax(dim=1))
        ws = torch.rand(s.experts, device="cuda") + 0.5
        q_ref, a_ref = quantize_y_fold_alpha_ref(y, alpha, ws)
        q = torch.empty_like(y, dtype=FP8)
        a2 = torch.empty_like(alpha)
        res = {}
        for elems in (1024, 2048, 4096, 8192):
            for warps in (4, 8):
                fn = lambda: quant_y_triton(y, alpha, ws, q, a2, elems=elems, num_warps=warps)  # noqa: E731
                fn()
                assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(a2, a_ref)
                res[(elems, warps)] = timer(fn)["us"]
        best = min(res, key=res.get)
        floor = (M * s.experts * s.inter * 1 + M * s.topk * s.inter * 2) / 3.1e6
        print(f"{shape} M={M}: " + " ".join(f"{e}/{w}={t:.1f}" for (e, w), t in res.items())
              + f" | best {best} {res[best]:.1f} us, write floor {floor:.1f} us", flush=True)
