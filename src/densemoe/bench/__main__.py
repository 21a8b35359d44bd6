"""python -m densemoe.bench {fc2,sweep,fc1,layer,skip} ... (needs a CUDA GPU; plot and docs do not)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from densemoe.shapes import M_SWEEP, SHAPES, parse_ms

DEFAULTS = dict(shapes="deepseek-v3-tp8,deepseek-v3-tp4,qwen3-30b-a3b", dtypes="fp8,bf16", m="1-512")
SKIP_DEFAULTS = dict(shapes="deepseek-v3-tp8", dtypes="fp8", m="1,2,4,8,16,32,64,128,256")
# issue 19: the layer and its experts path on the two shapes it names, decode and prefill chunks
LAYER_DEFAULTS = dict(shapes="deepseek-v3-tp8,qwen3-30b-a3b", dtypes="fp8,bf16", m="1-4096")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m densemoe.bench", description=__doc__)
    ap.add_argument("what", choices=["fc2", "sweep", "plot", "fc1", "layer", "skip", "docs"],
                    help="fc2: default configs vs baselines; "
                    "fc1 / layer: FC1 alone and the whole layer vs cuBLAS and transformers, and (layer) the experts "
                    "path: each strategy forced and the chosen one vs the cuBLAS fp8 pipeline, transformers' "
                    "grouped_mm and torch's grouped GEMMs, against the routed floor (bench/layer.py); "
                    "skip: expert skipping in FC1, FC2 and the layer vs their dense paths and the skipping "
                    "floor, uniform and skewed routing (bench/skip.py); "
                    "sweep: time a set of configs per M (exploration); plot: redraw <out>.md/.png from "
                    "<out>.json (no GPU needed); docs: regenerate docs/performance.md from the committed "
                    "results (--out FILE, else stdout; run from the repository root; no GPU needed)")
    ap.add_argument("--shapes", default=None,
                    help=f"comma list of {', '.join(SHAPES)}; "
                    f"default: {DEFAULTS['shapes']} ({SKIP_DEFAULTS['shapes']} for skip, "
                    f"{LAYER_DEFAULTS['shapes']} for layer)")
    ap.add_argument("--dtypes", default=None,
                    help=f"default: {DEFAULTS['dtypes']} ({SKIP_DEFAULTS['dtypes']} for skip); layer also takes "
                    "fp8block (128 x 128 block-scaled fp8 weights, routed path)")
    ap.add_argument("--m", default=None, help="comma list; a-b takes the sweep points in [a, b] "
                    f"({', '.join(map(str, M_SWEEP))}); "
                    f"default: {DEFAULTS['m']} ({SKIP_DEFAULTS['m']} for skip, {LAYER_DEFAULTS['m']} for layer)")
    ap.add_argument("--skip-max-m", type=int, default=None,
                    help="layer: time the experts path's skip strategy only up to this M (default: every M)")
    ap.add_argument("--routings", default="uniform,skewed", help="skip: routings to run (uniform, skewed)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--settle", type=int, default=None,
                    help="flushes (256 MB reads) before each timing, for the clocks to settle after the previous "
                         "one; default 1000 for layer (its routed line comes right after the dense one, ~10 ms a "
                         "call at M = 4096: with 100 it read 2.4%% slow there, with 1000 not; docs/routed.md, "
                         "eighth session), 100 otherwise")
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md (and <out>.png with --plot; "
                    "layer: always, the experts path's plot, where matplotlib is installed); "
                    "docs: the markdown file to write")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--backends", default="triton,cute", help="fc2: backends timed side by side (default configs)")
    ap.add_argument("--commit", default=None, help="commit id to record (default: git rev-parse HEAD)")
    args = ap.parse_args(argv)
    for name, value in {"skip": SKIP_DEFAULTS, "layer": LAYER_DEFAULTS}.get(args.what, DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        print(f"--shapes: unknown {', '.join(unknown)}; known: {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    known = ("fp8", "bf16", "fp8block") if args.what == "layer" else ("fp8", "bf16")  # fp8block: issue 20, layer only
    bad = [d for d in args.dtypes.split(",") if d not in known]
    if bad:
        print(f"--dtypes: unknown {', '.join(bad)} for {args.what}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    try:
        parse_ms(args.m)
    except ValueError:
        print(f"--m {args.m!r}: a comma list of token counts, a-b for the sweep points in [a, b]", file=sys.stderr)
        return 2
    if args.what == "docs":
        from densemoe.bench import docs

        missing = [p for p in docs.SOURCES.values() if not os.path.exists(p)]
        if missing:
            print(f"python -m densemoe.bench docs reads {', '.join(missing)}: run it from the repository root",
                  file=sys.stderr)
            return 2
        if args.out:
            docs.write(args.out)
        else:
            sys.stdout.write(docs.performance_md())
        return 0
    if args.what == "plot":
        if not args.out:
            print("python -m densemoe.bench plot redraws <out>.md and <out>.png from <out>.json: give --out <out>",
                  file=sys.stderr)
            return 2
        if not os.path.exists(args.out + ".json"):
            print(f"python -m densemoe.bench plot: {args.out}.json does not exist", file=sys.stderr)
            return 2
        from densemoe.bench.report import markdown, plot

        with open(args.out + ".json") as f:
            data = json.load(f)
        if {r.get("op") for r in data["records"]} & {"fc1", "layer", "experts"}:  # a layer / fc1 run
            from densemoe.bench.layer import markdown
            from densemoe.bench.layer_plot import plot_experts as plot
        with open(args.out + ".md", "w") as f:
            f.write(markdown(data["meta"], data["records"]))
        plot(data["meta"], data["records"], args.out + ".png")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("densemoe.bench needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from densemoe.bench import common, fc2
    from densemoe.timing import Timer

    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.cuda.get_device_name()
    commit = args.commit or common.git_commit()
    if args.settle is None:
        args.settle = 1000 if args.what == "layer" else 100
    timer = Timer(reps=args.reps, settle=args.settle)
    t0 = time.time()
    ceiling = common.read_ceiling(timer)
    peaks = common.peak_tflops(timer)
    print(f"# {device}: read ceiling {ceiling['tb_s']:.3f} TB/s {ceiling['variants']}; "
          f"peak fp8 {peaks['fp8']:.0f} bf16 {peaks['bf16']:.0f} TFLOP/s ({time.time() - t0:.1f}s)", flush=True)
    if args.what != "skip":
        print("# " + fc2.HEADER, flush=True)
    shapes = args.shapes.split(",")
    dtypes = args.dtypes.split(",")
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.what in ("fc1", "layer"):
        from densemoe.bench import layer

        if args.what == "fc1":
            records = layer.run_fc1(shapes, dtypes, parse_ms(args.m), timer, ceiling, peaks, device, commit, log=log)
        else:
            records = layer.run_layer(shapes, dtypes, parse_ms(args.m), timer, ceiling, peaks, device, commit, log=log,
                                      skip_max_m=args.skip_max_m)
    elif args.what == "skip":
        from densemoe.bench import skip

        records = skip.run_skip(shapes, dtypes, parse_ms(args.m), timer, ceiling, peaks, device, commit, log=log,
                                routings=tuple(args.routings.split(",")))
    else:
        configs = fc2.sweep_space if args.what == "sweep" else None
        records = fc2.run(shapes, dtypes, parse_ms(args.m), timer, ceiling, peaks, device, commit,
                          configs=configs, log=log, backends=args.backends.split(","))
    try:
        import cutlass

        cute_version = getattr(cutlass, "__version__", "installed")
    except ImportError:
        cute_version = None
    meta = dict(device=device, commit=commit, command="python -m densemoe.bench " + " ".join(argv or sys.argv[1:]),
                read_ceiling_tb_s=ceiling["tb_s"], read_variants=ceiling["variants"], peak_tflops=peaks,
                timer_reps=args.reps, timer_settle=args.settle,
                torch=torch.__version__, triton=triton.__version__, cutlass_dsl=cute_version,
                python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), wall_s=time.time() - t0)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)
        from densemoe.bench.report import markdown, plot

        if args.what in ("fc1", "layer"):
            from densemoe.bench.layer import markdown
        elif args.what == "skip":
            from densemoe.bench.skip import markdown_skip as markdown
        with open(args.out + ".md", "w") as f:
            f.write(markdown(meta, records))
        if args.what == "layer":  # the experts path's plot, where matplotlib is installed
            try:
                from densemoe.bench.layer_plot import plot_experts

                plot_experts(meta, records, args.out + ".png")
            except ImportError:
                pass
        if args.plot and args.what not in ("fc1", "layer", "skip"):
            try:
                plot(meta, records, args.out + ".png")
            except ImportError as exc:  # matplotlib is the optional `bench` extra
                print(f"# no plot: {exc}; redraw later with `python -m densemoe.bench plot --out {args.out}`")
    if args.what == "sweep":
        from densemoe.bench.fc2 import fmt_row

        keys = sorted({(r["shape"], r["dtype"], r["M"]) for r in records})
        print("# best per point (sweep):")
        for k in keys:
            rs = sorted((r for r in records if (r["shape"], r["dtype"], r["M"]) == k and r.get("us")),
                        key=lambda r: r["us"])
            for r in rs[:3]:
                print(fmt_row(r))
    bad = [r for r in records if r.get("us") is None]
    print(f"# {len(records)} records, {len(bad)} failed, {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
