"""Does a timing read slow right after a heavy one? The layer benchmark's interleaved rounds time
the routed line right after the dense one; on the H200 (2026-12-05, seventh session) the routed
path read 3-5% slower there at M >= 1024 than the same callable timed again right after it
(`docs/routed-journal.md`, "Seventh session"). This probe times the same routed call in three positions,
each as its own ``Timer`` call (CUDA graph, L2 flushed, median of ``reps``), in interleaved
rounds, for each ``settle`` (the timer's reads before a timing, in flushes of 256 MB):

    after_dense   dense forced, then routed            (the benchmark's order)
    again         routed right after ``after_dense``   (the benchmark's chosen line until 2026-12-05)
    after_idle    routed after 200 ms with the GPU idle

Both paths are checked against each other first. One line per (M, settle): the three medians
(us) and their ratios to ``again``. If ``after_dense`` reads slow at the default settle and not
at a longer one, the benchmark's settle is too short after heavy lines.

    python bench/probes/timing_position.py [shape] [dtype] [M,...] [settle,...]
    python bench/probes/timing_position.py --check      (tiny shape, interpreter, no timing)

shape: deepseek-v3-tp8 (default); dtype: fp8 (default), bf16; M: 1024,4096; settle: 100,1000.
"""

from __future__ import annotations

import sys
import time

import torch

import densemoe
from densemoe.bench.layer import ExpertsCase
from densemoe.shapes import MoEShape
from densemoe.tuning.ops import routed_topk


def calls(case, dt: str, M: int, dev: str):
    """(dense, routed) callables on a typical routing, checked against each other."""
    p = case.prepared[dt]
    x = case.x(M)
    ids, wts = routed_topk(M, case.E, case.k, dev, torch.Generator(device=dev).manual_seed(M))
    alpha = torch.zeros(M, case.E, device=dev).scatter(1, ids, wts)

    def dense():
        return densemoe.experts_forward(x, p, alpha, strategy="dense")

    def routed():
        return densemoe.experts_forward(x, p, alpha, strategy="routed", expert_ids=ids, topk_weights=wts)

    a, b = dense().float(), routed().float()
    err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    assert err < (0.05 if dt == "fp8" else 2e-2), f"M={M}: routed vs dense rel err {err:.3e}"
    return dense, routed


def main(argv: list[str]) -> None:
    if argv[:1] == ["--check"]:  # the calls and their check on a tiny shape, no timing
        case = ExpertsCase(MoEShape("tiny", 64, 8, 32, 2), "cpu")
        for M in (1, 7):
            calls(case, "fp8", M, "cpu")
        print("check passed")
        return
    from densemoe.timing import Timer

    shape = argv[0] if len(argv) > 0 else "deepseek-v3-tp8"
    dt = argv[1] if len(argv) > 1 else "fp8"
    ms = [int(m) for m in (argv[2] if len(argv) > 2 else "1024,4096").split(",")]
    settles = [int(s) for s in (argv[3] if len(argv) > 3 else "100,1000").split(",")]
    case = ExpertsCase(shape, "cuda")
    print(f"# {shape} {dt} {torch.cuda.get_device_name()}; us, median of 3 rounds of Timer(reps=20)")
    for M in ms:
        dense, routed = calls(case, dt, M, "cuda")
        for settle in settles:
            timer = Timer(reps=20, settle=settle)
            rows = {"after_dense": [], "again": [], "after_idle": []}
            for _ in range(3):
                timer(dense)
                rows["after_dense"].append(timer(routed)["us"])
                rows["again"].append(timer(routed)["us"])
                torch.cuda.synchronize()
                time.sleep(0.2)
                rows["after_idle"].append(timer(routed)["us"])
            med = {k: sorted(v)[1] for k, v in rows.items()}
            print(f"M={M} settle={settle}: " + " ".join(f"{k} {v:.1f}" for k, v in med.items())
                  + f" | after_dense/again {med['after_dense'] / med['again']:.3f}"
                  + f" after_idle/again {med['after_idle'] / med['again']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
