"""FC2 benchmark: our kernel against cuBLAS FP8 / bf16 and the measured floor, one process.

Protocol: results are checked against the fp32 reference before anything is timed; timings are
CUDA-graph replays with L2 flushed before each (Timer), median of many; the read ceiling and
GEMM peaks are measured in the same process. Baselines fold alpha into ``a`` first (not timed).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import torch

import densemoe
from densemoe.bench.common import FP8
from densemoe.timing import Timer
from densemoe.kernels.common import Fc2Problem
from densemoe.kernels.cute import fc2_sm90 as cute_fc2
from densemoe.kernels.triton.fc2 import Fc2TritonConfig, can_implement
from densemoe.ops import fc2_configs
from densemoe.ops.fc2 import which_backend
from densemoe.reference import fc2_ref
from densemoe.shapes import SHAPES

DTYPES = {"fp8": FP8, "bf16": torch.bfloat16}


def routing_alpha(M: int, E: int, topk: int, gen: torch.Generator) -> torch.Tensor:
    """alpha [M, E]: each token picks ``topk`` distinct experts uniformly at random, with
    softmax routing weights times a dequantisation-like scale; 0 elsewhere."""
    logits = torch.randn(M, E, generator=gen, device="cuda")
    ids = torch.rand(M, E, generator=gen, device="cuda").topk(min(topk, E), dim=1).indices
    wts = torch.softmax(logits.gather(1, ids), dim=1)
    wts *= 0.5 + torch.rand(M, 1, generator=gen, device="cuda")
    return torch.zeros(M, E, device="cuda").scatter_(1, ids, wts)


class Fc2Case:
    """Weights of one shape (both dtypes), allocated once; inputs per M."""

    def __init__(self, shape_name: str, dtypes, seed: int = 0):
        self.shape = SHAPES[shape_name]
        self.N, self.K = self.shape.fc2_nk
        self.E, self.I = self.shape.experts, self.shape.inter
        self.gen = torch.Generator(device="cuda").manual_seed(seed)
        w = torch.randn(self.N, self.K, generator=self.gen, device="cuda", dtype=torch.bfloat16)
        self.w = {"bf16": w}
        self.w["fp8"] = w.to(FP8)  # the bf16 copy is kept either way: cuBLAS bf16 needs it

    def inputs(self, M: int):
        a = torch.randn(M, self.K, generator=self.gen, device="cuda", dtype=torch.bfloat16)
        alpha = routing_alpha(M, self.E, self.shape.topk, self.gen)
        return {"bf16": a, "fp8": a.to(FP8)}, alpha

    def folded(self, a: torch.Tensor, alpha: torch.Tensor, dtype) -> torch.Tensor:
        M = a.shape[0]
        return (a.float().view(M, self.E, self.I) * alpha[:, :, None]).view(M, self.K).to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def cublas_fp8(case: Fc2Case, a_fold8: torch.Tensor):
    one = torch.ones((), device="cuda")
    w8 = case.w["fp8"]
    return lambda: torch._scaled_mm(a_fold8, w8.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def floor_us(N, K, M, E, dtype, out_bytes, ceiling_tb_s, peaks) -> float:
    es = 1 if dtype == "fp8" else 2
    nbytes = N * K * es + M * K * es + M * E * 4 + M * N * out_bytes
    return max(nbytes / ceiling_tb_s / 1e6, 2 * M * N * K / peaks[dtype] / 1e6), nbytes


def run(shapes, dtypes, ms, timer: Timer, ceiling: dict, peaks: dict, device: str, commit: str,
        configs=None, log=print, backends=("triton",)):
    """One record per (shape, dtype, M, backend, config). ``configs``: None = each backend's
    default config, else a callable (problem) -> list of Fc2TritonConfig to try (sweep)."""
    records = []
    for shape_name in shapes:
        case = Fc2Case(shape_name, dtypes)
        N, K, E = case.N, case.K, case.E
        for M in ms:
            a, alpha = case.inputs(M)
            base = {}
            a8 = case.folded(a["bf16"], alpha, FP8)
            try:
                base["cublas_fp8_us"] = timer(cublas_fp8(case, a8))["us"]
            except RuntimeError as exc:  # shapes cuBLAS FP8 refuses
                base["cublas_fp8_us"] = None
                log(f"  cuBLAS fp8 failed at M={M}: {exc}")
            a16 = case.folded(a["bf16"], alpha, torch.bfloat16)
            w16 = case.w["bf16"]
            base["cublas_bf16_us"] = timer(lambda: a16 @ w16.T)["us"]
            for dt in dtypes:
                problem = Fc2Problem(M, N, E, case.I, DTYPES[dt], torch.bfloat16)
                fl, nbytes = floor_us(N, K, M, E, dt, 2, ceiling["tb_s"], peaks)
                if configs is None:
                    cfgs = [(be, None) for be in backends]
                else:
                    cfgs = [("triton", c) for c in configs(problem)]
                ref = fc2_ref(a[dt], case.w[dt], alpha, torch.float32, compute_dtype=torch.float32)
                for be, cfg in cfgs:
                    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
                    try:
                        be_used, used, source = which_backend(a[dt], case.w[dt], alpha, out, cfg, be,
                                                              with_source=True)
                    except ValueError as exc:  # a forced backend that cannot run here
                        log(f"  SKIP {be} {shape_name} {dt} M={M}: {exc}")
                        continue
                    rec = dict(device=device, op="fc2", shape=shape_name, dtype=dt, M=M, N=N, K=K, E=E,
                               requested=be, backend=be_used, config=used.to_str(), tuned=source in ("cache", "shipped"),
                               config_source=source, commit=commit,
                               floor_us=fl, bytes=nbytes, **base)
                    fn = lambda: densemoe.fc2(a[dt], case.w[dt], alpha, out=out, config=cfg, backend=be)  # noqa: E731
                    t0 = time.time()
                    try:
                        fn()
                        torch.cuda.synchronize()
                    except Exception as exc:  # compile/launch failure: report, don't hide
                        rec.update(us=None, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                        records.append(rec)
                        log(f"  FAIL {shape_name} {dt} M={M} {used.to_str()}: {rec['error']}")
                        continue
                    rec["compile_s"] = time.time() - t0
                    err = rel_err(out, ref)
                    rec["rel_err"] = err
                    if not math.isfinite(err) or err > 1e-2:
                        rec.update(us=None, error=f"wrong result: rel err {err:.3e}")
                        records.append(rec)
                        log(f"  WRONG {shape_name} {dt} M={M} {used.to_str()}: {err:.3e}")
                        continue
                    hrec = None
                    if source in ("cache", "shipped"):  # tuned: the heuristic's choice, interleaved with it
                        hrec = _heuristic_fn(problem, a[dt], case.w[dt], alpha, out, be, ref)
                    if hrec is not None and "fn" in hrec:
                        tuned_t, heur_t = timer.compare([fn, hrec.pop("fn")], rounds=3)
                        rec.update(tuned_t)
                        hrec.update(heuristic_us=heur_t["us"], heuristic_us_rounds=heur_t["us_rounds"])
                    else:
                        rec.update(timer(fn))
                    us = rec["us"]
                    rec.update(tb_s=nbytes / us / 1e6, tflops=2 * M * N * K / us / 1e6,
                               pct_floor=100 * fl / us,
                               speedup_vs_cublas_fp8=(base["cublas_fp8_us"] / us) if base["cublas_fp8_us"] else None,
                               speedup_vs_cublas_bf16=base["cublas_bf16_us"] / us)
                    if hrec is not None:
                        rec.update(hrec)
                    records.append(rec)
                    log(fmt_row(rec))
            del a, alpha, a8, a16
        del case
        torch.cuda.empty_cache()
    return records


def _heuristic_fn(problem, a, w, alpha, out, backend, ref) -> dict:
    """The heuristic's choice for the same call, checked first: heuristic_config and ``fn`` to
    time, or heuristic_us None and heuristic_error when it is wrong."""
    cfg = fc2_configs.choose(problem, a.device, backend=backend, tuned=False,
                             cute_check=lambda: cute_fc2.runtime_ok(a, w, alpha, out)).config
    fn = lambda: densemoe.fc2(a, w, alpha, out=out, config=cfg)  # noqa: E731
    out.fill_(float("nan"))
    fn()
    err = rel_err(out, ref)
    if not math.isfinite(err) or err > 1e-2:
        return {"heuristic_config": cfg.to_str(), "heuristic_us": None, "heuristic_error": f"rel err {err:.3e}"}
    return {"heuristic_config": cfg.to_str(), "fn": fn}


HEADER = (f"{'shape':16} {'dt':4} {'M':>4} {'backend':7} {'us':>8} {'TB/s':>5} {'TFLOP/s':>7} {'floor':>7} {'%fl':>5} "
          f"{'cuBLAS8':>8} {'x8':>5} {'cuBLAS16':>8} {'x16':>5}  config")


def fmt_row(r: dict) -> str:
    x8 = f"{r['speedup_vs_cublas_fp8']:.2f}" if r.get("speedup_vs_cublas_fp8") else "  -"
    c8 = f"{r['cublas_fp8_us']:.1f}" if r.get("cublas_fp8_us") else "-"
    return (f"{r['shape']:16} {r['dtype']:4} {r['M']:>4} {r['backend']:7} {r['us']:8.1f} {r['tb_s']:5.2f} {r['tflops']:7.1f} "
            f"{r['floor_us']:7.1f} {r['pct_floor']:5.1f} {c8:>8} {x8:>5} {r['cublas_bf16_us']:8.1f} "
            f"{r['speedup_vs_cublas_bf16']:5.2f}  {r['config']}")


def _fit_stages(problem, c: Fc2TritonConfig, most: int = 8) -> Fc2TritonConfig | None:
    """c with the deepest load pipeline (<= most) that fits, or None."""
    for st in range(most, 1, -1):
        cand = dataclasses.replace(c, num_stages=st)
        if can_implement(problem, cand)[0]:
            return cand
    return None


def sweep_space(problem: Fc2Problem) -> list[Fc2TritonConfig]:
    """Configs to time for one problem (exploration; the autotuner's space grows from this)."""
    fp8 = problem.dtype == FP8
    bks = (256, 128) if fp8 else (128, 64)
    m = problem.m
    bm0 = max(16, 1 << (m - 1).bit_length())
    C = Fc2TritonConfig
    cands = []
    if m <= 128:
        for bn, bk, split in itertools.product((64, 128), bks, (0, 1, 2, 3, 4)):
            warps = 8 if bm0 * bn >= 128 * 128 else 4
            for cps in ((1, 2) if split == 0 else (1,)):
                cands.append(C(bm0, bn, bk, warps, 8, True, True, split, cps))
        cands.append(C(bm0, 64, bks[0], 4, 8, True, False, 1, 1))
    else:
        for bm, bn, bk, warps, split, cps in itertools.product((64, 128), (64, 128), bks, (4, 8), (0, 1, 2), (1, 2)):
            if warps == 8 and bm * bn < 128 * 128 or warps == 4 and bm * bn > 64 * 128:
                continue
            cands.append(C(bm, bn, bk, warps, 8, False, True, split, cps))
    out = []
    for c in cands:
        f = _fit_stages(problem, c)
        if f is not None and f not in out:
            out.append(f)
            g = _fit_stages(problem, c, f.num_stages - 1) if f.num_stages > 3 else None
            if g is not None and m <= 128:
                out.append(g)
    return out
