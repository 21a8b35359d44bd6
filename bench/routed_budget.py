"""Where the routed path's time goes against the bytes each launch must move (issue 19's targets
at M >= 64): reads the per-launch times that ``bench/probes/routed_stages.py`` printed on the
H200 (a committed log) and sets beside each launch its bound: the least HBM traffic it needs at
the read ceiling, or its FLOPs at the fp8 peak, whichever is longer. No GPU needed.

    least bytes per launch (P = M * k pairs; picked = the experts the batch picks, expected
    under uniform top-k: E (1 - (1 - k/E)^M); fp8 x, y and weights, bf16 rows and out):
    quant      x in bf16 + x8 + its scales                M H (2 + 1) + 4 M
    schedule   the ids and the sorted pairs               P (8 + 4)
    fc1        picked w13 + x8 + y + y's scales           picked 2 I H + M H + P I + 4 P I / 128
    fc2        picked w2 + y + the pairs' bf16 rows       picked H I + P I + 2 P H
    combine    the rows + out                             2 P H + 2 M H

    FLOPs: fc1 2 P 2I H, fc2 2 P H I (at 1333 TFLOP/s, the H200's cuBLAS fp8 peak)

    pipeline floor   the sum of the launches' bounds (they run one after another)
    issue floor      the picked weights alone at the ceiling (issue 19's routed floor)

    python bench/routed_budget.py [log] [--section "second device session"]
"""

from __future__ import annotations

import argparse
import re

DEFAULT = "bench/results/routed_probes_h200_2026-12-05_session2.log"
SHAPES = {"deepseek-v3-tp8": dict(E=256, I=256, H=7168, k=8), "qwen3-30b-a3b": dict(E=128, I=768, H=2048, k=8)}
STAGES = ("quant", "schedule", "fc1", "fc2", "combine")
LINE = re.compile(r"^M=(\d+) (\S+): quant ([\d.]+) schedule ([\d.]+) fc1 ([\d.]+) \([\d.]+\) fc2 ([\d.]+) "
                  r"\([\d.]+\) combine ([\d.]+) \| sum ([\d.]+) whole ([\d.]+)")


def least_bytes(M: int, E: int, I: int, H: int, k: int) -> dict:
    P = M * k
    picked = E * (1 - (1 - k / E) ** M)
    return dict(quant=3 * M * H + 4 * M, schedule=12 * P, fc1=picked * 2 * I * H + M * H + P * I + 4 * P * I / 128,
                fc2=picked * H * I + P * I + 2 * P * H, combine=2 * P * H + 2 * M * H, weights=picked * 3 * I * H)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", nargs="?", default=DEFAULT)
    ap.add_argument("--ceiling", type=float, default=4.57, help="TB/s (the log's read ceiling)")
    ap.add_argument("--peak", type=float, default=1333.0, help="fp8 TFLOP/s")
    a = ap.parse_args()
    shape, rows = None, {}
    for line in open(a.log):
        for name in SHAPES:
            if line.startswith(f"# {name}"):
                shape = name
        m = LINE.match(line.strip())
        if m and shape is not None and (shape, int(m.group(1))) not in rows:  # the first measurement of a point
            rows[(shape, int(m.group(1)))] = m
    print("| shape | M | config | " + " | ".join(STAGES) + " | whole us | pipeline floor us | issue floor us "
          "| whole / pipeline floor |")
    print("|---|---:|---|" + "---:|" * (len(STAGES) + 4))
    for (shape, M), m in sorted(rows.items()):
        us = dict(zip(STAGES, map(float, m.groups()[2:7])))
        whole = float(m.group(9))
        sh = SHAPES[shape]
        b = least_bytes(M, **sh)
        P = M * sh["k"]
        flops = dict(fc1=2 * P * 2 * sh["I"] * sh["H"], fc2=2 * P * sh["H"] * sh["I"])
        bound = {s: max(b[s] / (a.ceiling * 1e6), flops.get(s, 0) / (a.peak * 1e6)) for s in STAGES}
        capped = {s for s in STAGES if flops.get(s, 0) / (a.peak * 1e6) > b[s] / (a.ceiling * 1e6)}
        floor = sum(bound.values())
        cells = " | ".join(f"{us[s]:.1f} / {bound[s]:.1f}{' c' if s in capped else ''}" for s in STAGES)
        print(f"| {shape} | {M} | `{m.group(2)}` | {cells} | {whole:.1f} | {floor:.1f} "
              f"| {b['weights'] / (a.ceiling * 1e6):.1f} | {whole / floor:.2f} |")


if __name__ == "__main__":
    main()
