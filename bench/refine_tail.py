"""Tail tiles (``RoutedConfig.fc1_tail_m``, ``fc2_tail_m``; issue 19) on the tuned routed
entries: for each large-M bucket, the config the shipped table (or the cache under
DENSEMOE_CACHE_DIR) gives, beside the same config with tail tiles (FC1's of 16 and of 32 rows,
both GEMMs' of 16 and of 32, FC2's of 16), through the tuner (``tune_problem`` with that
six-config space: each checked against the reference, the fastest re-timed, the rule's pick kept
unless beaten by the margin), saved into the cache for ``bench/merge_tuned.py``. A short
refinement where a full retune of these buckets does not fit a device call.

    DENSEMOE_CACHE_DIR=$OUT/wip python bench/refine_tail.py [--shapes a,b] [--m 1024,...] [--dtype fp8]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from densemoe.kernels.triton.routed import can_implement
from densemoe.ops import routed_configs
from densemoe.tuning.buckets import m_bucket
from densemoe.tuning.precompile import precompile
from densemoe.tuning.tuner import strategy_problem, tune_problem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="deepseek-v3-tp8,qwen3-30b-a3b")
    ap.add_argument("--m", default="1024,1536,2048,3072,4096")
    ap.add_argument("--dtype", default="fp8")
    a = ap.parse_args()
    plan = []
    for shape in a.shapes.split(","):
        for m in [int(v) for v in a.m.split(",")]:
            p = strategy_problem(m, shape, a.dtype)
            base = routed_configs.choose(p, "cuda").config
            tails = ((16, 0), (32, 0), (16, 16), (32, 32), (0, 16))  # (fc1_tail_m, fc2_tail_m)
            plan.append((shape, p, [base] + [c for t1, t2 in tails if can_implement(
                p, c := dataclasses.replace(base, fc1_tail_m=t1, fc2_tail_m=t2))[0]]))
    precompile([(dataclasses.replace(p, m=m_bucket(p.m)), space) for _, p, space in plan], "cuda")  # in parallel
    for shape, p, space in plan:
        r = tune_problem(p, "cuda", space=space)
        times = ", ".join(f"{t.config.short()} {t.us:.1f}" if t.us else f"{t.config.short()} {t.error}"
                          for t in r.timings)
        print(f"tail {shape} {a.dtype} M={p.m}: best {r.best.config.short() if r.best else None}; {times}", flush=True)

if __name__ == "__main__":
    main()
