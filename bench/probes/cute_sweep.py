"""CuTe FC2 backend exploration on the GPU: correctness of each variant first (ragged M, forced
splits, clusters, both dtypes), then timing of a config grid against Triton's default and cuBLAS
in one process. Usage: python bench/probes/cute_sweep.py [--quick] [--m 1,16,...] --out DIR
"""

import argparse
import dataclasses
import json
import math
import sys
import time

import torch

import densemoe
from densemoe import Fc2CuteConfig
from densemoe.bench.common import FP8, read_ceiling, peak_tflops
from densemoe.timing import Timer
from densemoe.bench.fc2 import Fc2Case, cublas_fp8, floor_us, rel_err
from densemoe.kernels.cute.fc2_sm90 import can_implement
from densemoe.kernels.common import Fc2Problem
from densemoe.ops.fc2_configs import default_cute_config
from densemoe.reference import fc2_ref

p = argparse.ArgumentParser()
p.add_argument("--m", default="1,16,32,64,96,128,192,256,384,512")
p.add_argument("--dtypes", default="fp8")
p.add_argument("--shape", default="deepseek-v3-tp8")
p.add_argument("--reps", type=int, default=30)
p.add_argument("--check-only", action="store_true")
p.add_argument("--skip-check", action="store_true")
p.add_argument("--space", default="swap", choices=("swap", "noswap", "clusters"),
               help="swap: the swap-AB grid; noswap: tokens as wgmma M (plus the CuTe default)")
p.add_argument("--out", default=".")
args = p.parse_args()
C = Fc2CuteConfig
DT = {"fp8": FP8, "bf16": torch.bfloat16}
log = lambda *a: print(*a, flush=True)  # noqa: E731

# ---------------------------------------------------------------- correctness of the variants
if not args.skip_check:
    gen = torch.Generator(device="cuda").manual_seed(1)
    checks = []
    for dt, (N, E, I) in [("fp8", (7168, 256, 256)), ("bf16", (7168, 256, 256)), ("fp8", (2048, 128, 768)),
                          ("fp8", (200, 6, 128))]:
        K = E * I
        w = (torch.randn(N, K, generator=gen, device="cuda") * 0.5).to(DT[dt])
        tk = 128 // DT[dt].itemsize
        for M in (1, 7, 100, 300):
            a = torch.randn(M, K, generator=gen, device="cuda").to(DT[dt])
            alpha = torch.rand(M, E, generator=gen, device="cuda") * (torch.rand(M, E, generator=gen, device="cuda") < 0.1)
            alpha[:, 0] = -0.7
            ref = fc2_ref(a, w, alpha, torch.float64).float()
            cfgs = [C(128, 16, tk), C(128, 16, 2 * tk, cluster_n=2), C(128, 64, tk, acc_buffers=2),
                    C(128, 128, tk, consumers=2, acc_buffers=2, cluster_m=2), C(256, 64, 2 * tk, consumers=2, cluster_n=2),
                    C(64, 32, 2 * tk, ctas=7, acc_buffers=2), C(128, 64, tk, ctas=6, cluster_n=2, acc_buffers=2)]
            for cfg in cfgs:
                pr = Fc2Problem(M, N, E, I, DT[dt], torch.bfloat16)
                if not can_implement(pr, cfg)[0]:
                    continue
                for od in ((torch.bfloat16, torch.float32) if M == 7 else (torch.bfloat16,)):
                    buf = torch.full((M + 2, N + 8), float("nan"), dtype=od, device="cuda")
                    out = buf[1:M + 1, 4:N + 4]
                    t0 = time.time()
                    try:
                        densemoe.fc2(a, w, alpha, out=out, config=cfg)
                        torch.cuda.synchronize()
                        err = rel_err(out, ref)
                        outside = buf.clone()
                        outside[1:M + 1, 4:N + 4] = 0
                        wrote_out = int(torch.isnan(outside).sum().item() != outside.numel() - M * N)
                        msg = f"err={err:.2e} outside_writes={wrote_out} ({time.time() - t0:.1f}s)"
                        ok = math.isfinite(err) and err < (2e-2 if od == torch.bfloat16 else 1e-2) and not wrote_out
                    except Exception as exc:  # noqa: BLE001
                        msg, ok = f"{type(exc).__name__}: {str(exc)[:400]}", False
                    checks.append(dict(dt=dt, N=N, E=E, I=I, M=M, out=str(od), config=cfg.to_str(), ok=ok, msg=msg))
                    log(f"{'ok  ' if ok else 'FAIL'} {dt} N={N} E={E} I={I} M={M} {od} {cfg.to_str()} {msg}")
    json.dump(checks, open(f"{args.out}/cute_checks.json", "w"), indent=1)
    log(f"checks: {sum(c['ok'] for c in checks)}/{len(checks)} ok")
    if args.check_only:
        sys.exit(0)

# ---------------------------------------------------------------- timing
timer = Timer(reps=args.reps)
ceiling = read_ceiling(timer)
peaks = peak_tflops(timer)
log(f"read ceiling {ceiling['tb_s']:.3f} TB/s  peaks {peaks}")
case = Fc2Case(args.shape, list(DT))
N, K, E, I = case.N, case.K, case.E, case.I
records = []


