"""The expected per-layer time of DeepSeek-V3's MoE layer on 8 H200s under tensor parallelism
(issue 22), from measured single-GPU figures and a formula for the all-reduce: no GPU needed.

    one rank's layer    the layer benchmark's "layer" record (router + experts) at the
                        deepseek-v3-tp8 shape: exactly one TP8 rank's share (I = 2048 / 8 = 256)
    all-reduce          t = alpha + 2 (n - 1) / n * M * H * bytes / B    (ring, n = 8 ranks)
    no overlap          layer + all-reduce            (``pieces=1``, densemoe.parallel's default)
    FC2 in pieces       ``sharded_experts(pieces=p)``: FC2's output columns in p pieces, piece j's
                        all-reduce (alpha + its bytes / B) starting when its FC2 ends and the
                        previous piece's all-reduce has; the layer ends with the last of them.
                        FC2 is taken as ``--fc2-share`` of the layer (0.4: TP8 M = 128-2048 in
                        bench/results/routed_probes_h200_2026-12-05_session2.log, 0.34-0.46) and
                        the pieces as costing nothing extra (bench/sharded_sim.py measures both)

alpha and B are assumptions until issue 23 measures NCCL on the machine: alpha = 10 us (NCCL's
small-message all-reduce latency on one NVLink node is of that order), B = 450 GB/s (an H200
HGX GPU's NVLink 4 bandwidth in one direction: 18 links x 25 GB/s).

    python bench/sharded_estimate.py [results.json.gz] [--alpha-us 10] [--gbps 450] [--pieces 4]
                                     [--fc2-share 0.4]
"""

from __future__ import annotations

import argparse
import gzip
import json

H = 7168  # DeepSeek-V3's hidden size
N = 8
DEFAULT = "bench/results/layer_h200_2026-12-05_session7_deepseek-v3-tp8_fp8.json.gz"


def all_reduce_us(m: int, bytes_per: int, alpha_us: float, gbps: float, n: int = N) -> float:
    return alpha_us + 2 * (n - 1) / n * m * H * bytes_per / (gbps * 1e3)


def in_pieces_us(layer_us: float, fc2_share: float, m: int, bytes_per: int, alpha_us: float, gbps: float,
                 pieces: int) -> float:
    """The layer with FC2 in ``pieces`` column pieces, each piece's all-reduce issued when its FC2
    ends (module docstring)."""
    fc2 = layer_us * fc2_share
    piece_ar = alpha_us + (all_reduce_us(m, bytes_per, alpha_us, gbps) - alpha_us) / pieces
    t_fc2 = layer_us - fc2
    comm_end = 0.0
    for _ in range(pieces):
        t_fc2 += fc2 / pieces
        comm_end = max(t_fc2, comm_end) + piece_ar
    return max(layer_us, comm_end)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", default=DEFAULT)
    ap.add_argument("--alpha-us", type=float, default=10.0)
    ap.add_argument("--gbps", type=float, default=450.0)
    ap.add_argument("--pieces", type=int, default=4)
    ap.add_argument("--fc2-share", type=float, default=0.4)
    a = ap.parse_args()
    data = json.loads(gzip.open(a.results).read() if a.results.endswith(".gz") else open(a.results).read())
    layer = {r["M"]: r for r in data["records"] if r.get("op") == "layer" and r.get("us")}
    meta = data["meta"]
    print(f"Source: `{a.results}` ({meta['device']}, commit {meta['commit']}, {meta['date']}): one TP8 rank's "
          f"layer (router + experts, fp8). All-reduce: ring over {N} ranks, alpha = {a.alpha_us:g} us, "
          f"B = {a.gbps:g} GB/s (assumed). FC2 in {a.pieces} column pieces, FC2 taken as {a.fc2_share:.0%} of the "
          f"layer.\n")
    print("| M | one rank's layer us (measured) | all-reduce fp32 us | all-reduce bf16 us "
          "| 8 x H200, fp32 sums, no overlap | FC2 in pieces, fp32 sums | the same, bf16 sums | reduction share (fp32, no overlap) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in sorted(layer):
        t = layer[m]["us"]
        f32, b16 = all_reduce_us(m, 4, a.alpha_us, a.gbps), all_reduce_us(m, 2, a.alpha_us, a.gbps)
        over = [in_pieces_us(t, a.fc2_share, m, b, a.alpha_us, a.gbps, a.pieces) for b in (4, 2)]
        print(f"| {m} | {t:.1f} | {f32:.1f} | {b16:.1f} | {t + f32:.1f} | {over[0]:.1f} | {over[1]:.1f} "
              f"| {f32 / (t + f32):.0%} |")


if __name__ == "__main__":
    main()
