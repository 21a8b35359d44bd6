"""FC1 at M = 96-128 (TP8 fp8): does the number of weight bytes in flight per SM set the speed?
CuTe configs with more or fewer weight bytes per pipeline stage, timed interleaved with the
tuned Triton config; each checked against the Triton result first.
python bench/probes/fc1_inflight.py [M]"""

import sys

import torch

import densemoe
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.cute.fc1_sm90 import can_implement
from densemoe.kernels.common import Fc1Problem
from densemoe.quant import quantize_per_token

M = int(sys.argv[1]) if len(sys.argv) > 1 else 128
timer = Timer(reps=20)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
x8, sx = quantize_per_token(case.x(M))
prob = Fc1Problem(M, case.H, case.E, case.I, torch.float8_e4m3fn, torch.bfloat16)
C = densemoe.Fc1CuteConfig
cands = {
    "cute ti64 tm128 tk256 c2 noswap (tuned)": C(tile_i=64, tile_m=128, tile_k=256, consumers=2, swap_ab=0),
    "cute ti128 tm128 tk128 c2 swap": C(tile_i=128, tile_m=128, tile_k=128, consumers=2, swap_ab=1),
    "cute ti128 tm64 tk128 c2 swap": C(tile_i=128, tile_m=64, tile_k=128, consumers=2, swap_ab=1),
    "cute ti256 tm64 tk128 c2 swap": C(tile_i=256, tile_m=64, tile_k=128, consumers=2, swap_ab=1),
    "cute ti256 tm32 tk128 c2 swap": C(tile_i=256, tile_m=32, tile_k=128, consumers=2, swap_ab=1),
    "cute ti128 tm128 tk128 c2 swap cn2": C(tile_i=128, tile_m=128, tile_k=128, consumers=2, swap_ab=1, cluster_n=2),
    "cute ti128 tm128 tk128 c2 noswap-2atoms": C(tile_i=128, tile_m=128, tile_k=128, consumers=1, swap_ab=0),
}
ref = densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, backend="triton").float()
fns = {"triton (tuned)": lambda: densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, backend="triton")}
for name, cfg in cands.items():
    ok, why = can_implement(prob, cfg)
    if not ok:
        print(f"skip {name}: {why}")
        continue
    out = densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, config=cfg).float()
    err = ((out - ref).norm() / ref.norm()).item()
    if err > 1e-2:
        print(f"WRONG {name}: {err:.2e}")
        continue
    stage = (2 * cfg.tile_i + cfg.tile_m) * cfg.tile_k
    print(f"{name}: stages {cfg.resolved_stages(torch.float8_e4m3fn)}, {2 * cfg.tile_i * cfg.tile_k // 1024} KB weights "
          f"of {stage // 1024} KB per stage", flush=True)
    fns[name] = lambda cfg=cfg: densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, config=cfg)
res = timer.compare(list(fns.values()), rounds=2)
for name, r in zip(fns, res):
    print(f"M={M} {name}: {r['us']:.1f} us {r['us_rounds']}", flush=True)