def space_noswap(M, dt):
    """Large M: tokens as wgmma M, wider clusters, lockstep expert order (plus the swap-AB default)."""
    tk = 128 // DT[dt].itemsize
    pr = Fc2Problem(M, N, E, I, DT[dt], torch.bfloat16)
    d = default_cute_config(pr)
    out = [d, dataclasses.replace(d, lockstep=1)]
    tm, cons = (64, 1) if M <= 64 else (128, 2)
    for tn, ab in ((128, 1), (128, 2), (192, 1)):
        for cn, cm in ((1, 2), (1, 4), (2, 2)):
            for ls in (0, 1):
                cfg = C(tn, tm, tk, consumers=cons, acc_buffers=ab, cluster_n=cn, cluster_m=cm, swap_ab=0, lockstep=ls)
                if can_implement(pr, cfg)[0] and cfg not in out:
                    out.append(cfg)
    return out


def space_clusters(M, dt):
    """Tokens as wgmma M with lockstep: token-tile clusters of 1..4 (3 fits M = 257..384)."""
    tk = 128 // DT[dt].itemsize
    pr = Fc2Problem(M, N, E, I, DT[dt], torch.bfloat16)
    out = [default_cute_config(pr)]
    for tn in (192, 128):
        for cm in (1, 2, 3, 4):
            cfg = C(tn, 128, tk, consumers=2, cluster_m=cm, swap_ab=0, lockstep=1)
            if can_implement(pr, cfg)[0] and cfg not in out and cm <= -(-M // 128):
                out.append(cfg)
    return out


def space(M, dt):
    if args.space == "noswap":
        return space_noswap(M, dt)
    if args.space == "clusters":
        return space_clusters(M, dt)
    tk = 128 // DT[dt].itemsize
    pr = Fc2Problem(M, N, E, I, DT[dt], torch.bfloat16)
    out = []
    if M <= 64:
        tms = [max(16, 1 << (M - 1).bit_length())]
        shapes = ((64, 1), (128, 1))
        clusters = ((1, 1), (2, 1))
    elif M <= 128:
        tms = sorted({-(-M // 16) * 16, 128})
        shapes = ((64, 1), (128, 2))
        clusters = ((1, 1), (2, 1))
    else:
        tms = [64, 128]
        shapes = ((128, 2), (256, 2))
        clusters = ((1, 1), (1, 2), (2, 1))
    for tm in tms:
        for tn, cons in shapes:
            for cn, cm in clusters:
                for k in (tk, 2 * tk):
                    for ab in (1, 2):
                        cfg = C(tn, tm, k, consumers=cons, cluster_n=cn, cluster_m=cm, acc_buffers=ab)
                        if can_implement(pr, cfg)[0]:
                            out.append(cfg)
    return out


for M in [int(x) for x in args.m.split(",")]:
    a, alpha = case.inputs(M)
    a8 = case.folded(a["bf16"], alpha, FP8)
    base = {"cublas_fp8_us": timer(cublas_fp8(case, a8))["us"]}
    a16 = case.folded(a["bf16"], alpha, torch.bfloat16)
    base["cublas_bf16_us"] = timer(lambda: a16 @ case.w["bf16"].T)["us"]
    for dt in args.dtypes.split(","):
        fl, nbytes = floor_us(N, K, M, E, dt, 2, ceiling["tb_s"], peaks)
        ref = fc2_ref(a[dt], case.w[dt], alpha, torch.float32, compute_dtype=torch.float32)
        cands = [("triton", None)] + [("cute", c) for c in space(M, dt)]
        best = {}
        for be, cfg in cands:
            out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
            fn = lambda: densemoe.fc2(a[dt], case.w[dt], alpha, out=out, config=cfg, backend=be)  # noqa: E731
            rec = dict(shape=args.shape, dtype=dt, M=M, backend=be, config=cfg.to_str() if cfg else "default",
                       floor_us=fl, **base)
            try:
                fn()
                torch.cuda.synchronize()
                err = rel_err(out, ref)
                if not err < 1e-2:
                    raise RuntimeError(f"wrong: rel err {err}")
                rec.update(timer(fn))
            except Exception as exc:  # noqa: BLE001
                rec.update(us=None, error=f"{type(exc).__name__}: {str(exc)[:300]}")
                log(f"  FAIL M={M} {dt} {rec['config']}: {rec['error']}")
                records.append(rec)
                continue
            us = rec["us"]
            rec.update(rel_err=err, tb_s=nbytes / us / 1e6, tflops=2 * M * N * K / us / 1e6, pct_floor=100 * fl / us,
                       x_cublas_fp8=base["cublas_fp8_us"] / us, x_cublas_bf16=base["cublas_bf16_us"] / us)
            records.append(rec)
            if be not in best or us < best[be][0]:
                best[be] = (us, rec["config"])
            log(f"  {dt} M={M:4} {be:6} {us:8.1f} us {rec['tb_s']:.2f} TB/s {rec['pct_floor']:5.1f}%fl "
                f"x8={rec['x_cublas_fp8']:.2f} {rec['config']}")
        tri = best.get("triton", (float("nan"),))[0]
        cu = best.get("cute", (float("nan"), ""))
        log(f"SUMMARY {dt} M={M:4} floor={fl:.1f} cublas8={base['cublas_fp8_us']:.1f} triton={tri:.1f} "
            f"cute_best={cu[0]:.1f} ({cu[0] and fl / cu[0] * 100:.1f}%fl, x8={base['cublas_fp8_us'] / cu[0]:.2f}, "
            f"vs triton {tri / cu[0]:.2f}) {cu[1]}")
    json.dump(dict(ceiling=ceiling, peaks=peaks, records=records), open(f"{args.out}/cute_sweep.json", "w"), indent=1)
