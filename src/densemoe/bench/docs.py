"""docs/performance.md and the README's headline table, regenerated from the committed results.

``python -m densemoe.bench docs --out docs/performance.md`` reads the result files named in
``SOURCES`` (``bench/results/*.json[.gz]``, written by ``python -m densemoe.bench ... --out``) and
writes the markdown: the tables, a paragraph per table from the run's ``meta`` (device, date,
commit, command, read ceiling) and the reading of the numbers ("Where it stands"), every figure
in it computed from the records. No GPU needed. ``tests/test_docs.py`` regenerates both and
compares them with the committed ``docs/performance.md`` and ``README.md``, so neither can drift
from the results.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from densemoe.bench.report import _best, _requested

# The runs the documents quote: one file per table family (paths relative to the repository root).
SOURCES = {
    "fc2": "bench/results/fc2_h100_2026-11-26_tp8_final.json.gz",
    "layer": "bench/results/layer_h100_2026-11-26_streamk.json.gz",
    "fc1": "bench/results/fc1_h100_2026-11-26.json.gz",
    "skip": "bench/results/skip_h100_2026-11-26_streamk.json.gz",
}
CHART = "bench/results/fc2_h100_2026-11-26_tp8_final.png"
# The README's H200 table: the experts path (the layer benchmark, fp8), the nineteenth session's two
# runs per shape on the same tree: `19b` (M = 1-128, after the strategy retune) and `19a` (M = 16-4096,
# after the routed retune); a point takes the first file that has it (``load_first``).
H200_SOURCES = {
    "deepseek-v3-tp8": ("bench/results/layer_h200_2026-12-06_session19b_deepseek-v3-tp8_fp8.json.gz",
                        "bench/results/layer_h200_2026-12-06_session19a_deepseek-v3-tp8_fp8.json.gz"),
    "qwen3-30b-a3b": ("bench/results/layer_h200_2026-12-06_session19b_qwen3-30b-a3b_fp8.json.gz",
                      "bench/results/layer_h200_2026-12-06_session19a_qwen3-30b-a3b_fp8.json.gz"),
}
H200_MS = (1, 16, 64, 128, 512, 1024, 4096)
# The README's H100 experts-path table: the current H100 tables (fp8, retuned in the fifteenth
# session; M = 16-4096), one file per shape.
H100_SOURCES = {
    "deepseek-v3-tp8": "bench/results/layer_h100_2026-12-06_session15_deepseek-v3-tp8_fp8.json.gz",
    "qwen3-30b-a3b": "bench/results/layer_h100_2026-12-06_session15_qwen3-30b-a3b_fp8.json.gz",
}
# vLLM's tuned 128 x 128 block-fp8 fused-MoE pipeline on an H200, experts path, uniform top-8:
# issue 19's table (measured in another process, on another routing draw).
VLLM_BLOCK_FP8_H200_US = {
    "deepseek-v3-tp8": {1: 59.1, 4: 87.4, 16: 181.4, 64: 351.9, 128: 402.6, 256: 426.5, 512: 514.9, 1024: 619.1,
                        4096: 1390.2},
    "qwen3-30b-a3b": {1: 40.5, 4: 60.0, 16: 121.8, 64: 177.7, 128: 182.5, 512: 228.6, 4096: 889.9},
}
HEADLINE_MS = (1, 64, 512)  # the README's table: the fp8 layer at these token counts, both shapes
SHAPE_NAMES = {"deepseek-v3-tp8": "DeepSeek-V3 TP8", "qwen3-30b-a3b": "Qwen3-30B-A3B",
               "deepseek-v3-tp4": "DeepSeek-V3 TP4", "mixtral-8x7b-tp2": "Mixtral-8x7B TP2"}
# Nsight Compute, the one-op graph's launch and the targets: measured by probes, not by
# the runs above (their files are named where quoted).
EMPTY_GRAPH_US = 3.3  # an empty kernel as a one-op graph (bench/results/skip_probes_h100_2026-11-26.md)


def load(path: str | Path) -> dict:
    """A result file (``{"meta": ..., "records": [...]}``), plain or gzipped JSON."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def load_first(paths, root: str | Path = ".") -> dict:
    """Several result files of one table as one: a record per (op, dtype, M), from the first file
    that has it; ``meta`` is the first file's, ``metas`` every file's in order."""
    files = [load(Path(root) / p) for p in paths]
    seen, records = set(), []
    for d in files:
        for r in d["records"]:
            key = (r.get("op"), r.get("dtype"), r.get("M"))
            if key not in seen:
                seen.add(key)
                records.append(r)
    records.sort(key=lambda r: (str(r.get("op")), str(r.get("dtype")), r.get("M") or 0))
    return {"meta": files[0]["meta"], "metas": [d["meta"] for d in files], "records": records}


