"""Markdown table and plot of benchmark records (no GPU needed)."""

from __future__ import annotations


def _best(records):
    """Per (shape, dtype, M) the fastest successful record."""
    best = {}
    for r in records:
        if r.get("us") is None:
            continue
        k = (r["shape"], r["dtype"], r["M"])
        if k not in best or r["us"] < best[k]["us"]:
            best[k] = r
    from densemoe.shapes import SHAPES

    order = {name: i for i, name in enumerate(SHAPES)}
    return [best[k] for k in sorted(best, key=lambda k: (order.get(k[0], len(order)), k[0], k[1] != "fp8", k[2]))]


def _requested(r: dict) -> str:
    return r.get("requested", r.get("backend", "triton"))


def markdown(meta: dict, records: list[dict]) -> str:
    """The run as markdown. With ``auto`` records (what a call with no config runs: tuned table,
    else the heuristic) the main columns describe those, next to the heuristic's time for the same
    call and each backend's own time; without them, the faster of the two backends."""
    auto = [r for r in records if _requested(r) == "auto"]
    head = [f"# FC2 on {meta['device']}", "",
            f"commit `{meta['commit']}`, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}"
            + (f", CuTe DSL {meta['cutlass_dsl']}" if meta.get("cutlass_dsl") else "") + ". "
            f"Measured in the same run: read ceiling {meta['read_ceiling_tb_s']:.2f} TB/s, "
            f"cuBLAS peaks fp8 {meta['peak_tflops']['fp8']:.0f} / bf16 {meta['peak_tflops']['bf16']:.0f} TFLOP/s. "
            "Floor = max(bytes / read ceiling, FLOPs / peak). Times: CUDA-graph replay, L2 flushed, median. "
            "cuBLAS runs get alpha pre-folded into `a` (fold not timed) and apply no alpha.", "",
            f"Command: `{meta['command']}`", ""]
    per_backend, rec_of = {}, {}
    for r in records:
        if r.get("us") is not None and _requested(r) in ("triton", "cute"):
            k = (r["shape"], r["dtype"], r["M"], r.get("backend", "triton"))
            if k not in per_backend or r["us"] < per_backend[k]:
                per_backend[k] = r["us"]
                rec_of[k] = r

    def be_cols(r):
        keys = [(r["shape"], r["dtype"], r["M"], b) for b in ("triton", "cute")]
        return [f"{per_backend[k]:.1f}" + ("*" if rec_of[k].get("tuned") else "") if k in per_backend else "-"
                for k in keys]

    def tail(r):
        c8 = f"{r['cublas_fp8_us']:.1f}" if r.get("cublas_fp8_us") else "-"
        x8 = f"{r['speedup_vs_cublas_fp8']:.2f}" if r.get("speedup_vs_cublas_fp8") else "-"
        return (f"{r['tb_s']:.2f} | {r['tflops']:.0f} | {r['floor_us']:.1f} | {r['pct_floor']:.1f} | {c8} | {x8} | "
                f"{r['cublas_bf16_us']:.1f} | {r['speedup_vs_cublas_bf16']:.2f} |")

    lines = head
    if auto:
        lines += ["`auto`: what `densemoe.fc2` runs with no config (`*`: a tuned config from the shipped "
                  "table or the user's cache; else the heuristic). `heuristic`: the heuristic's own choice for "
                  "the same call, timed in the same run. `triton`, `cute`: each backend forced (its tuned "
                  "best where tuned, `*`).", "",
                  "| shape | dtype | M | auto us | backend | heuristic us | heur / auto | triton us | cute us | TB/s | "
                  "TFLOP/s | floor us | % floor | cuBLAS fp8 us | x fp8 | cuBLAS bf16 us | x bf16 |",
                  "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in _best(auto):
            h = r.get("heuristic_us") if r.get("tuned") else r["us"]
            hs = f"{h:.1f} | {h / r['us']:.3f}" if h else "- | -"
            be = be_cols(r)
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['M']} | {r['us']:.1f}{'*' if r.get('tuned') else ''} | "
                         f"{r['backend']} | {hs} | {be[0]} | {be[1]} | " + tail(r))
    else:
        lines += ["Per point: each backend's config (`triton`, `cute` columns; `*`: tuned); the other "
                  "columns describe the faster of the two.", "",
                  "| shape | dtype | M | triton us | cute us | best us | TB/s | TFLOP/s | floor us | % floor | "
                  "cuBLAS fp8 us | x fp8 | cuBLAS bf16 us | x bf16 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in _best(records):
            be = be_cols(r)
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['M']} | {be[0]} | {be[1]} | {r['us']:.1f} | " + tail(r))
    heur = [r for r in records if r.get("tuned") and r.get("heuristic_us") and r.get("us")]
    if heur:
        lines += ["", "Tuned against the heuristic, per forced backend (`auto` above), same run:", "",
                  "| shape | dtype | M | requested | tuned us | heuristic us | heuristic / tuned |",
                  "|---|---|---:|---|---:|---:|---:|"]
        lines += [f"| {r['shape']} | {r['dtype']} | {r['M']} | {_requested(r)} | {r['us']:.1f} | "
                  f"{r['heuristic_us']:.1f} | {r['heuristic_us'] / r['us']:.3f} |"
                  for r in heur if _requested(r) != "auto"]
    failed = [r for r in records if r.get("us") is None]
    if failed:
        lines += ["", f"{len(failed)} runs failed or were wrong (see JSON `error`)."]
    return "\n".join(lines) + "\n"


def plot(meta: dict, records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _best(records)
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in rows if r["shape"] == shape]
        for dt, style in (("fp8", "-o"), ("bf16", "-s")):
            d = [r for r in rs if r["dtype"] == dt]
            if not d:
                continue
            ms = [r["M"] for r in d]
            ax.plot(ms, [r["us"] for r in d], style, label=f"densemoe {dt} (faster backend)")
            cu = sorted((r for r in records if r.get("us") and r.get("backend") == "cute"
                         and r["shape"] == shape and r["dtype"] == dt), key=lambda r: r["M"])
            if cu:
                ax.plot([r["M"] for r in cu], [r["us"] for r in cu], style[0] + "-.", alpha=0.6,
                        label=f"CuTe backend {dt}")
            ax.plot(ms, [r["floor_us"] for r in d], ":", label=f"floor {dt}")
        base = {r["M"]: r for r in rs}
        ms = sorted(base)
        ax.plot(ms, [base[m]["cublas_fp8_us"] or float("nan") for m in ms], "--", label="cuBLAS fp8 (alpha folded)")
        ax.plot(ms, [base[m]["cublas_bf16_us"] for m in ms], "--", label="cuBLAS bf16 (alpha folded)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("us")
        ax.set_title(f"FC2 {shape}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"densemoe FC2 on {meta['device']} ({meta['commit']})")
    fig.tight_layout()
    save_png(fig, path)


def save_png(fig, path) -> None:
    """Save ``fig`` as a 64-colour palette PNG (about a quarter of matplotlib's RGBA bytes: the
    committed plots travel with every device call, whose tree is capped at 64 MiB with the CuTe
    bundle). Pillow comes with matplotlib; without it, the plain PNG."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    try:
        from PIL import Image
    except ImportError:
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        return
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(colors=64).save(path, optimize=True)

