"""The routed FC1 against the dense FC1 on the same work (eighth session, docs/routed-journal.md).

On an H100 the dense path's FC1 (``ops.fc1``, its tuned table) does Qwen3-30B-A3B at M = 128
(every expert's 1536 rows against 128 tokens: 403 MB of weights, 103 GFLOP) in 157.5 us and at
M = 256 in 205.9 us (1000 TFLOP/s; ``bench/results/fc1_h100_2026-11-26.md``). The routed FC1 at
Qwen3 M = 2048 and 4096 does the same amount per expert (128 and 256 rows on average) and took
270-280 and 398-448 us on uniform routing (``tails.log.gz``, same GPU kind). This probe puts
the two on the same work: r tokens, each routed to every expert (top-k = E), so every expert's
rows are the same r tokens and the routed FC1 computes the dense FC1's products. The routed
y (fp8 per (row, 128 columns), dequantised) is checked against the dense one (bf16) first, then
each is timed (``Timer``: CUDA graph, L2 flushed, median): the dense FC1 as ``ops.fc1`` picks it
and pinned to the H100 table's winners (the H200 has no FC1 table), the routed FC1 at several tiles,
among them the dense winner's form (128 tokens as the MMA's N, 64 weight rows as its M, 4 warps,
3 stages) that the routed space did not offer before the eighth session, each also on the sorted
copy of x through TMA (``fc1_sorted_x``: the dense FC1 loads x so; the routed gathers by token;
the copy's own launch is inside the timed call).

    python bench/probes/routed_fc1_vs_dense.py [shape,...] [r,...]   (a CUDA GPU; default
                                                                       qwen3-30b-a3b,deepseek-v3-tp8 128,256)
    python bench/probes/routed_fc1_vs_dense.py --check               (tiny shape, interpreter, no timing)
    python bench/probes/routed_fc1_vs_dense.py --cute [shape,...] [r,...]   (also the CuTe dense FC1,
                                                                       with and without fp8 promotion)
"""

from __future__ import annotations

import sys

import torch

from densemoe.kernels.triton import routed as kern
from densemoe.kernels.cute.fc1_sm90 import Fc1CuteConfig
from densemoe.kernels.triton.fc1 import Fc1TritonConfig
from densemoe.ops.fc1 import fc1

FP8 = torch.float8_e4m3fn
# the dense FC1 pinned to the H100 table's winners at 128 and 256 tokens (the H200 has no FC1
# table: ``ops.fc1`` runs its heuristic there), beside ``ops.fc1``'s own choice
DENSE = (Fc1TritonConfig(block_m=128, block_i=64, block_k=128, num_warps=4, num_stages=3, swap_ab=1),
         Fc1TritonConfig(block_m=128, block_i=128, block_k=128, num_warps=8, num_stages=4, swap_ab=0))
# (block_m, fc1_block_i, swap_ab, warps, stages, programs an SM, fc1_tail_m[, fc1_sorted_x])
CONFIGS = ((64, 128, False, 4, 2, 2, 0), (128, 128, False, 8, 4, 1, 0), (128, 64, True, 4, 3, 1, 0),
           (128, 64, True, 4, 3, 2, 0), (128, 64, True, 4, 4, 2, 0), (128, 128, True, 8, 3, 1, 0),
           (64, 64, True, 4, 4, 2, 0), (64, 128, False, 4, 2, 2, 0, True), (128, 128, False, 8, 4, 1, 0, True),
           (128, 64, True, 4, 3, 1, 0, True), (128, 64, True, 4, 3, 2, 0, True))


def setup(H, E, I, r, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(r, H, generator=g) * 0.5).to(FP8).to(device)
    w = (torch.randn(E * 2 * I, H, generator=g) * H ** -0.5 * 8).to(FP8).to(device)
    alpha1 = torch.full((E,), 0.125, device=device)
    xs = torch.ones(r, device=device)
    ids = torch.arange(E, device=device).repeat(r, 1)  # every token to every expert: top-k = E
    srt = torch.empty(r * E, dtype=torch.int32, device=device)
    off = torch.empty(E + 1, dtype=torch.int32, device=device)
    kern.schedule_launch(ids, E, srt, off)
    return x, w, alpha1, xs, srt, off


