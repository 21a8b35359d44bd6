"""Does the routed FC1 lose time to its gathered x rows? (issue 19, docs/routed-journal.md "First H200 measurements", Next 3.)
The grouped FC1 loads each tile's x rows by token (``sorted_pairs // k``): rows scattered over
x, loaded through cp.async, never TMA (Hopper's TMA has no gather). This probe runs the
library's FC1 kernel twice on the same routing and config: as the library calls it, and on a
copy of x already in the sorted order (row r = x[sorted[r] // k], its scale likewise) with the
identity schedule, so every tile's rows are contiguous. The outputs (y and its scales) must be
the same bits; then both are timed (Timer: CUDA graphs, L2 flushed, medians), with the copy's
own cost (a gather of P rows) beside them.

    python bench/probes/routed_fc1_contiguous.py [shape] [M,...]      (a CUDA GPU; fp8)
    TRITON_INTERPRET=1 python bench/probes/routed_fc1_contiguous.py --check   (CPU: a tiny shape)

If the contiguous rows are much faster where FC1 is far from its bound (Qwen3-30B-A3B M = 2048:
3.0x), a sorted copy of x written by the quantisation kernel (and loaded through TMA) is worth
building; if not, the gather is not what holds FC1 back."""

import sys

import torch

from densemoe.kernels.common import RoutedProblem
from densemoe.kernels.triton import routed as kern
from densemoe.ops import routed_configs
from densemoe.quant import FP8, quantize_per_token
from densemoe.tuning.ops import make_routed_inputs


def run(dims, ms, device, timer=None):
    H, E, I, k = dims
    for M in ms:
        p = RoutedProblem(M, H, E, I, k, FP8, torch.bfloat16)
        cfg = routed_configs.choose(p, device).config
        inp = make_routed_inputs(p, device, seed=M)
        pw, ids = inp.prepared, inp.topk_ids
        P = M * k
        s_pairs = torch.empty(P, dtype=torch.int32, device=device)
        offs = torch.empty(E + 1, dtype=torch.int32, device=device)
        kern.schedule_launch(ids, E, s_pairs, offs)
        xq, sx = quantize_per_token(inp.x)
        valid = int(offs[E])
        tok = s_pairs.long() // k
        # the copy: row r of x_sorted is the token of sorted row r (rows past the valid pairs: any token)
        x_sorted = xq[tok.clamp(0, M - 1)].contiguous()
        sx_sorted = sx[tok.clamp(0, M - 1)].contiguous()
        ident = (torch.arange(P, device=device, dtype=torch.int32) * k).contiguous()  # tok = r
        groups = -(-I // cfg.fc1_block_i)
        y_g = torch.full((P, I), float("nan"), device=device).to(FP8)
        ys_g = torch.full((P, groups), float("nan"), device=device)
        y_c, ys_c = y_g.clone(), ys_g.clone()
        gathered = lambda: kern.fc1_launch(xq, pw.w1, pw.alpha1, sx, s_pairs, offs, y_g, ys_g, k, cfg)  # noqa: E731
        contiguous = lambda: kern.fc1_launch(x_sorted, pw.w1, pw.alpha1, sx_sorted, ident, offs, y_c, ys_c, k,  # noqa: E731
                                             cfg)
        gathered()
        contiguous()
        same = (torch.equal(y_g[:valid].view(torch.uint8), y_c[:valid].view(torch.uint8))
                and torch.equal(ys_g[:valid], ys_c[:valid]))
        assert same, f"M={M}: FC1 on the sorted copy of x differs"
        if timer is None:
            print(f"M={M} {cfg.short()}: the same bits ({valid} rows)")
            continue
        g_us, c_us = timer(gathered)["us"], timer(contiguous)["us"]
        copy_us = timer(lambda: torch.index_select(xq, 0, tok.clamp(0, M - 1)))["us"]
        print(f"M={M} {cfg.short()}: fc1 gathered {g_us:.1f} us, on sorted x {c_us:.1f} us ({g_us / c_us:.2f}x); "
              f"the copy {copy_us:.1f} us", flush=True)


if "--check" in sys.argv:
    run((256, 8, 256, 2), (1, 7, 40), "cpu")
    print("check passed")
elif __name__ == "__main__":
    from densemoe.shapes import SHAPES
    from densemoe.timing import Timer

    shape = sys.argv[1] if len(sys.argv) > 1 else "qwen3-30b-a3b"
    ms = [int(m) for m in (sys.argv[2] if len(sys.argv) > 2 else "128,512,2048,4096").split(",")]
    s = SHAPES[shape]
    print(f"# {shape} fp8 routed FC1: gathered x rows against a sorted copy of x (same kernel, same config)")
    run((s.hidden, s.experts, s.inter, s.topk), ms, "cuda", Timer(reps=20))
