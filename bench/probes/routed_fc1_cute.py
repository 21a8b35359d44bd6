"""The CuTe DSL routed FC1 (``kernels/cute/routed_fc1_sm90.py``: TMA producer warp, two consumer
warpgroups not held in step, each fp8 k-tile promoted into fp32) against the Triton routed FC1
(``kernels.triton.routed.fc1_launch``) on uniform top-k routing (ninth session, docs/routed-journal.md).

The Triton FC1 runs at 28% of the fp8 peak at Qwen3 M = 2048 (H200) and 22% tensor-pipe use
under Nsight Compute (H100): each k-step waits for its gate and its up wgmma before adding them
into fp32, with the whole CTA in step (its loop's barriers), so the tensor cores idle through
every wait and add. This probe checks the CuTe kernel's y against the Triton one's (both fp8 per
(row, tile_i columns), dequantised, against float32 of the same products) and times, each as a
CUDA graph behind an L2 flush (``Timer``, medians):

* the Triton FC1 at the device's table config for the problem (``routed_configs.choose``) and at
  the tiles the tables pick at large M;
* the CuTe FC1 at tile_i 128 and 64, k-tiles of 128 and 256 bytes, units of 128 rows and (the
  warpgroups on alternate units) 64: the kernel alone, and with
  what it needs that the Triton FC1 does not (the sorted copy of x, a torch gather here, and the
  tile list), so the whole cost is on the line;
* the same CuTe configs gathering x's rows by TMA (``gather``: one TMA load a row, no sorted
  copy; thirteenth session): with the tile list ("+list"), its y checked bit for bit against the
  copy's.

    python bench/probes/routed_fc1_cute.py [shape,...] [M,...]   (a CUDA GPU and CuTe DSL; default
                                                                 qwen3-30b-a3b,deepseek-v3-tp8 1024,2048,4096)
"""

import dataclasses
import sys

import torch

from densemoe.kernels.common import RoutedProblem
from densemoe.kernels.cute import routed_fc1_sm90 as rc
from densemoe.kernels.triton import routed as kern
from densemoe.ops import routed_configs

FP8 = torch.float8_e4m3fn
CUTE = (rc.RoutedFc1CuteConfig(tile_i=128, tile_k=128), rc.RoutedFc1CuteConfig(tile_i=128, tile_k=256),
        rc.RoutedFc1CuteConfig(tile_i=64, tile_k=128), rc.RoutedFc1CuteConfig(tile_i=64, tile_k=256),
        # 64-row units, the warpgroups on alternate units (eleventh session)
        rc.RoutedFc1CuteConfig(tile_i=128, tile_k=128, tile_m=64), rc.RoutedFc1CuteConfig(tile_i=128, tile_k=256, tile_m=64),
        rc.RoutedFc1CuteConfig(tile_i=64, tile_k=256, tile_m=64))
# (block_m, fc1_block_i, swap, warps, stages, programs an SM): the tables' large-M picks
TRITON = ((64, 128, False, 4, 2, 2), (128, 128, False, 8, 4, 1))


def setup(H, E, I, k, M, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(M, H, device="cuda", generator=g) * 0.5).to(FP8)
    xs = torch.rand(M, device="cuda", generator=g) * 0.02 + 0.01
    w = (torch.randn(E * 2 * I, H, device="cuda", generator=g) * H ** -0.5 * 8).to(FP8)
    a1 = torch.rand(E, device="cuda", generator=g) * 0.1 + 0.05
    ids = torch.rand(M, E, device="cuda", generator=g).topk(k, dim=1).indices.to(torch.int32)
    srt = torch.empty(M * k, dtype=torch.int32, device="cuda")
    off = torch.empty(E + 1, dtype=torch.int32, device="cuda")
    kern.schedule_launch(ids, E, srt, off)
    return x, xs, w, a1, srt, off


