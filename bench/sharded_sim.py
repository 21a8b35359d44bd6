"""One rank of DeepSeek-V3's MoE layer on 8 GPUs, simulated on one GPU (issue 22): the rank's
share of the experts timed through ``densemoe.parallel.sharded_experts(..., shard=)`` (no
collective), plus the all-reduce from ``bench/sharded_estimate.py``'s formula.

    TP8: every expert, I / 8 = 256 columns of each (the deepseek-v3-tp8 shape);
    EP8: 32 whole experts (I = 2048), routed by the global top-8 of 256 (each token sends about
         one pair here; a rank sees a token only if it picked one of its experts).

Random weights of the share's shape (fp8), x and the gate's routing random (seeded); each rank's
output checked first against ``experts_forward`` on the same weights and its slice of the
routing. Timed with ``densemoe.timing.Timer`` (CUDA graph, L2 flushed, median), the read ceiling
in the same process. Writes <out>.json and <out>.md.

    python bench/sharded_sim.py [--m 1,16,64,512,4096] [--out $OUT/sharded_sim_h200]
    TRITON_INTERPRET=1 python bench/sharded_sim.py --check     (CPU: tiny shapes, checks only)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import densemoe
from densemoe.parallel import Shard, sharded_experts
from densemoe.timing import Timer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sharded_estimate import all_reduce_us  # noqa: E402

E, I, H, K = 256, 2048, 7168, 8  # DeepSeek-V3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="1,4,16,64,128,512,1024,4096")
    ap.add_argument("--out", default="sharded_sim_h200")
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
            got = sharded_experts(x, pw, ids, wts, num_experts=E, shard=shard)
            alpha = torch.zeros(m, E, device=dev).scatter_(1, ids, wts)[:, e0:e0 + e_local]
            want = densemoe.experts_forward(x, pw, alpha, strategy="dense")
            err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item() \
                if want.float().norm() > 0 else float(got.float().abs().max())
            assert err < 0.05, f"{name} M={m}: the rank's output against experts_forward: rel err {err:.3e}"
            if a.check:
                print(f"{name} M={m}: checked (rel err {err:.1e})")
                continue
            us = timer(lambda: sharded_experts(x, pw, ids, wts, num_experts=E, shard=shard))["us"]
            picked = int(torch.zeros(E, dtype=torch.bool, device=dev).index_fill_(0, ids.reshape(-1), True)
                         [e0:e0 + e_local].sum())
            floor = picked * 3 * H * i_local / (ceiling * 1e6)
            ar = all_reduce_us(m, 4, a.alpha_us, a.gbps)
            records.append(dict(layout=name, M=m, rank_us=us, rank_floor_us=floor, picked_experts=picked,
                                all_reduce_fp32_us=ar, layer_8gpu_us=us + ar, rel_err=err))
            print(f"{name} M={m}: rank {us:.1f} us (floor {floor:.1f}, {picked} experts) + all-reduce {ar:.1f} "
                  f"= {us + ar:.1f} us", flush=True)
    if a.check:
        return
    meta = dict(device=torch.cuda.get_device_name(), read_ceiling_tb_s=ceiling, alpha_us=a.alpha_us, gbps=a.gbps,
                torch=torch.__version__, command=" ".join(sys.argv))
    Path(a.out + ".json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    lines = [f"# One rank of DeepSeek-V3's MoE layer on 8 GPUs, simulated on one {meta['device']}", "",
             f"fp8, experts path, random routing; read ceiling {ceiling:.2f} TB/s; all-reduce by formula "
             f"(alpha {a.alpha_us:g} us, {a.gbps:g} GB/s, fp32 sums).", "",
             "| layout | M | rank us | rank floor us | experts picked | all-reduce us | 8 GPUs us |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layout']} | {r['M']} | {r['rank_us']:.1f} | {r['rank_floor_us']:.1f} | {r['picked_experts']} "
              f"| {r['all_reduce_fp32_us']:.1f} | {r['layer_8gpu_us']:.1f} |" for r in records]
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