def compare(dims, r, device, timer=None, configs=CONFIGS, dense_configs=DENSE):
    """{name: us} for the dense FC1 (its own choice, "dense", and each of ``dense_configs``, each
    checked against the first) and each routed config (each checked against the dense y)."""
    H, E, I = dims
    x, w, alpha1, xs, srt, off = setup(H, E, I, r, device)
    dense_y = torch.empty(r, E * I, dtype=torch.bfloat16, device=device)
    run_dense = (lambda: fc1(x, w, alpha1, x_scale=xs, out=dense_y))  # noqa: E731
    run_dense()
    pair = srt.long()
    want = dense_y.float().view(r, E, I)[pair // E, pair % E]  # the dense y of each routed row
    out = {"dense": timer(run_dense)["us"] if timer else 0.0}
    for dc in dense_configs:
        y2 = torch.full_like(dense_y, float("nan"))
        run = (lambda dc=dc, y2=y2: fc1(x, w, alpha1, x_scale=xs, out=y2, config=dc))  # noqa: E731
        run()
        assert torch.allclose(y2.float(), dense_y.float(), rtol=2e-2, atol=1e-2), dc.to_str()
        out["dense " + dc.to_str().replace(",use_tma=1,persistent=0,split_k=1,stream_k=0", "").replace(
            ",stages=0", "").replace(",ctas=0", "").replace(",cluster_m=1", "")] = \
            timer(run)["us"] if timer else 0.0
    for bm, bi, swap, warps, stages, pps, tail, *srt_x in configs:
        cfg = kern.RoutedConfig(block_m=bm, fc1_block_i=bi, fc1_block_k=128, fc1_swap_ab=swap, fc1_warps=warps,
                                fc1_stages=stages, programs_per_sm=pps, fc1_tail_m=tail,
                                fc1_sorted_x=bool(srt_x and srt_x[0]))
        name = cfg.short().split("/fc2")[0] + f"/p{pps}"
        y = torch.full((r * E, I), float("nan"), device=device).to(FP8)
        ys = torch.full((r * E, -(-I // bi)), float("nan"), device=device)
        run = (lambda cfg=cfg, y=y, ys=ys: kern.fc1_launch(x, w, alpha1, xs, srt, off, y, ys, E, cfg))  # noqa: E731
        run()
        sc = ys.repeat_interleave(bi, 1)[:, :I]
        deq = y.float() * sc
        assert not deq.isnan().any(), f"{name}: a row of y unwritten"
        assert ((deq - want).abs() <= 32 * sc + 1e-2 * want.abs()).all(), \
            f"{name}: max diff {(deq - want).abs().max().item():.3e}"
        out[name] = timer(run)["us"] if timer else 0.0
    return out


# ``--cute`` (the CuTe DSL bundle on the device): the dense FC1 on the CuTe kernel too, with each
# k-tile's fp8 products promoted into fp32 (``promote=1``: a producer warp and two consumer
# warpgroups that are not held in step, so one's wait and adds run under the other's MMAs; the
# Triton loops wait for each product with the whole CTA in step, docs/routed-journal.md "Ninth
# session"), and one tile without promotion (fast accumulation: the precision the Triton FC1 gave
# up in f759edd) for the cost of the promotion itself
CUTE = (Fc1CuteConfig(tile_i=64, tile_m=128, tile_k=128, consumers=2, swap_ab=0),
        Fc1CuteConfig(tile_i=64, tile_m=128, tile_k=128, consumers=2, swap_ab=0, promote=1),
        Fc1CuteConfig(tile_i=96, tile_m=128, tile_k=128, consumers=2, swap_ab=0, promote=1),
        Fc1CuteConfig(tile_i=64, tile_m=128, tile_k=256, consumers=2, swap_ab=0, promote=1),
        Fc1CuteConfig(tile_i=64, tile_m=128, tile_k=128, consumers=2, swap_ab=0, cluster_n=2, promote=1),
        Fc1CuteConfig(tile_i=128, tile_m=64, tile_k=128, consumers=2, promote=1))

if "--check" in sys.argv:
    compare((256, 4, 256), 40, "cpu", configs=((16, 64, False, 4, 2, 1, 0), (32, 64, True, 4, 2, 1, 16),
                                                (32, 64, True, 4, 2, 1, 0, True)),
            dense_configs=(Fc1TritonConfig(block_m=32, block_i=64, block_k=64, swap_ab=1),))
    print("check passed")
elif __name__ == "__main__":
    from densemoe.shapes import SHAPES
    from densemoe.timing import Timer

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    timer = Timer(reps=20)
    print(f"# {torch.cuda.get_device_name()}; us, median of Timer(reps=20); dense: ops.fc1 (its table)", flush=True)
    for shape in (args[0] if args else "qwen3-30b-a3b,deepseek-v3-tp8").split(","):
        s = SHAPES[shape]
        for r in [int(v) for v in (args[1] if len(args) > 1 else "128,256").split(",")]:
            res = compare((s.hidden, s.experts, s.inter), r, "cuda", timer,
                          dense_configs=DENSE + (tuple(c for c in CUTE if s.inter % c.tile_i == 0)
                                                 if "--cute" in sys.argv else ()))
            d = res["dense"]
            print(f"vs_dense {shape} r={r}: dense {d:.1f} | " +
                  ", ".join(f"{k} {us:.1f} ({us / d:.2f}x)" for k, us in res.items() if k != "dense"), flush=True)