def load_all(root: str | Path = ".") -> dict[str, dict]:
    return {name: load(Path(root) / rel) for name, rel in SOURCES.items()}


# ---------------------------------------------------------------------------------------- helpers

def _f(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _span(values, spec: str = ".2f", unit: str = "") -> str:
    """'a-b' (or 'a' when equal) over the values, formatted with ``spec``."""
    lo, hi = format(min(values), spec), format(max(values), spec)
    return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"


def _date(meta: dict) -> str:
    return meta["date"].split(" ")[0]


def _versions(meta: dict) -> str:
    cute = f", CuTe DSL {meta['cutlass_dsl']}" if meta.get("cutlass_dsl") else ""
    return f"torch {meta['torch']}, Triton {meta['triton']}{cute}, Python {meta['python']}"


def _run_note(meta: dict, rel: str) -> str:
    """The paragraph every table carries: device, date, commit, versions, read ceiling, command."""
    return (f"Measured on an {meta['device']} on {_date(meta)} at commit `{meta['commit']}` "
            f"({_versions(meta)}); read ceiling measured in the same run "
            f"{meta['read_ceiling_tb_s']:.2f} TB/s, cuBLAS GEMM peaks fp8 {meta['peak_tflops']['fp8']:.0f} / "
            f"bf16 {meta['peak_tflops']['bf16']:.0f} TFLOP/s. Source: [`{rel}`](../{rel}) "
            f"(full table: [`{rel.split('.json')[0]}.md`](../{rel.split('.json')[0]}.md)). "
            f"Command: `{meta['command']}`.")


def _name(shape: str) -> str:
    return SHAPE_NAMES.get(shape, shape)


# -------------------------------------------------------------------------------------------- FC2

def fc2_rows(data: dict) -> list[dict]:
    """Per (dtype, M): what ``densemoe.fc2`` runs with no config (``auto``), next to its heuristic's
    time and each backend forced."""
    recs = data["records"]
    forced = {}
    for r in recs:
        if r.get("us") is not None and _requested(r) in ("triton", "cute"):
            k = (r["shape"], r["dtype"], r["M"], r["backend"])
            forced[k] = min(forced.get(k, r["us"]), r["us"])
    rows = []
    for r in _best([r for r in recs if _requested(r) == "auto"]):
        k = (r["shape"], r["dtype"], r["M"])
        heur = r["heuristic_us"] if r.get("tuned") else r["us"]
        rows.append(dict(r, heur=heur, triton=forced.get(k + ("triton",)), cute=forced.get(k + ("cute",))))
    return rows


def fc2_table(data: dict) -> str:
    lines = ["| dtype | M | auto us | backend | config from | heuristic us | heuristic / auto | triton us | cute us "
             "| TB/s | % floor | cuBLAS fp8 us | x cuBLAS fp8 | cuBLAS bf16 us | x cuBLAS bf16 |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in fc2_rows(data):
        lines.append(f"| {r['dtype']} | {r['M']} | {r['us']:.1f} | {r['backend']} | {r['config_source']} | "
                     f"{r['heur']:.1f} | {r['heur'] / r['us']:.3f} | {_f(r['triton'])} | {_f(r['cute'])} | "
                     f"{r['tb_s']:.2f} | {r['pct_floor']:.1f} | {r['cublas_fp8_us']:.1f} | "
                     f"{r['speedup_vs_cublas_fp8']:.2f} | {r['cublas_bf16_us']:.1f} | "
                     f"{r['speedup_vs_cublas_bf16']:.2f} |")
    return "\n".join(lines)


def fc2_reading(data: dict) -> list[str]:
    rows = fc2_rows(data)
    fp8 = [r for r in rows if r["dtype"] == "fp8"]
    bf16 = [r for r in rows if r["dtype"] == "bf16"]
    dec8 = [r for r in fp8 if r["M"] <= 16]
    dec16 = [r for r in bf16 if r["M"] <= 16]
    out = [f"- **Decode (M ≤ 16).** Bandwidth-bound: fp8 runs at {_span([r['pct_floor'] for r in dec8], '.0f')}% "
           f"of its floor (the measured read ceiling) and bf16 at {_span([r['pct_floor'] for r in dec16], '.0f')}%. "
           f"fp8 is {_span([r['speedup_vs_cublas_fp8'] for r in dec8])}x cuBLAS FP8, which does not even apply "
           f"alpha; bf16 is {_span([r['speedup_vs_cublas_bf16'] for r in dec16])}x cuBLAS bf16."]
    win = [r for r in bf16 if r["speedup_vs_cublas_bf16"] >= 1]
    lose = [r for r in bf16 if r["speedup_vs_cublas_bf16"] < 1]
    if win and lose:
        out.append(f"- **bf16.** At or above cuBLAS bf16 up to M = {max(r['M'] for r in win)} "
                   f"({_span([r['speedup_vs_cublas_bf16'] for r in win])}x); from M = {min(r['M'] for r in lose)} "
                   f"{_span([r['speedup_vs_cublas_bf16'] for r in lose])}x.")
    big = [r for r in fp8 if r["M"] >= 32]
    slow = [r for r in big if round(r["speedup_vs_cublas_fp8"], 2) < 1]
    level = [r for r in big if round(r["speedup_vs_cublas_fp8"], 2) == 1]
    fast = [r for r in big if round(r["speedup_vs_cublas_fp8"], 2) > 1]
    parts = sorted([(r["M"], f"M = {r['M']} ({r['speedup_vs_cublas_fp8']:.2f}x)") for r in fast]
                   + [(r["M"], f"M = {r['M']} (level)") for r in level])
    parts = [p for _, p in parts]
    out.append(f"- **fp8 from M = 32.** Slower than cuBLAS FP8 ({_span([r['speedup_vs_cublas_fp8'] for r in slow])}x)"
               + (", except " + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])
                  if parts else "") + ".")
    worst = max(rows, key=lambda r: r["heur"] / r["us"])
    out.append(f"- **Tuning.** The shipped tuned tables change little against the heuristic (now derived from "
               f"the tuner's picks): at most {100 * (worst['heur'] / worst['us'] - 1):.0f}% "
               f"({worst['dtype']} M = {worst['M']}) in this run.")
    firsts = []
    for dt, rs in (("fp8", fp8), ("bf16", bf16)):
        cute = [r["M"] for r in rs if r["backend"] == "cute"]
        if cute:
            firsts.append(f"{dt} from M = {min(cute)}")
    out.append("- **CuTe backend** (TMA ring, warp-specialised wgmma, stream-K over experts, multicast clusters, "
               "tokens as wgmma M with a lockstep expert order): what `auto` runs at large M, "
               + " and ".join(firsts) + " here.")
    return out


