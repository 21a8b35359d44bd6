"""One rank of DeepSeek-V3's MoE layer on 8 GPUs, simulated on one GPU (issue 22): the rank's
share of the experts timed through ``densemoe.parallel.sharded_experts(..., shard=)`` (no
collective), the all-reduce stood in for by a kernel that waits the formula's time on a second
stream, and FC2 cut into column pieces whose stand-in reductions run under the next pieces.

    TP8: every expert, I / 8 = 256 columns of each (the deepseek-v3-tp8 shape);
    EP8: 32 whole experts (I = 2048), routed by the global top-8 of 256 (each token sends about
         one pair here; a rank sees a token only if it picked one of its experts).

Per layout and M (each a CUDA graph behind an L2 flush, median; the read ceiling in the same
process):

    rank        the rank's share, FC2 whole, no reduction
    rank_p      the same with FC2 in ``--pieces`` column pieces (what cutting FC2 costs)
    seq         FC2 whole, then the stand-in all-reduce of [M, H] fp32 (the plain sequence)
    overlap     FC2 in pieces, each piece's stand-in all-reduce (alpha + its bytes / B) on the
                second stream from the moment its FC2 is issued; waited for at the end
    hidden      1 - (overlap - rank) / all-reduce: the share of the reduction the pieces hide

The stand-in is ``torch.cuda._sleep`` calibrated in the same process: one thread block that
spins. NCCL's ring kernels also take SMs and HBM bandwidth from the GEMMs, which the stand-in
does not, so ``hidden`` is an upper bound that issue 23's NCCL runs replace.

Random weights of the share's shape (fp8), x and the gate's routing random (seeded); each rank's
output (whole and in pieces) checked first against ``experts_forward`` on the same weights and
its slice of the routing. Writes <out>.json and <out>.md.

    python bench/sharded_sim.py [--m 1,16,64,512,4096] [--pieces 4] [--out $OUT/sharded_sim_h200]
    TRITON_INTERPRET=1 python bench/sharded_sim.py --check     (CPU: tiny shapes, checks only)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import densemoe
from densemoe.parallel import Shard, cuts, sharded_experts
from densemoe.timing import Timer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sharded_estimate import all_reduce_us  # noqa: E402

E, I, H, K = 256, 2048, 7168, 8  # DeepSeek-V3


class SleepReduce:
    """A stand-in collective: each call waits ``us(cols)`` on ``stream`` after the work issued so
    far on the current stream; ``wait()`` makes the current stream wait for it (as NCCL's work
    handle does). Captured into CUDA graphs like any fork and join of streams."""

    def __init__(self, stream, cycles_per_us: float, us_of):
        self.stream, self.cycles_per_us, self.us_of = stream, cycles_per_us, us_of

    def __call__(self, buf):
        fork = torch.cuda.Event()
        fork.record()
        self.stream.wait_event(fork)
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(max(1, int(self.us_of(buf.shape[0], buf.shape[1]) * self.cycles_per_us)))
        done = torch.cuda.Event()
        done.record(self.stream)
        return _Joined(done)


class _Joined:
    def __init__(self, done):
        self.done = done

    def wait(self):
        torch.cuda.current_stream().wait_event(self.done)


def sleep_cycles_per_us() -> float:
    """The spin kernel's cycles per microsecond, measured (the SM clock it runs at)."""
    cycles = 20_000_000
    torch.cuda._sleep(cycles)  # warm
    best = float("inf")
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.cuda._sleep(cycles)
        e.record()
        e.synchronize()
        best = min(best, s.elapsed_time(e) * 1e3)
    return cycles / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="1,4,16,64,128,512,1024,4096")
    ap.add_argument("--out", default="sharded_sim_h200")
    ap.add_argument("--pieces", type=int, default=4)
    ap.add_argument("--alpha-us", type=float, default=10.0)
    ap.add_argument("--gbps", type=float, default=450.0)
    ap.add_argument("--check", action="store_true", help="tiny shapes, no timing (the CPU through the interpreter)")
    a = ap.parse_args()
    global E, I, H, K
    dev = "cpu" if a.check else "cuda"
    if a.check:
        E, I, H, K, a.m = 16, 256, 64, 4, "1,7"
    layouts = {"tp8": (Shard(tp_rank=0, tp_size=8), E, I // 8), "ep8": (Shard(ep_rank=0, ep_size=8), E // 8, I)}
    if not a.check:
        from densemoe.bench.common import read_ceiling  # the same ceiling as the layer benchmark

        timer = Timer(reps=20)
        ceiling = read_ceiling(timer)["tb_s"]
        cpu = sleep_cycles_per_us()
        side = torch.cuda.Stream()

        def ar_of(rows, cols):  # the formula for [rows, cols] fp32: alpha + ring bytes / B
            return a.alpha_us + (all_reduce_us(rows, 4, a.alpha_us, a.gbps) - a.alpha_us) * cols / H

        stand_in = SleepReduce(side, cpu, ar_of)
    g = torch.Generator(device=dev).manual_seed(0)
    records = []
    for name, (shard, e_local, i_local) in layouts.items():
        w13 = torch.randn(e_local, 2 * i_local, H, device=dev, generator=g) * H ** -0.5
        w2 = torch.randn(e_local, H, i_local, device=dev, generator=g) * i_local ** -0.5
        pw = densemoe.prepare_weights(w13, w2, dtype="fp8")
        del w13, w2
        e0 = shard.ep_rank * e_local
        for m in (int(v) for v in a.m.split(",")):
            x = torch.randn(m, H, device=dev, generator=g).to(torch.bfloat16)
            ids = torch.rand(m, E, device=dev, generator=g).topk(K, dim=1).indices
            wts = torch.softmax(torch.randn(m, K, device=dev, generator=g), dim=1)

            def run(pieces=1, reduce=None):
                return sharded_experts(x, pw, ids, wts, num_experts=E, shard=shard, pieces=pieces,
                                       simulate_reduce=reduce)

            alpha = torch.zeros(m, E, device=dev).scatter_(1, ids, wts)[:, e0:e0 + e_local]
            want = densemoe.experts_forward(x, pw, alpha, strategy="dense")
            errs = []
            for got in (run(), run(a.pieces)):
                errs.append(((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
                            if want.float().norm() > 0 else float(got.float().abs().max()))
            assert max(errs) < 0.05, f"{name} M={m}: the rank's output against experts_forward: rel err {errs}"
            if a.check:
                print(f"{name} M={m}: checked, whole and in {a.pieces} pieces (rel err {max(errs):.1e})")
                continue
            rank, rank_p, seq, over = (r["us"] for r in timer.compare(
                [run, lambda: run(a.pieces), lambda: run(1, stand_in), lambda: run(a.pieces, stand_in)]))
            picked = int(torch.zeros(E, dtype=torch.bool, device=dev).index_fill_(0, ids.reshape(-1), True)
                         [e0:e0 + e_local].sum())
            floor = picked * 3 * H * i_local / (ceiling * 1e6)
            ar = ar_of(m, H)
            hidden = 1 - (over - rank) / ar
            records.append(dict(layout=name, M=m, rank_us=rank, rank_pieces_us=rank_p, seq_us=seq, overlap_us=over,
                                hidden=hidden, rank_floor_us=floor, picked_experts=picked, all_reduce_fp32_us=ar,
                                pieces_all_reduce_us=[ar_of(m, h1 - h0) for h0, h1 in cuts(H, a.pieces)],
                                rel_err=max(errs)))
            print(f"{name} M={m}: rank {rank:.1f} us ({a.pieces} pieces {rank_p:.1f}; floor {floor:.1f}, {picked} "
                  f"experts); + all-reduce {ar:.1f}: in sequence {seq:.1f}, overlapped {over:.1f} "
                  f"({hidden:.0%} hidden)", flush=True)
    if a.check:
        return
    meta = dict(device=torch.cuda.get_device_name(), read_ceiling_tb_s=ceiling, alpha_us=a.alpha_us, gbps=a.gbps,
                pieces=a.pieces, sleep_cycles_per_us=cpu, torch=torch.__version__, command=" ".join(sys.argv))
    Path(a.out + ".json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    lines = [f"# One rank of DeepSeek-V3's MoE layer on 8 GPUs, simulated on one {meta['device']}", "",
             f"fp8, experts path, random routing; read ceiling {ceiling:.2f} TB/s; the all-reduce stood in for by a "
             f"timed wait on a second stream (alpha {a.alpha_us:g} us, {a.gbps:g} GB/s, fp32 sums; no SMs or HBM "
             f"taken, so 'hidden' is an upper bound); FC2 in {a.pieces} column pieces for 'overlap'.", "",
             "| layout | M | rank us | rank, FC2 in pieces | rank floor us | experts picked | all-reduce us "
             "| in sequence us | overlapped us | hidden |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layout']} | {r['M']} | {r['rank_us']:.1f} | {r['rank_pieces_us']:.1f} | {r['rank_floor_us']:.1f} "
              f"| {r['picked_experts']} | {r['all_reduce_fp32_us']:.1f} | {r['seq_us']:.1f} | {r['overlap_us']:.1f} "
              f"| {r['hidden']:.0%} |" for r in records]
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
