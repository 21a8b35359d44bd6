"""FC2 and the combine in one launch through L2-sized ring slots (``RoutedConfig.fc2_ring``)
against FC2 then the combine as the table's config runs them, on the same y (issue 19: the
pairs' rows cost 2 x M*k*H*2 bytes of HBM traffic, written by FC2 and read back by the combine).

    python bench/probes/routed_fc2_ring.py [shapes] [M,...] [dtype]

Per M: the table's config (FC2 + combine, timed together as ``_fc2_stage`` runs them), then the
ring at 2 and 3 slots and 1-3 programs an SM on the table's FC2 tiles; each checked bit for bit
against FC2's rows and the combine on those tiles (no atomic or fused combine); then the whole
path with the table's config and with the fastest ring. Timer: CUDA graphs behind an L2 flush,
medians; the read ceiling in the same process; the bound of FC2 + combine without the round
trip (w2's picked bytes and the output written, at the read ceiling) beside the bound with it."""

import dataclasses
import sys

import torch

from densemoe.bench.common import read_ceiling
from densemoe.bench.layer import ExpertsCase
from densemoe.kernels.common import RoutedProblem
from densemoe.ops import routed_configs
from densemoe.ops.routed import _fc1_stage, _fc2_stage, routed_experts
from densemoe.quant import FP8, quantize_per_token
from densemoe.timing import Timer
from densemoe.tuning.ops import routed_topk

shapes = (sys.argv[1] if len(sys.argv) > 1 else "deepseek-v3-tp8,qwen3-30b-a3b").split(",")
ms = [int(m) for m in (sys.argv[2] if len(sys.argv) > 2 else "1024,2048,4096").split(",")]
dt = sys.argv[3] if len(sys.argv) > 3 else "fp8"
timer = Timer(reps=20)
ceiling = read_ceiling(timer)["tb_s"]
print(f"# read ceiling {ceiling:.2f} TB/s, {dt}; us (FC2 + combine as the config runs them)", flush=True)
for shape in shapes:
    case = ExpertsCase(shape, "cuda")
    p = case.prepared[dt]
    E, H, I, k = p.num_experts, p.hidden, p.inter, case.k
    for M in ms:
        x = case.x(M)
        ids, wts = routed_topk(M, E, k, "cuda", torch.Generator(device="cuda").manual_seed(M))
        wts = wts.float().contiguous()
        cfg = routed_configs.choose(RoutedProblem(M, H, E, I, k, p.dtype, torch.bfloat16), "cuda").config
        xq, sx = quantize_per_token(x) if p.dtype == FP8 else (x, None)
        sp, offs, y, ys = _fc1_stage(xq, sx, p.w1, p.alpha1, ids, cfg)
        plain = dataclasses.replace(cfg, atomic_combine=False, fused_combine=False, fc2_col_groups=0,
                                    fc2_col_major=False, flatten=False, fc2_cute=False)
        out = torch.empty(M, H, dtype=torch.bfloat16, device="cuda")

        def fc2(c):
            _fc2_stage(y, ys, p.w2, p.w2_scale, sp, offs, ids, wts, out, c)
            return out

        want = fc2(plain).clone()
        picked = int(torch.zeros(E, dtype=torch.bool, device="cuda").index_fill_(0, ids.reshape(-1), True).sum())
        w2_bytes = picked * H * I * p.w2.element_size()
        rows = M * k * H * 2
        b_ring = (w2_bytes + M * H * 2) / (ceiling * 1e6)
        b_rows = (w2_bytes + 2 * rows + M * H * 2) / (ceiling * 1e6)
        line = [f"{shape} M={M} table {cfg.short()} {timer(lambda: fc2(cfg))['us']:.1f}"]
        if plain != cfg:
            line.append(f"plain {timer(lambda: fc2(plain))['us']:.1f}")
        best = None
        for ring in (2, 3):
            for pps in (1, 2, 3):
                c = dataclasses.replace(plain, fc2_ring=ring, fc2_programs_per_sm=0 if pps == plain.programs_per_sm
                                        else pps)
                got = fc2(c)
                ok = torch.equal(got, want)
                us = timer(lambda: fc2(c))["us"]
                line.append(f"r{ring}p{pps} {us:.1f}{'' if ok else ' WRONG'}")
                if ok and (best is None or us < best[0]):
                    best = (us, c)
        line.append(f"| bounds: ring {b_ring:.1f} rows {b_rows:.1f}")
        print("  ".join(line), flush=True)
        if best is not None:
            whole_t = timer(lambda: routed_experts(x, p, ids, wts, config=cfg))["us"]
            whole_r = timer(lambda: routed_experts(x, p, ids, wts, config=best[1]))["us"]
            same = torch.equal(routed_experts(x, p, ids, wts, config=best[1]),
                               routed_experts(x, p, ids, wts, config=plain))
            print(f"  whole path: table {whole_t:.1f}  ring {best[1].short()} {whole_r:.1f}  "
                  f"({whole_t / whole_r:.3f}x){'' if same else ' WRONG'}", flush=True)
