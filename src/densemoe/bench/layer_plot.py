"""The experts path of ``python -m densemoe.bench layer`` as a log-log plot (no GPU needed): us
against M, one panel per shape and dtype; a line per strategy (dense, skip, routed forced; the
chosen one, bold; fp8block panels also the routed path on the weights requantised per expert),
per baseline (dashed) and the routed floor (black, dotted). matplotlib is the
optional ``bench`` extra: ``plot_experts`` raises ImportError without it, and the caller skips
the plot."""

from __future__ import annotations

from densemoe.bench.report import save_png

STRATEGY_STYLES = {"dense": "-o", "skip": "-s", "routed": "-^", "chosen": "-D",
                   "routed_per_expert_fp8": "-v"}  # the last: fp8block records only (requantised per expert)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = sorted((r["M"], r[key]) for r in records if r.get(key))
    return [m for m, _ in pts], [t for _, t in pts]


def plot_experts(meta: dict, records: list[dict], path: str) -> bool:
    """Write the plot of the ``op="experts"`` records to ``path`` (.png); False (nothing
    written) when there are none."""
    rs = [r for r in records if r.get("op") == "experts"]
    if not rs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["shape"], r["dtype"]) for r in rs))
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 5 * rows), squeeze=False)
    for ax, (shape, dt) in zip(axes.flat, panels):
        sub = [r for r in rs if r["shape"] == shape and r["dtype"] == dt]
        for name, style in STRATEGY_STYLES.items():
            ms, us = _series(sub, f"{name}_us")
            if ms:
                bold = name == "chosen"
                ax.plot(ms, us, style, ms=4, lw=2.4 if bold else 1.2, alpha=1.0 if bold else 0.8,
                        label=f"densemoe {name}" + (" (the rule)" if bold else " (forced)"))
        for b in dict.fromkeys(b for r in sub for b in r.get("baselines", ())):
            ms, us = _series(sub, f"{b}_us")
            if ms:
                ax.plot(ms, us, "--x", ms=4, lw=1, label=b)
        ms, us = _series(sub, "routed_floor_us")
        ax.plot(ms, us, ":", color="black", lw=1.6, label="routed floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("us (CUDA graph, L2 flushed, median)")
        ax.set_title(f"experts path: {shape} {dt}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"densemoe experts path on {meta.get('device', '?')} ({meta.get('commit', '?')})")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return True
