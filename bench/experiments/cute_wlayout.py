"""Does the weight layout cap small-M FC2 bandwidth? The CuTe kernel on w as given ([N, E*I],
K-major: each TMA box is tile_n rows of tile_k bytes, rows E*I bytes apart) against the same
kernel on w packed tile by tile (each box one contiguous tile_n * tile_k block), same configs,
same process, checked against the reference first. Triton's default and cuBLAS FP8 as anchors.

Usage: python bench/experiments/cute_wlayout.py [--m 1,16,64,128] [--shape deepseek-v3-tp8] --out DIR
"""

import argparse
import json

import torch

import densemoe
from densemoe import Fc2CuteConfig as C
from densemoe.bench.common import FP8, Timer, read_ceiling, peak_tflops
from densemoe.bench.fc2 import Fc2Case, cublas_fp8, floor_us, rel_err
from densemoe.kernels.cute import fc2_sm90
from densemoe.kernels.triton.fc2 import Fc2Problem
from densemoe.ops.fc2 import default_cute_config
from densemoe.reference import fc2_ref

p = argparse.ArgumentParser()
p.add_argument("--m", default="1,16,32,64,128")
p.add_argument("--shape", default="deepseek-v3-tp8")
p.add_argument("--reps", type=int, default=30)
p.add_argument("--out", default=".")
args = p.parse_args()
log = lambda *a: print(*a, flush=True)  # noqa: E731

timer = Timer(reps=args.reps)
ceiling = read_ceiling(timer)
peaks = peak_tflops(timer)
log(f"# {torch.cuda.get_device_name()} read ceiling {ceiling['tb_s']:.3f} TB/s {ceiling['variants']}")
case = Fc2Case(args.shape, ["fp8"])
N, K, E, I = case.N, case.K, case.E, case.I
w = case.w["fp8"]
packed = {}


def pack(tn, tk):
    if (tn, tk) not in packed:
        packed[(tn, tk)] = (w.view(N // tn, tn, K // tk, tk).permute(0, 2, 1, 3).contiguous().view(N, K))
    return packed[(tn, tk)]


records = []
for M in [int(x) for x in args.m.split(",")]:
    a, alpha = case.inputs(M)
    a8 = a["fp8"]
    fl, nbytes = floor_us(N, K, M, E, "fp8", 2, ceiling["tb_s"], peaks)
    ref = fc2_ref(a8, w, alpha, torch.float32, compute_dtype=torch.float32)
    base = {"cublas_fp8": timer(cublas_fp8(case, case.folded(a["bf16"], alpha, FP8)))["us"]}
    out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    base["triton"] = timer(lambda: densemoe.fc2(a8, w, alpha, out=out, backend="triton"))["us"]
    d = default_cute_config(Fc2Problem(M, N, E, I, FP8, torch.bfloat16))
    tk = d.tile_k
    cfgs = [d]
    for tn, cons in ((64, 1), (128, 1)):
        for cn in (2,):
            c = C(tn, d.tile_m, tk, consumers=cons, acc_buffers=d.acc_buffers, cluster_n=cn, cluster_m=d.cluster_m)
            if c not in cfgs and fc2_sm90.can_implement(Fc2Problem(M, N, E, I, FP8, torch.bfloat16), c)[0]:
                cfgs.append(c)
    log(f"M={M} floor {fl:.1f} us  cuBLAS fp8 {base['cublas_fp8']:.1f}  triton {base['triton']:.1f}")
    for cfg in cfgs:
        for tiled in (False, True):
            wt = pack(cfg.tile_n, cfg.tile_k) if tiled else w
            out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
            fn = lambda: fc2_sm90.fc2_cute(a8, wt, alpha, out, cfg, w_tiled=tiled)  # noqa: E731
            rec = dict(M=M, config=cfg.to_str(), w_tiled=tiled, floor_us=fl, **{f"{k}_us": v for k, v in base.items()})
            try:
                fn()
                torch.cuda.synchronize()
                err = rel_err(out, ref)
                assert err < 1e-2, f"rel err {err}"
                rec.update(timer(fn), rel_err=err)
                us = rec["us"]
                rec.update(tb_s=nbytes / us / 1e6, pct_floor=100 * fl / us)
                log(f"  {'tiled' if tiled else 'plain'} {us:7.1f} us {rec['tb_s']:.2f} TB/s {rec['pct_floor']:5.1f}%fl "
                    f"x_cublas={base['cublas_fp8'] / us:.3f} x_triton={base['triton'] / us:.3f}  {cfg.to_str()}")
            except Exception as exc:  # noqa: BLE001
                rec.update(error=f"{type(exc).__name__}: {str(exc)[:300]}")
                log(f"  FAIL {cfg.to_str()} tiled={tiled}: {rec['error']}")
            records.append(rec)
json.dump(dict(device=torch.cuda.get_device_name(), ceiling=ceiling, peaks=peaks, records=records),
          open(f"{args.out}/cute_wlayout.json", "w"), indent=1)
