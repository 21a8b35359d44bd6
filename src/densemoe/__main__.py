"""python -m densemoe tune ...: tune kernels for a model shape (benchmarks: python -m densemoe.bench)."""

from __future__ import annotations

import argparse
import sys

from densemoe.shapes import parse_ms


def _dry_run(args) -> str:
    """The tuning plan without a GPU: candidates per bucket and distinct compiles."""
    import torch

    from densemoe.shapes import SHAPES, MoEShape
    from densemoe.tuning.buckets import m_bucket
    from densemoe.tuning.ops import OPS
    from densemoe.tuning.tuner import DTYPES

    if args.op not in OPS:
        raise SystemExit(f"--op {args.op!r}: tunable ops are {sorted(OPS)}")
    spec = OPS[args.op]
    if "," in args.shape:
        n, e, i = (int(x) for x in args.shape.split(","))
        s = MoEShape("custom", n, e, i, 8)
    else:
        s = SHAPES[args.shape]
    backends = tuple(args.backends.split(","))
    lines = ["| dtype | M bucket | triton | cute |", "|---|---:|---:|---:|"]
    for dt in args.dtypes.split(","):
        distinct = set()
        for b in sorted({m_bucket(m) for m in parse_ms(args.m)}):
            space = spec.space(spec.problem(b, s, DTYPES[dt], torch.bfloat16), backends, 132)
            distinct |= set(space)
            lines.append(f"| {dt} | {b} | {sum(c.backend == 'triton' for c in space)} | "
                         f"{sum(c.backend == 'cute' for c in space)} |")
        lines.append(f"| {dt} | distinct (compiles) | {sum(c.backend == 'triton' for c in distinct)} | "
                     f"{sum(c.backend == 'cute' for c in distinct)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m densemoe", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tune", help="time every valid config per M bucket, record the fastest verified one")
    t.add_argument("--op", default="fc2", help="fc2 or fc1")
    t.add_argument("--shape", default="deepseek-v3-tp8", help="a MISSION shape name, or N,E,I")
    t.add_argument("--m", default="1-512", help="token counts: comma list; a-b takes the MISSION sweep points in [a, b]")
    t.add_argument("--dtypes", default="fp8", help="fp8,bf16")
    t.add_argument("--backends", default="triton,cute")
    t.add_argument("--reps", type=int, default=20)
    t.add_argument("--compile-workers", type=int, default=None,
                   help="processes that compile Triton candidates before timing (default: half the CPUs, at most 8; 0: none)")
    t.add_argument("--no-save", action="store_true", help="do not write the user's cache")
    t.add_argument("--out", default=None, help="also write the summary table (markdown) here")
    t.add_argument("--dry-run", action="store_true",
                   help="print the search space per M bucket (configs per backend, distinct compiles) and exit")
    args = ap.parse_args(argv)
    if args.dry_run:
        print(_dry_run(args))
        return 0

    from densemoe.tuning import cache
    from densemoe.tuning.tuner import summary, tune

    shape = tuple(int(x) for x in args.shape.split(",")) if "," in args.shape else args.shape
    results = tune(args.op, shape, parse_ms(args.m), dtypes=args.dtypes.split(","), backends=tuple(args.backends.split(",")),
                   reps=args.reps, save=not args.no_save, compile_workers=args.compile_workers)
    table = summary(results)
    print(table)
    for r in results:
        for f in r.failures:
            print(f"dropped M<={r.problem.m} {f.config.to_str()}: {f.error}", file=sys.stderr)
    if not args.no_save:
        print(f"saved to {cache.cache_path()}", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
