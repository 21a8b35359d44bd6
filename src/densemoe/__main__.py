"""python -m densemoe {tune,shapes}: tune kernels for a model shape, list the shapes (benchmarks:
python -m densemoe.bench)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from densemoe.shapes import parse_ms


def _fail(message: str):
    """A bad argument: one line on stderr, exit status 2 (as argparse's own usage errors)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _shape(text: str):
    """A shape name of ``densemoe.shapes.SHAPES``, N,E,I or N,E,I,K (K: top-k, default 8) ->
    (MoEShape, the tuner's shape argument)."""
    from densemoe.shapes import SHAPES, MoEShape

    if "," in text:
        try:
            dims = tuple(int(x) for x in text.split(","))
            if len(dims) not in (3, 4) or min(dims) < 1:
                raise ValueError
        except ValueError:
            _fail(f"--shape {text!r}: give a shape name ({', '.join(SHAPES)}), N,E,I or N,E,I,K (K: top-k)")
        n, e, i = dims[:3]
        return MoEShape("custom", n, e, i, dims[3] if len(dims) == 4 else 8), dims
    if text not in SHAPES:
        _fail(f"--shape {text!r}: known shapes are {', '.join(SHAPES)} (or N,E,I or N,E,I,K)")
    return SHAPES[text], text


def _check_args(args) -> None:
    """One clear line (SystemExit) for a bad argument, before any work."""
    from densemoe.shapes import parse_ms
    from densemoe.tuning.space import BACKENDS
    from densemoe.tuning.tuner import BLOCK_DTYPES, BLOCK_OPS, DTYPES, TUNABLE

    if args.op not in TUNABLE:
        _fail(f"--op {args.op!r}: tunable ops are {', '.join(TUNABLE)}")
    s, _ = _shape(args.shape)
    if args.op in ("routed", "strategy") and s.topk > s.experts:
        _fail(f"--shape {args.shape!r}: top-k {s.topk} is more than the {s.experts} experts")
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES and d not in BLOCK_DTYPES]
    if bad:
        _fail(f"--dtypes {args.dtypes!r}: choose from {', '.join([*DTYPES, *BLOCK_DTYPES])}")
    if args.op not in BLOCK_OPS and any(d in BLOCK_DTYPES for d in args.dtypes.split(",")):
        _fail(f"--dtypes {args.dtypes!r}: {', '.join(BLOCK_DTYPES)} is for --op {' or '.join(BLOCK_OPS)}")
    bad = [b for b in args.backends.split(",") if b not in BACKENDS]
    if bad:
        _fail(f"--backends {args.backends!r}: choose from {', '.join(BACKENDS)}")
    try:
        parse_ms(args.m)
    except ValueError:
        _fail(f"--m {args.m!r}: a comma list of token counts, a-b for the sweep points in [a, b]")


def _dry_run(args) -> str:
    """The tuning plan without a GPU: candidates per bucket and distinct compiles (the
    crossovers: the strategies timed per bucket and what the rule picks without them)."""
    import torch

    from densemoe.tuning.buckets import m_bucket
    from densemoe.tuning.ops import OPS
    from densemoe.tuning.tuner import _block_of, _dtype_of

    s, _ = _shape(args.shape)
    if args.op == "strategy":
        from densemoe.ops import strategy

        lines = ["| dtype | M bucket | strategies timed | the rule without a crossover |", "|---|---:|---|---|"]
        for dt in args.dtypes.split(","):
            for b in sorted({m_bucket(m) for m in parse_ms(args.m)}):
                pick = strategy.pick(b, s.experts, s.topk)
                lines.append(f"| {dt} | {b} | {', '.join(strategy.STRATEGIES)} | {pick} |")
        return "\n".join(lines)
    spec = OPS[args.op]
    backends = tuple(args.backends.split(","))
    lines = ["| dtype | M bucket | triton | cute |", "|---|---:|---:|---:|"]
    for dt in args.dtypes.split(","):
        distinct = set()
        for b in sorted({m_bucket(m) for m in parse_ms(args.m)}):
            q = spec.problem(b, s, _dtype_of(dt), torch.bfloat16)
            space = spec.space(dataclasses.replace(q, block=_block_of(dt)) if _block_of(dt) else q, backends, 132)
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
    t.add_argument("--op", default="fc2", help="fc2, fc1, routed (the routed path's tiles) or strategy (the "
                   "crossovers: skip / dense / routed timed per M bucket; tune the other three first)")
    t.add_argument("--shape", default="deepseek-v3-tp8",
                   help=f"a model shape ({', '.join(SHAPES)}: python -m densemoe shapes), N,E,I or N,E,I,K "
                   "(K: top-k, default 8)")
    t.add_argument("--m", default="1-512", help="token counts: comma list; a-b takes the sweep points in [a, b] "
                   f"({', '.join(map(str, M_SWEEP))})")
    t.add_argument("--dtypes", default="fp8", help="fp8,bf16")
    t.add_argument("--backends", default="triton,cute")
    t.add_argument("--reps", type=int, default=20)
    t.add_argument("--compile-workers", type=int, default=None,
                   help="processes that compile Triton candidates before timing (default: half the CPUs, at most 8; 0: none)")
    t.add_argument("--no-save", action="store_true", help="do not write the user's cache")
    t.add_argument("--missing-only", action="store_true",
                   help="skip the M buckets that already have an entry in the user's cache (resume a sweep)")
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
                       compile_workers=args.compile_workers, missing_only=args.missing_only)
    except ValueError as exc:  # no GPU, or an argument tune() refuses: one line, no traceback
        print(f"python -m densemoe tune: {exc} (--dry-run prints the search space without a GPU)", file=sys.stderr)
        return 2
    table = summary(results)
    print(table)
    for r in results:
        for line in r.dropped():
            print(line, file=sys.stderr)
    if not args.no_save:
        print(f"saved to {cache.cache_path()}", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
