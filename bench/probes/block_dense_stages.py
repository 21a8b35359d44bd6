"""Where the block-scaled fp8 dense and skipping paths lose time (issue 20): on the H200 (2026-12-05,
`bench/results/layer_h200_2026-12-05_*_fp8block.md` against the fp8 run of the same day) skip on
DeepSeek-V3 TP8 took 591 us at M = 64 with 128 x 128 block-scaled weights and 326 with
per-expert scales. This times, in one process, the stages of ``experts_forward`` (densemoe/experts.py)
on the same fp8 weights, once with their block scales and once requantised per expert:

    block:      x8, sg = quantize_per_token_group(x)       fc1(..., x_group_scale, w_block_scale)
                y8, a2 = quantize_y_fold_alpha(y, ...)     fc2(..., w_block_scale)
    per-expert: x8, sx = quantize_per_token(x)             fc1(..., x_scale)   (or, where
                y8, a2 = quantize_y_fold_alpha(y, ...)     fc1_fp8_dynamic     the layer uses it,
                fc2(...)                                                         its fused form)

each stage alone (Timer: CUDA graphs, L2 flushed, medians) and the whole ``experts_forward`` with
the strategy forced; outputs checked against each other first.

    python bench/probes/block_dense_stages.py [skip|dense] [M,...] [shape]
    TRITON_INTERPRET=1 python bench/probes/block_dense_stages.py skip --check   (CPU, tiny shape)
"""

import sys

import torch

import densemoe
from densemoe.bench.layer import BLOCK, dequantize_per_block, quantize_per_block
from densemoe.ops.fc1 import fc1_fp8_dynamic
from densemoe.ops.strategy import quantize_y_in_fc1
from densemoe.quant import quantize_per_token, quantize_per_token_group, quantize_y_fold_alpha
from densemoe.shapes import SHAPES
from densemoe.timing import Timer
from densemoe.weights import prepare_weights

CHECK = "--check" in sys.argv  # CPU (TRITON_INTERPRET=1): a tiny shape, every stage run once, no timing
args = [a for a in sys.argv[1:] if a != "--check"]
strategy = args[0] if args else "skip"
ms = [int(m) for m in (args[1] if len(args) > 1 else "1,16,64").split(",")]
if CHECK:
    from densemoe.shapes import MoEShape

    s, dev, ms = MoEShape("tiny", 256, 4, 128, 2), "cpu", [1, 7]
else:
    s, dev = SHAPES[args[2] if len(args) > 2 else "deepseek-v3-tp8"], "cuda"
E, I, H, k = s.experts, s.inter, s.hidden, s.topk
g = torch.Generator(device=dev).manual_seed(0)
w13 = torch.randn(E, 2 * I, H, device=dev, generator=g, dtype=torch.bfloat16) * H ** -0.5
w2 = torch.randn(E, H, I, device=dev, generator=g, dtype=torch.bfloat16) * I ** -0.5
q13, s13 = quantize_per_block(w13)
q2, s2 = quantize_per_block(w2)
block = prepare_weights(q13, q2, w13_scale=s13, w2_scale=s2)
per_expert = prepare_weights(dequantize_per_block(q13, s13).to(torch.bfloat16),
                             dequantize_per_block(q2, s2).to(torch.bfloat16), dtype="fp8")
del w13, w2
timer = (lambda f: (f(), {"us": 1.0})[1]) if CHECK else Timer(reps=20)
skip = strategy == "skip"
print(f"# {s.name} fp8 {strategy}: us per stage, block-scaled / per-expert (same weights); BLOCK {BLOCK}")
for M in ms:
    x = torch.randn(M, H, device=dev, generator=g, dtype=torch.bfloat16)
    ids = torch.rand(M, E, device=dev, generator=g).topk(k, dim=1).indices
    wts = torch.softmax(torch.randn(M, k, device=dev, generator=g), dim=1)
    alpha = torch.zeros(M, E, device=dev).scatter(1, ids, wts)
    outs, us = {}, {}
    for name, pw in (("block", block), ("per-expert", per_expert)):
        whole = lambda pw=pw: densemoe.experts_forward(x, pw, alpha, strategy=strategy)  # noqa: E731
        outs[name] = whole().float()
        st = {"whole": whole}
        if pw.block:
            x8, sg = quantize_per_token_group(x, pw.block)
            y = densemoe.fc1(x8, pw.w1, pw.alpha1, routing=alpha, skip=skip, fill_unpicked=False,
                             x_group_scale=sg, w_block_scale=pw.w1_block_scale)
            y8, a2 = quantize_y_fold_alpha(y, alpha, pw.w2_scale)
            st.update(quant_x=lambda: quantize_per_token_group(x, pw.block),
                      fc1=lambda: densemoe.fc1(x8, pw.w1, pw.alpha1, routing=alpha, skip=skip, fill_unpicked=False,
                                               x_group_scale=sg, w_block_scale=pw.w1_block_scale),
                      quant_y=lambda: quantize_y_fold_alpha(y, alpha, pw.w2_scale),
                      fc2=lambda: densemoe.fc2(y8, pw.w2, a2, skip=skip, w_block_scale=pw.w2_block_scale))
        elif quantize_y_in_fc1(pw.inter):  # what experts_forward runs: FC1 quantises y itself
            x8, sx = quantize_per_token(x)
            y8, ys = fc1_fp8_dynamic(x8, pw.w1, pw.alpha1, x_scale=sx)
            a2 = alpha * ys * pw.w2_scale[None, :]
            st.update(quant_x=lambda: quantize_per_token(x),
                      fc1_fused_quant=lambda: fc1_fp8_dynamic(x8, pw.w1, pw.alpha1, x_scale=sx),
                      fc2=lambda: densemoe.fc2(y8, pw.w2, a2, skip=skip))
        else:
            x8, sx = quantize_per_token(x)
            y = densemoe.fc1(x8, pw.w1, pw.alpha1, x_scale=sx, routing=alpha, skip=skip, fill_unpicked=False)
            y8, a2 = quantize_y_fold_alpha(y, alpha, pw.w2_scale)
            st.update(quant_x=lambda: quantize_per_token(x),
                      fc1=lambda: densemoe.fc1(x8, pw.w1, pw.alpha1, x_scale=sx, routing=alpha, skip=skip,
                                               fill_unpicked=False),
                      quant_y=lambda: quantize_y_fold_alpha(y, alpha, pw.w2_scale),
                      fc2=lambda: densemoe.fc2(y8, pw.w2, a2, skip=skip))
        us[name] = {n: timer(f)["us"] for n, f in st.items()}
    err = ((outs["block"] - outs["per-expert"]).norm() / outs["per-expert"].norm()).item()
    assert err < 0.1, f"M={M}: block vs per-expert outputs differ by {err:.3e}"
    line = " ".join(f"{n} {v:.1f}" for n, v in us["block"].items())
    line2 = " ".join(f"{n} {v:.1f}" for n, v in us["per-expert"].items())
    print(f"M={M}: block [{line}] | per-expert [{line2}] | whole {us['block']['whole'] / us['per-expert']['whole']:.2f}x"
          f" (outputs differ {err:.1e})", flush=True)