# ------------------------------------------------------------------------------------------ layer

def layer_rows(data: dict, dtype: str = "fp8", op: str = "layer") -> list[dict]:
    return [r for r in _best([r for r in data["records"] if r["op"] == op]) if r["dtype"] == dtype]


def layer_table(data: dict, dtype: str = "fp8") -> str:
    err = dtype == "fp8"
    lines = ["| shape | M | active experts | densemoe us | floor us | cuBLAS fp8 pipeline us | x cuBLAS | "
             "HF grouped_mm bf16 us | x grouped_mm | HF batched_mm bf16 us | x batched_mm | rel err |"
             + (" err / torch fp8 |" if err else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if err else "")]
    for r in layer_rows(data, dtype):
        lines.append(f"| {r['shape']} | {r['M']} | {r['active_experts']} | {r['us']:.1f} | {r['floor_us']:.1f} | "
                     f"{r['cublas_fp8_pipeline_us']:.1f} | {r['speedup_vs_cublas_fp8_pipeline']:.2f} | "
                     f"{r['hf_grouped_mm_bf16_us']:.1f} | {r['speedup_vs_hf_grouped_mm_bf16']:.2f} | "
                     f"{r['hf_batched_mm_bf16_us']:.1f} | {r['speedup_vs_hf_batched_mm_bf16']:.2f} | "
                     f"{r['rel_err']:.2e} |" + (f" {r['err_ratio_vs_torch_fp8']:.3f} |" if err else ""))
    return "\n".join(lines)


