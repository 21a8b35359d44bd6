"""The CuTe DSL routed FC2 (``kernels/cute/routed_fc2_sm90.py``) against the Triton routed FC2
(``kernels.triton.routed.fc2_launch``, rows for the combine) on uniform top-k routing (ninth
session, docs/routed-journal.md). Both read the same y (the Triton FC1's, fp8 per (row, 128 columns))
and write each pair's bf16 row; each output is checked against float32 of the same products
first, then timed (``Timer``: CUDA graphs, L2 flushed, medians): the Triton FC2 at the table's
config and at the large-M tiles, the CuTe FC2 in units of 128 rows (both warpgroups on one unit)
and 64 (each warpgroup its own units), each with its units' indices loaded one unit ahead or at
the unit's start, alone and with its tile list. The combine is the same launch after either and is not timed.

    python bench/probes/routed_fc2_cute.py [shape,...] [M,...]   (a CUDA GPU and CuTe DSL; default
                                                                 deepseek-v3-tp8,qwen3-30b-a3b 512,2048,4096)

``--ncu``: nothing timed; each config runs once after its check (Triton's, then the CuTe ones in
``CUTE``'s order), for Nsight Compute (``-k regex:routed_fc2_sm90 --launch-count 4``).
"""

import sys

import torch

from densemoe.kernels.common import RoutedProblem, max_tiles
from densemoe.kernels.cute import routed_fc2_sm90 as rc
from densemoe.kernels.triton import routed as kern
from densemoe.ops import routed_configs

FP8 = torch.float8_e4m3fn
# units of 128 rows (both warpgroups) or 64 (each its own), the indices loaded ahead or not (128 columns:
# 64 was slower at every point on the H200, bench/results/h200_2026-12-06_session12_logs/routed_fc2_cute.log)
CUTE = tuple(rc.RoutedFc2CuteConfig(tile_m=m, ahead=a) for m in (128, 64) for a in (False, True)) + \
    tuple(rc.RoutedFc2CuteConfig(tile_m=m, cols=2) for m in (128, 64))  # two column tiles a unit
# (block_m, fc2_block_n, swap, warps, stages, programs an SM): the tables' large-M picks
TRITON = ((64, 128, False, 4, 4, 2), (128, 256, False, 8, 2, 1))


def compare(shape, M, timer):
    from densemoe.shapes import SHAPES

    s = SHAPES[shape]
    H, E, I, k = s.hidden, s.experts, s.inter, s.topk
    g = torch.Generator(device="cuda").manual_seed(0)
    P = M * k
    ids = torch.rand(M, E, device="cuda", generator=g).topk(k, dim=1).indices.to(torch.int32)
    srt = torch.empty(P, dtype=torch.int32, device="cuda")
    off = torch.empty(E + 1, dtype=torch.int32, device="cuda")
    kern.schedule_launch(ids, E, srt, off)
    y = (torch.randn(P, I, device="cuda", generator=g) * 100).clamp(-448, 448).to(FP8)  # (past 448: NaN)
    ys = torch.rand(P, I // 128, device="cuda", generator=g) * 0.01 + 0.001
    w2 = (torch.randn(H, E * I, device="cuda", generator=g) * I ** -0.5 * 8).to(FP8)
    w2s = torch.rand(E, device="cuda", generator=g) * 0.1 + 0.05
    tw = torch.rand(P, device="cuda", generator=g)
    # float32 of the same products
    yd = y.float() * ys.repeat_interleave(128, 1)
    want = torch.zeros(P, H, device="cuda")
    o = off.tolist()
    for e in range(E):
        if o[e + 1] > o[e]:
            pairs = srt[o[e]:o[e + 1]].long()
            want[pairs] = yd[o[e]:o[e + 1]] @ w2[:, e * I:(e + 1) * I].float().T * w2s[e] * tw[pairs][:, None]

    assert want.isfinite().all()

    def check(name, rows):
        err = ((rows.float() - want).norm() / want.norm()).item()
        assert err < 0.02 and not rows.float().isnan().any(), f"{name}: error {err:.3e}"
        return err

    out = {}
    prob = RoutedProblem(M, H, E, I, k, FP8, torch.bfloat16)
    table = routed_configs.choose(prob, "cuda").config
    cfgs = [("triton table " + table.short().split("/fc2:")[1], table)]
    for bm, bn, swap, warps, stages, pps in TRITON:
        c = kern.RoutedConfig(block_m=bm, fc2_block_n=bn, fc2_block_k=128, fc2_swap_ab=swap, fc2_warps=warps,
                              fc2_stages=stages, programs_per_sm=pps)
        cfgs.append(("triton " + c.short().split("/fc2:")[1], c))
    for name, c in cfgs:
        if c.fc1_block_i != 128 or c.atomic_combine or c.fused_combine:
            continue  # other y groups, or not rows for the combine: not this comparison
        rows = torch.full((P, H), float("nan"), device="cuda", dtype=torch.bfloat16)
        run = (lambda c=c, rows=rows: kern.fc2_launch(y, ys, w2, w2s, srt, off, tw, rows, 128, c, k))  # noqa: E731
        run()
        out[name] = (timer(run)["us"] if timer else 0.0, check(name, rows))
    count = torch.empty(1, dtype=torch.int32, device="cuda")
    for c in CUTE:
        if not rc.can_implement(H, E, I, FP8, 128, c, P)[0]:
            continue
        tiles = torch.empty(max_tiles(P, E, c.tile_m), 2, dtype=torch.int32, device="cuda")
        rows = torch.full((P, H), float("nan"), device="cuda", dtype=torch.bfloat16)

        def alone(c=c, rows=rows, tiles=tiles):
            rc.routed_fc2_cute(y, ys, w2, w2s, tw, srt, off, tiles, count, rows, c)

        def whole(c=c, rows=rows, tiles=tiles):
            kern.tile_list_launch(off, E, c.tile_m, tiles, count)
            rc.routed_fc2_cute(y, ys, w2, w2s, tw, srt, off, tiles, count, rows, c)

        whole()
        err = check(c.to_str(), rows)
        if timer is None:  # --ncu: each config launched once (after the tile list), nothing timed
            continue
        name = f"cute m{c.tile_m}n{c.tile_n}{'x2' if c.cols == 2 else ''}{' ahead' if c.ahead else ''}"
        out[name] = (timer(alone)["us"], err)
        out[name + " +list"] = (timer(whole)["us"], err)
    bytes_ = E * H * I + P * I + 2 * P * H  # the weights (all picked at these M), y, the rows written
    return out, bytes_


if __name__ == "__main__":
    from densemoe.timing import Timer

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    timer = None if "--ncu" in sys.argv else Timer(reps=20)
    print(f"# {torch.cuda.get_device_name()}; FC2 alone (rows for the combine), fp8, uniform top-k; us (TB/s of "
          f"weights + y + rows, error vs float32)", flush=True)
    for shape in (args[0] if args else "deepseek-v3-tp8,qwen3-30b-a3b").split(","):
        for M in [int(v) for v in (args[1] if len(args) > 1 else "512,2048,4096").split(",")]:
            res, nbytes = compare(shape, M, timer)
            print(f"cute_fc2 {shape} M={M}: " + ", ".join(
                f"{k} {us:.1f} ({nbytes / us / 1e6:.2f}, {err:.1e})" for k, (us, err) in res.items()), flush=True)
