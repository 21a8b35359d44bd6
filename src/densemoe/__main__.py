"""python -m densemoe {tune,shapes}: tune kernels for a model shape, list the shapes (benchmarks:
python -m densemoe.bench)."""

from __future__ import annotations

import argparse
import sys

from densemoe.shapes import parse_ms


def _fail(message: str):
    """A bad argument: one line on stderr, exit status 2 (as argparse's own usage errors)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _shape(text: str):
    """A shape name of ``densemoe.shapes.SHAPES`` or N,E,I -> (MoEShape, the tuner's shape argument)."""
    from densemoe.shapes import SHAPES, MoEShape

    if "," in text:
        try:
            n, e, i = (int(x) for x in text.split(","))
        except ValueError:
            _fail(f"--shape {text!r}: give a shape name ({', '.join(SHAPES)}) or N,E,I")
        return MoEShape("custom", n, e, i, 8), (n, e, i)
    if text not in SHAPES:
        _fail(f"--shape {text!r}: known shapes are {', '.join(SHAPES)} (or N,E,I)")
    return SHAPES[text], text


def _check_args(args) -> None:
    """One clear line (SystemExit) for a bad argument, before any work."""
    from densemoe.shapes import parse_ms
    from densemoe.tuning.ops import OPS
    from densemoe.tuning.space import BACKENDS
    from densemoe.tuning.tuner import DTYPES

    if args.op not in OPS:
        _fail(f"--op {args.op!r}: tunable ops are {', '.join(sorted(OPS))}")
    _shape(args.shape)
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        _fail(f"--dtypes {args.dtypes!r}: choose from {', '.join(DTYPES)}")
    bad = [b for b in args.backends.split(",") if b not in BACKENDS]
    if bad:
        _fail(f"--backends {args.backends!r}: choose from {', '.join(BACKENDS)}")
    try:
        parse_ms(args.m)
    except ValueError:
        _fail(f"--m {args.m!r}: a comma list of token counts, a-b for the sweep points in [a, b]")


def _dry_run(args) -> str:
    """The tuning plan without a GPU: candidates per bucket and distinct compiles."""
    import torch

    from densemoe.tuning.buckets import m_bucket
    from densemoe.tuning.ops import OPS
    from densemoe.tuning.tuner import DTYPES

    spec = OPS[args.op]
    s, _ = _shape(args.shape)
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
    from densemoe.shapes import M_SWEEP, SHAPES

    ap = argparse.ArgumentParser(prog="python -m densemoe", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tune", help="time every valid config per M bucket, record the fastest verified one "
                       "(needs a CUDA GPU; --dry-run does not)")
    t.add_argument("--op", default="fc2", help="fc2 or fc1")
    t.add_argument("--shape", default="deepseek-v3-tp8",
                   help=f"a model shape ({', '.join(SHAPES)}: python -m densemoe shapes), or N,E,I")
    t.add_argument("--m", default="1-512", help="token counts: comma list; a-b takes the sweep points in [a, b] "
                   f"({', '.join(map(str, M_SWEEP))})")
    t.add_argument("--dtypes", default="fp8", help="fp8,bf16")
    t.add_argument("--backends", default="triton,cute")
    t.add_argument("--reps", type=int, default=20)
    t.add_argument("--compile-workers", type=int, default=None,
                   help="processes that compile Triton candidates before timing (default: half the CPUs, at most 8; 0: none)")
    t.add_argument("--no-save", action="store_true", help="do not write the user's cache")
    t.add_argument("--out", default=None, help="also write the summary table (markdown) here")
    t.add_argument("--dry-run", action="store_true",
                   help="print the search space per M bucket (configs per backend, distinct compiles) and exit")
    sub.add_parser("shapes", help="list the model shapes by name (H, E, I per rank, top-k)")
    args = ap.parse_args(argv)
    if args.cmd == "shapes":
        print("| name | H | E | I per rank | top-k |\n|---|---:|---:|---:|---:|")
        for s in SHAPES.values():
            print(f"| {s.name} | {s.hidden} | {s.experts} | {s.inter} | {s.topk} |")
        return 0
    _check_args(args)
    if args.dry_run:
        print(_dry_run(args))
        return 0

    from densemoe.tuning import cache
    from densemoe.tuning.tuner import summary, tune

    _, shape = _shape(args.shape)
    try:
        results = tune(args.op, shape, parse_ms(args.m), dtypes=args.dtypes.split(","),
                       backends=tuple(args.backends.split(",")), reps=args.reps, save=not args.no_save,
                       compile_workers=args.compile_workers)
    except ValueError as exc:  # no GPU, or an argument tune() refuses: one line, no traceback
        print(f"python -m densemoe tune: {exc} (--dry-run prints the search space without a GPU)", file=sys.stderr)
        return 2
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
