"""python -m densemoe tune ...: tune kernels for a model shape (benchmarks: python -m densemoe.bench)."""

from __future__ import annotations

import argparse
import sys


def _ms(text: str) -> list[int]:
    from densemoe.shapes import M_SWEEP

    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = map(int, part.split("-"))
            out += [m for m in M_SWEEP if lo <= m <= hi]
        else:
            out.append(int(part))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m densemoe", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tune", help="time every valid config per M bucket, record the fastest verified one")
    t.add_argument("--op", default="fc2")
    t.add_argument("--shape", default="deepseek-v3-tp8", help="a MISSION shape name, or N,E,I")
    t.add_argument("--m", default="1-512", help="token counts: comma list; a-b takes the MISSION sweep points in [a, b]")
    t.add_argument("--dtypes", default="fp8", help="fp8,bf16")
    t.add_argument("--backends", default="triton,cute")
    t.add_argument("--reps", type=int, default=20)
    t.add_argument("--no-save", action="store_true", help="do not write the user's cache")
    t.add_argument("--out", default=None, help="also write the summary table (markdown) here")
    args = ap.parse_args(argv)

    from densemoe.tuning import cache
    from densemoe.tuning.tuner import summary, tune

    shape = tuple(int(x) for x in args.shape.split(",")) if "," in args.shape else args.shape
    results = tune(args.op, shape, _ms(args.m), dtypes=args.dtypes.split(","), backends=tuple(args.backends.split(",")),
                   reps=args.reps, save=not args.no_save)
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
