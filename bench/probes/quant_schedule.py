"""x's per-token fp8 quantisation and the routed schedule in one launch (``quant_schedule_launch``)
against the two apart (``quant_rows_triton``, then ``schedule_launch``: two launches up to 1024
pairs, three above), and the whole routed path both ways (x quantised by ``quantize_per_token``
and handed over as ``x_quant``, or left to the op, which fuses it), on the same x and routing,
the table's config. Each fused result is checked bit for bit against the separate one first
(issue 19: at M = 512 the quantisation and the schedule took 11.3 + 8.7 us at DeepSeek-V3 TP8
and 5.7 + 8.0 at Qwen3 on an H100, against bounds of 3.4 and 1 us; docs/routed.md).

    python bench/probes/quant_schedule.py [shape,...] [M,...] [fp8|fp8block]

(fp8block: 128 x 128 block-scaled weights, x quantised in 1 x 128 groups: ``quant_groups_triton``
and ``quantize_per_token_group`` stand for the quantisation apart.)

Timer: CUDA graphs behind an L2 flush, medians of 30; uniform top-8 routing."""

import sys

import torch

from densemoe import prepare_weights
from densemoe.kernels.triton.quant import quant_groups_triton, quant_rows_triton
from densemoe.kernels.triton.routed import quant_schedule_launch, schedule_launch
from densemoe.ops.routed import routed_experts
from densemoe.quant import quantize_per_token, quantize_per_token_group
from densemoe.shapes import SHAPES
from densemoe.timing import Timer

FP8 = torch.float8_e4m3fn
shapes = (sys.argv[1] if len(sys.argv) > 1 else "deepseek-v3-tp8,qwen3-30b-a3b").split(",")
ms = [int(m) for m in (sys.argv[2] if len(sys.argv) > 2 else "1,16,128,512,2048,4096").split(",")]
group = 128 if (sys.argv[3] if len(sys.argv) > 3 else "fp8") == "fp8block" else 0
timer = Timer(reps=30)
print("# us; 'apart': quant_rows_triton + schedule_launch; 'fused': quant_schedule_launch; 'path': "
      "routed_experts with x_quant given after quantize_per_token / without (fused)", flush=True)
for name in shapes:
    s = SHAPES[name]
    E, H, I, k = s.experts, s.hidden, s.inter, s.topk
    g = torch.Generator(device="cuda").manual_seed(0)
    if group:  # fp8 weights as a checkpoint holds them, a scale per 128 x 128 block
        w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g).mul_(64).clamp_(-448, 448).to(FP8)
        w2 = torch.randn(E, H, I, device="cuda", generator=g).mul_(64).clamp_(-448, 448).to(FP8)
        s13 = torch.rand(E, 2 * I // group, H // group, device="cuda", generator=g) * H ** -0.5 / 32
        s2 = torch.rand(E, H // group, I // group, device="cuda", generator=g) * I ** -0.5 / 32
        pw = prepare_weights(w13, w2, w13_scale=s13, w2_scale=s2)
    else:
        w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=g) * H ** -0.5
        w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=g) * I ** -0.5
        pw = prepare_weights(w13, w2, dtype="fp8")
    del w13, w2
    for M in ms:
        g = torch.Generator(device="cuda").manual_seed(M)
        x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, generator=g)
        ids = torch.rand(M, E, device="cuda", generator=g).topk(k, dim=1).indices
        wts = torch.softmax(torch.randn(M, k, device="cuda", generator=g), dim=1)
        xq = torch.empty(M, H, device="cuda", dtype=FP8)
        sx = torch.empty((M, H // group) if group else (M,), device="cuda")
        sp, off = torch.empty(M * k, device="cuda", dtype=torch.int32), torch.empty(E + 1, device="cuda",
                                                                                   dtype=torch.int32)

        def apart():
            if group:
                quant_groups_triton(x, xq, sx, group)
            else:
                quant_rows_triton(x, xq, sx)
            schedule_launch(ids, E, sp, off)

        def fused():
            quant_schedule_launch(x, xq, sx, ids, E, sp, off, group=group)

        def path_apart():
            return routed_experts(x, pw, ids, wts,
                                  x_quant=quantize_per_token_group(x, group) if group else quantize_per_token(x))

        def path_fused():
            return routed_experts(x, pw, ids, wts)

        apart()
        want = xq.clone(), sx.clone(), off.clone()
        xq.fill_(float("nan")), sx.fill_(float("nan")), off.fill_(-1)
        fused()
        same = torch.equal(xq.view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(sx, want[1]) \
            and torch.equal(off, want[2])
        same_path = torch.equal(path_apart(), path_fused())  # the schedule's order within an expert moves no bit
        cells = {f: timer(fn)["us"] for f, fn in (("apart", apart), ("fused", fused), ("path_apart", path_apart),
                                                  ("path_fused", path_fused))}
        print(f"{name} {'fp8block' if group else 'fp8'} M={M}: quant+schedule apart {cells['apart']:.1f} fused {cells['fused']:.1f}"
              f"{'' if same else ' WRONG'} | path apart {cells['path_apart']:.1f} fused {cells['path_fused']:.1f}"
              f"{'' if same_path else ' DIFFERENT'}", flush=True)