def compare(shape, M, timer):
    from densemoe.shapes import SHAPES

    s = SHAPES[shape]
    H, E, I, k = s.hidden, s.experts, s.inter, s.topk
    x, xs, w, a1, srt, off = setup(H, E, I, k, M)
    P = M * k
    rows = srt.long() // k
    # float32 of the same products: the check's reference
    xd = x.float() * xs[:, None]
    want = torch.empty(P, I, device="cuda")
    o = off.tolist()
    for e in range(E):
        if o[e + 1] > o[e]:
            h = xd[rows[o[e]:o[e + 1]]] @ w[e * 2 * I:(e + 1) * 2 * I].float().T * a1[e]
            want[o[e]:o[e + 1]] = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    out = {}

    def check(name, y, ys, group):
        deq = y.float() * ys.repeat_interleave(group, 1)
        err = ((deq - want).norm() / want.norm()).item()
        assert err < 0.05 and not deq.isnan().any(), f"{name}: error {err:.3e}"
        return err

    prob = RoutedProblem(M, H, E, I, k, FP8, torch.bfloat16)
    table = routed_configs.choose(prob, x.device).config
    cfgs = [("triton table " + table.short().split("/fc2")[0], table)]
    for bm, bi, swap, warps, stages, pps in TRITON:
        c = kern.RoutedConfig(block_m=bm, fc1_block_i=bi, fc1_block_k=128, fc1_swap_ab=swap, fc1_warps=warps,
                              fc1_stages=stages, programs_per_sm=pps)
        if c != table:
            cfgs.append(("triton " + c.short().split("/fc2")[0] + f"/p{pps}", c))
    for name, c in cfgs:
        if c.fc1_cute:  # the table picks the CuTe FC1 here: its Triton fields are no Triton FC1 of their own
            continue
        y = torch.full((P, I), float("nan"), device="cuda").to(FP8)
        ys = torch.full((P, -(-I // c.fc1_block_i)), float("nan"), device="cuda")
        run = (lambda c=c, y=y, ys=ys: kern.fc1_launch(x, w, a1, xs, srt, off, y, ys, k, c))  # noqa: E731
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - e.g. a ring that does not fit this card's shared memory
            print(f"# {name}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        err = check(name, y, ys, c.fc1_block_i)
        out[name] = (timer(run)["us"], err)
    xs_sorted = x[rows].contiguous()
    tiles = torch.empty(rc.max_tiles(P, E, 64), 2, dtype=torch.int32, device="cuda")  # (the longer list)
    count = torch.empty(1, dtype=torch.int32, device="cuda")
    for c in CUTE:
        if not rc.can_implement(H, E, I, FP8, FP8, c, P)[0]:
            continue
        y = torch.full((P, I), float("nan"), device="cuda").to(FP8)
        ys = torch.full((P, I // c.tile_i), float("nan"), device="cuda")

        def alone(c=c, y=y, ys=ys):
            rc.routed_fc1_cute(xs_sorted, w, a1, xs, srt, off, tiles, count, y, ys, k, c)

        def whole(c=c, y=y, ys=ys):
            xs2 = x[rows]  # the sorted copy (the sorted-x patch's gather kernel would do it in the path)
            kern.tile_list_launch(off, E, c.tile_m, tiles, count)
            rc.routed_fc1_cute(xs2, w, a1, xs, srt, off, tiles, count, y, ys, k, c)

        whole()
        err = check(c.to_str(), y, ys, c.tile_i)
        name = f"cute i{c.tile_i} k{c.tile_k}" + (f" m{c.tile_m}" if c.tile_m != rc.TILE_M else "")
        out[name] = (timer(alone)["us"], err)
        out[name + " +copy+list"] = (timer(whole)["us"], err)
        g = dataclasses.replace(c, gather=True)
        yg = torch.full_like(y, float("nan"))
        ysg = torch.full_like(ys, float("nan"))

        def gathered(g=g, yg=yg, ysg=ysg):
            kern.tile_list_launch(off, E, g.tile_m, tiles, count)
            rc.routed_fc1_cute(x, w, a1, xs, srt, off, tiles, count, yg, ysg, k, g)

        gathered()
        same = torch.equal(yg.view(torch.uint8), y.view(torch.uint8)) and torch.equal(ysg, ys)
        assert same, f"{name} gather: y differs from the copy's"
        out[name + " gather+list"] = (timer(gathered)["us"], err)
    flops = 2 * P * H * 2 * I
    return out, flops


if __name__ == "__main__":
    from densemoe.timing import Timer

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    timer = Timer(reps=20)
    print(f"# {torch.cuda.get_device_name()}; FC1 alone, fp8, uniform top-k; us (TFLOP/s, error vs float32)",
          flush=True)
    for shape in (args[0] if args else "qwen3-30b-a3b,deepseek-v3-tp8").split(","):
        for M in [int(v) for v in (args[1] if len(args) > 1 else "1024,2048,4096").split(",")]:
            res, flops = compare(shape, M, timer)
            print(f"cute_fc1 {shape} M={M}: " + ", ".join(
                f"{k} {us:.1f} ({flops / us / 1e6:.0f}, {err:.1e})" for k, (us, err) in res.items()), flush=True)