def headline_table(data: dict, ms=HEADLINE_MS) -> str:
    """The README's one table: the fp8 layer against the cuBLAS fp8 pipeline and transformers'
    ``grouped_mm`` at a few token counts, both shapes."""
    lines = ["| model (per GPU) | tokens M | densemoe fp8 us | cuBLAS fp8 pipeline us | speedup | "
             "transformers grouped_mm bf16 us | speedup |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in layer_rows(data, "fp8"):
        if r["M"] in ms:
            lines.append(f"| {_name(r['shape'])} | {r['M']} | {r['us']:.1f} | {r['cublas_fp8_pipeline_us']:.1f} | "
                         f"{r['speedup_vs_cublas_fp8_pipeline']:.1f}x | {r['hf_grouped_mm_bf16_us']:.1f} | "
                         f"{r['speedup_vs_hf_grouped_mm_bf16']:.1f}x |")
    return "\n".join(lines)


def h200_table(data: dict[str, dict], ms=H200_MS) -> str:
    """The README's H200 table: per shape (``data``: shape -> result file of the layer benchmark)
    the fp8 experts path with the rule's strategy, its multiple of the routed floor, vLLM's
    block-fp8 figure (``VLLM_BLOCK_FP8_H200_US``), cuBLAS's fp8 pipeline and transformers'
    ``grouped_mm`` from the same run."""
    lines = ["| model (per GPU) | tokens M | strategy | densemoe fp8 us | x routed floor | vLLM block fp8 us | "
             "speedup | cuBLAS fp8 pipeline us | speedup | transformers grouped_mm bf16 us | speedup |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape, d in data.items():
        for r in d["records"]:
            if r.get("op") != "experts" or r.get("dtype") != "fp8" or r["M"] not in ms:
                continue
            c, v = r["chosen_us"], VLLM_BLOCK_FP8_H200_US.get(shape, {}).get(r["M"])
            cb, hf = r["cublas_fp8_pipeline_us"], r["hf_grouped_mm_bf16_us"]
            lines.append(f"| {_name(shape)} | {r['M']} | {r['chosen']} | {c:.1f} | {c / r['routed_floor_us']:.2f} | "
                         f"{v if v else '-'} | {f'{v / c:.2f}x' if v else '-'} | {cb:.1f} | {cb / c:.1f}x | "
                         f"{hf:.1f} | {hf / c:.1f}x |")
    return "\n".join(lines)


def h100_table(data: dict[str, dict]) -> str:
    """The README's H100 experts-path table: per shape (``data``: shape -> result file of the
    layer benchmark) the fp8 experts path with the rule's strategy, its multiple of the routed
    floor, and from the same run cuBLAS's fp8 pipeline, transformers' ``grouped_mm`` and the
    routed pipeline on torch's grouped GEMMs, each with our speedup over it."""
    lines = ["| model (per GPU) | tokens M | strategy | densemoe fp8 us | x routed floor | cuBLAS fp8 pipeline us | "
             "speedup | transformers grouped_mm bf16 us | speedup | torch grouped GEMMs us | speedup |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape, d in data.items():
        for r in d["records"]:
            if r.get("op") != "experts" or r.get("dtype") != "fp8":
                continue
            c, cb = r["chosen_us"], r["cublas_fp8_pipeline_us"]
            hf, tg = r["hf_grouped_mm_bf16_us"], r["torch_grouped_us"]
            lines.append(f"| {_name(shape)} | {r['M']} | {r['chosen']} | {c:.1f} | {c / r['routed_floor_us']:.2f} | "
                         f"{cb:.1f} | {cb / c:.1f}x | {hf:.1f} | {hf / c:.1f}x | {tg:.1f} | {tg / c:.1f}x |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- FC1

def fc1_table(data: dict, dtype: str = "fp8") -> str:
    lines = ["| shape | M | us | backend | % floor | cuBLAS fp8 GEMM us | x cuBLAS | cuBLAS % floor | "
             "FC1 + quantisation us | x cuBLAS, with quantisation |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in layer_rows(data, dtype, op="fc1"):
        be = r["backend"] + (" (persistent)" if "persistent=0" not in r.get("config", "persistent=0") else "")
        q = r.get("separate_quant_us")
        lines.append(f"| {r['shape']} | {r['M']} | {r['us']:.1f} | {be} | {r['pct_floor']:.1f} | "
                     f"{r['cublas_fp8_us']:.1f} | {r['speedup_vs_cublas_fp8']:.2f} | "
                     f"{100 * r['floor_us'] / r['cublas_fp8_us']:.1f} | {_f(q)} | "
                     f"{_f(r['cublas_fp8_us'] / q if q else None, '.2f')} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- the layer's reading

def layer_reading(layer: dict, fc1: dict, skip: dict) -> list[str]:
    rows = layer_rows(layer, "fp8")
    by = {}
    for r in rows:
        by.setdefault(r["shape"], []).append(r)
    cub = "; ".join(f"{_span([r['speedup_vs_cublas_fp8_pipeline'] for r in rs])}x on {_name(s)}"
                    for s, rs in by.items())
    out = [f"- **The layer, fp8.** Against the same fp8 pipeline through cuBLAS: {cub}, with the same error "
           f"({_span([r['err_ratio_vs_torch_fp8'] for r in rows], '.3f')}x the pipeline's); "
           f"{_span([r['speedup_vs_hf_grouped_mm_bf16'] for r in rows])}x transformers' `grouped_mm` (bf16) "
           f"at every M from {min(r['M'] for r in rows)} to {max(r['M'] for r in rows)}."]
    tp8 = {r["M"]: r for r in by.get("deepseek-v3-tp8", [])}
    qw = {r["M"]: r for r in by.get("qwen3-30b-a3b", [])}
    lay_u = {r["M"]: r for r in skip["records"] if r["op"] == "layer" and r["routing"] == "uniform"}
    if 1 in tp8 and 8 in tp8 and 1 in lay_u and 8 in lay_u:
        m1, m8 = tp8[1], tp8[8]
        out.append(
            f"- **Small M, with expert skipping.** The TP8 layer takes {m1['us']:.1f} us at M = 1 "
            f"({m1['active_experts']} experts picked; floor {m1['floor_us']:.1f} us) and {m8['us']:.1f} us at "
            f"M = 8" + (f" ({qw[1]['us']:.1f} us at M = 1 on Qwen3-30B-A3B)" if 1 in qw else "") + ". These "
            f"times, like every baseline's, include the launch of a one-op CUDA graph (an empty kernel: "
            f"{EMPTY_GRAPH_US} us, `bench/results/skip_probes_h100_2026-11-26.md`). Inside a graph behind other "
            f"work, as in a serving engine's graph of a whole step, the layer takes {lay_u[1]['us_in_graph']:.1f} us "
            f"at M = 1 (the skipping run below, `in graph`). Issue 6 asks for {lay_u[1]['target_us']:.0f} and "
            f"{lay_u[8]['target_us']:.0f} us: at M = 8 the {lay_u[8]['active_experts']} picked experts' bytes "
            f"alone take {lay_u[8]['floor_us']:.1f} us at the read ceiling ([skipping.md](skipping.md)).")
    f = {r["M"]: r for r in layer_rows(fc1, "fp8", op="fc1") if r["shape"] == "deepseek-v3-tp8"}
    if f:
        small = [r for m, r in f.items() if m <= 32]
        mid = [r for m, r in f.items() if 64 <= m <= 128]
        behind = sorted(m for m, r in f.items() if r["speedup_vs_cublas_fp8"] < 1)
        # the longest run of token counts from the smallest where ours is ahead
        lead = [m for m in sorted(f) if all(f[x]["speedup_vs_cublas_fp8"] >= 1 for x in f if x <= m)]
        q_ahead = [m for m in sorted(f) if all(f[x].get("separate_quant_us") and
                                               f[x]["separate_quant_us"] < f[x]["cublas_fp8_us"] for x in f if x <= m)]
        text = (f"- **FC1 (TP8 fp8).** {_span([r['pct_floor'] for r in small], '.0f')}% of its floor up to M = 32 "
                f"and faster than cuBLAS's bare FP8 GEMM from M = 1 to {max(lead)}; "
                f"{_span([r['pct_floor'] for r in mid], '.1f')}% of the floor at M = 64-128 (cuBLAS: "
                f"{_span([100 * r['floor_us'] / r['cublas_fp8_us'] for r in mid], '.1f')}%); behind cuBLAS at "
                + ", ".join(f"M = {m} ({100 * (1 - f[m]['speedup_vs_cublas_fp8']):.1f}%)" for m in behind) + ".")
        if q_ahead:
            nxt = min((m for m in f if m > max(q_ahead)), default=None)
            text += (f" With its output quantised for FC2 counted (FC1 + `quantize_y_fold_alpha`, the form the "
                     f"layer runs), still faster than cuBLAS's bare GEMM from M = 1 to {max(q_ahead)}"
                     + (f" (M = {nxt}: {f[nxt]['separate_quant_us']:.1f} against {f[nxt]['cublas_fp8_us']:.1f} us)"
                        if nxt else "") + ".")
        text += (" Nsight Compute at M = 128: 2.87 TB/s of DRAM traffic (cuBLAS 2.82), SM clock 1.74 GHz; all-zero "
                 "weights change nothing up to M = 128, so power is not the limit there "
                 "(`bench/results/ncu_fc1_M128_h100_2026-11-26.txt`, [layer.md](layer.md)).")
        out.append(text)
    return out


# ------------------------------------------------------------------------------------------ skipping

def skip_tables(data: dict) -> tuple[str, str]:
    """(uniform, skewed): per M, FC1, FC2 and the layer with skipping, their targets and the dense layer."""
    recs = [r for r in data["records"] if r.get("us")]
    get = {(r["op"], r["routing"], r["M"]): r for r in recs}
    ms = sorted({r["M"] for r in recs})
    uni = ["| M | active (FC1, FC2) | active (layer) | FC1 | FC1 in graph | FC1 (layer call) in graph | "
           "FC1 target | FC2 | FC2 in graph | FC2 target | layer | layer in graph | layer target | layer dense |",
           "|---:|" * 1 + "---:|" * 13]
    skw = ["| M | active (FC1, FC2) | active (layer) | FC1 | FC1 in graph | FC1 target | FC2 | FC2 in graph | "
           "FC2 target | layer | layer in graph | layer dense |",
           "|---:|" * 1 + "---:|" * 11]
    for m in ms:
        f1, f2, la = (get.get((op, "uniform", m)) for op in ("fc1", "fc2", "layer"))
        if f1 and f2 and la:
            uni.append(f"| {m} | {f1['active_experts']} | {la['active_experts']} | {f1['us']:.1f} | "
                       f"{_f(f1.get('us_in_graph'))} | {_f(f1.get('layer_call_us_in_graph'))} | "
                       f"{_f(f1.get('target_us'))} | {f2['us']:.1f} | {_f(f2.get('us_in_graph'))} | "
                       f"{_f(f2.get('target_us'))} | {la['us']:.1f} | {_f(la.get('us_in_graph'))} | "
                       f"{_f(la.get('target_us'))} | {la['dense_us']:.1f} |")
        f1, f2, la = (get.get((op, "skewed", m)) for op in ("fc1", "fc2", "layer"))
        if f1 and f2 and la:
            skw.append(f"| {m} | {f1['active_experts']} | {la['active_experts']} | {f1['us']:.1f} | "
                       f"{_f(f1.get('us_in_graph'))} | {_f(f1.get('target_us'))} | {f2['us']:.1f} | "
                       f"{_f(f2.get('us_in_graph'))} | {_f(f2.get('target_us'))} | {la['us']:.1f} | "
                       f"{_f(la.get('us_in_graph'))} | {la['dense_us']:.1f} |")
    return "\n".join(uni), "\n".join(skw)


# ------------------------------------------------------------------------------------------ the page

def performance_md(root: str | Path = ".") -> str:
    d = load_all(root)
    fc2, layer, fc1, skip = d["fc2"], d["layer"], d["fc1"], d["skip"]
    uni, skw = skip_tables(skip)
    devices = sorted({x["meta"]["device"] for x in d.values()})
    dates = sorted({_date(x["meta"]) for x in d.values()})
    L = [
        "# Performance",
        "",
        "<!-- Generated by `python -m densemoe.bench docs --out docs/performance.md` (src/densemoe/bench/docs.py) "
        "from the committed results in bench/results/. Do not edit by hand: tests/test_docs.py regenerates it. -->",
        "",
        f"Every number here was measured on one {' / '.join(devices)} ({', '.join(dates)}) and is read from the "
        "committed result files named under each table; the README's headline table comes from the same files. "
        "The H200 results of 2026-12-05 (the routed path untuned in fp8, bf16 and block fp8; its tuned tiles and "
        "the strategy crossovers in all three: "
        "`bench/results/layer_h200_2026-12-05_*`, `tune_h200_2026-12-05_*`) are summarised in "
        "[routed-journal.md](routed-journal.md#first-h200-measurements-2026-12-05-and-the-plan), not here.",
        "",
        "**How it is timed** (`src/densemoe/bench/`, `src/densemoe/timing.py`). Every result is checked against "
        "an fp32 reference first. Times are CUDA-graph replays with the L2 flushed (by a read) before each, "
        "median of `--reps`; before each timing the timer reads 256 MB `--settle` times for the clocks to settle "
        "after the line before (100; 1000 for the layer benchmark since 2026-12-05, where the routed line "
        "right after the dense one read 2.4% slow at M = 4096 with 100: "
        "[routed-journal.md](routed-journal.md#eighth-session-2026-12-05-fc1s-tails-the-timing-position-profiles)). "
        "FC1, the layer and skipping time ours and the baselines in three interleaved rounds "
        "(median of the round medians); FC2 interleaves the tuned config with the heuristic's and times cuBLAS "
        "in the same process. The read ceiling (a streaming read) and the cuBLAS GEMM peaks are "
        "measured in the same run. Floor = max(bytes / read ceiling, FLOPs / peak). `us` is the op alone in a "
        "one-op CUDA graph, the graph's launch included; `in graph` (skipping) is the op inside one graph right "
        "behind the flush, as inside a serving engine's graph of a whole step.",
        "",
        "**To measure again** (a CUDA GPU): `python -m densemoe.bench {fc2,fc1,layer,skip} --out "
        "bench/results/<name>` writes `<name>.json` and `<name>.md` (`--plot`, with the `[bench]` extra's "
        "matplotlib, draws FC2's chart); `bash bench/run_h100.sh`, `bench/layer_h100.sh` and "
        "`bench/final_h100.sh` are the device calls that made these files. To regenerate this page after a new "
        "run, point `SOURCES` in `src/densemoe/bench/docs.py` at it and run "
        "`python -m densemoe.bench docs --out docs/performance.md` (no GPU).",
        "",
        "- [FC2, DeepSeek-V3 TP8, fp8 and bf16](#fc2-deepseek-v3-tp8-fp8-and-bf16)",
        "- [The whole layer, fp8](#the-whole-layer-fp8)",
        "- [The whole layer, bf16](#the-whole-layer-bf16)",
        "- [FC1, fp8](#fc1-fp8)",
        "- [Where the layer and FC1 stand](#where-the-layer-and-fc1-stand)",
        "- [Expert skipping, DeepSeek-V3 TP8 fp8](#expert-skipping-deepseek-v3-tp8-fp8)",
        "- [Other result files](#other-result-files)",
        "",
        "## FC2, DeepSeek-V3 TP8, fp8 and bf16",
        "",
        "FC2 (the down projection, N = 7168, K = E·I = 256·256 = 65536) as `densemoe.fc2` runs it with no config "
        "(`auto`: here every point takes the tuned table shipped with the package, `config from` = shipped), "
        "next to the heuristic's own choice for the same call (what runs without tables, `DENSEMOE_TUNED=0`, "
        "timed interleaved with it) and each backend forced with its tuned best (`triton`, `cute`). `TB/s`, "
        "`% floor` and the cuBLAS ratios are for `auto`. cuBLAS FP8 (`torch._scaled_mm`) and bf16 get alpha "
        "folded into `a` beforehand (the fold not timed) and apply no alpha.",
        "",
        _run_note(fc2["meta"], SOURCES["fc2"]),
        "",
        fc2_table(fc2),
        "",
        f"![FC2 on the H100, DeepSeek-V3 TP8](../{CHART})",
        "",
        "Where FC2 stands:",
        "",
        *fc2_reading(fc2),
        "",
        "The profiles behind these and what is next: [fc2-triton.md](fc2-triton.md), [fc2-cute.md](fc2-cute.md), "
        "[tuning.md](tuning.md). The same run on three shapes (DeepSeek-V3 TP8 and TP4, Qwen3-30B-A3B) at the "
        "commit before: [`bench/results/fc2_h100_2026-11-26_tuned.md`](../bench/results/fc2_h100_2026-11-26_tuned.md).",
        "",
        "## The whole layer, fp8",
        "",
        "Layer = router + FC1 + FC2 (`DenseMoE.forward`: the fused Triton router, FC1 with SwiGLU, the fp8 "
        "quantisation of its output, FC2; expert skipping where the default rule takes it). Baselines, each "
        "routed by the same gate in torch ops: the same fp8 pipeline through cuBLAS (`_scaled_mm` for both "
        "GEMMs, SwiGLU and quantisation in torch) and transformers' `Qwen3MoeExperts` in bf16 under its "
        "`grouped_mm` and `batched_mm` implementations. Floor: the bytes of the experts the routing picked "
        "(`active experts`, the union over the M tokens), x and out, over the read ceiling. `rel err`: against "
        "an fp32 reference; `err / torch fp8`: over the cuBLAS fp8 pipeline's (the issue bounds it by 1.5).",
        "",
        _run_note(layer["meta"], SOURCES["layer"]),
        "",
        layer_table(layer, "fp8"),
        "",
        "## The whole layer, bf16",
        "",
        "The same run, the layer on bf16 weights (bf16 FC1 and FC2; no quantisation).",
        "",
        layer_table(layer, "bf16"),
        "",
        "## FC1, fp8",
        "",
        "FC1 (gate and up with SwiGLU fused, bf16 out) against cuBLAS's *bare* FP8 GEMM of the same shape, "
        "which does no activation (DeepSeek-V3 TP8: N = 2·E·I = 131072, K = 7168, 940 MB of fp8 weights). "
        "`FC1 + quantisation` is FC1 writing bf16 plus the separate kernel that quantises it for FC2 "
        "(`quantize_y_fold_alpha`), the form the layer runs, timed in the same rounds. `persistent`: the tuned "
        "config runs one persistent program per SM.",
        "",
        _run_note(fc1["meta"], SOURCES["fc1"]),
        "",
        fc1_table(fc1, "fp8"),
        "",
        "## Where the layer and FC1 stand",
        "",
        *layer_reading(layer, fc1, skip),
        "",
        "## Expert skipping, DeepSeek-V3 TP8 fp8",
        "",
        "`python -m densemoe.bench skip`: FC1, FC2 and the layer with expert skipping (each token tile reads only "
        "the experts its tokens picked; [skipping.md](skipping.md)), each against the same call on the dense "
        "path (`layer dense`), uniform top-8 routing and skewed routing (~70% of the picks on 16 hot experts). "
        "Target: FC1 / FC2 1.15 x floor + 5 us, where the floor is the bytes of the picked experts over the read "
        "ceiling; the layer 35 us at M = 1 and 90 us at M = 8 (issue 6). `FC1 (layer call)`: FC1 as the layer "
        "calls it (`fill_unpicked=False`, and at M = 1 the router's top-k ids as its expert list). All times "
        "in us.",
        "",
        _run_note(skip["meta"], SOURCES["skip"]),
        "",
        "Uniform top-8:",
        "",
        uni,
        "",
        "Skewed:",
        "",
        skw,
        "",
        "The reading of these, what was tried and how close the M = 1 targets are to the hardware: "
        "[skipping.md](skipping.md).",
        "",
        "## Other result files",
        "",
        "`bench/results/` holds every committed run (JSON, `.json.gz`, and the markdown its writer made); "
        "the [index of docs/](README.md) lists them by topic. The design notes quote the probes' and "
        "the tuner's results where they are discussed.",
        "",
    ]
    return "\n".join(L)


def write(out: str | Path, root: str | Path = ".") -> str:
    text = performance_md(root)
    Path(out).write_text(text)
    return text


__all__ = ["SOURCES", "CHART", "load", "load_all", "fc2_table", "layer_table", "headline_table",
           "fc1_table", "skip_tables", "performance_md", "write"]
