"""The in-kernel expert list with one scan (``skip._tile_positions``: an unpicked expert's place
from the same cumsum) against the two scans before (``ab_prev/``: the kernels at the commit
before, importing the old ``skip.py``), at small M: FC1 (the op's default fill, and fill off) and
FC2 with the list built from the routing (no ids), DeepSeek-V3 TP8 fp8, uniform top-8. Outputs
checked bit-identical first; timed alternately (3 rounds, one-op graph) and in a graph.

``ab_prev/`` is not committed; made from the commit before the change (c6d9ddf) by
    mkdir -p bench/probes/ab_prev && git show c6d9ddf:src/densemoe/kernels/triton/skip.py \
      > bench/probes/ab_prev/skip_prev.py
    for k in fc1 fc2; do git show c6d9ddf:src/densemoe/kernels/triton/$k.py | sed \
      's/from densemoe.kernels.triton.skip import/from skip_prev import/' > bench/probes/ab_prev/${k}_prev.py; done

python bench/probes/list_scan_probe.py [out.json] [M,...]"""

import json
import sys

import torch

sys.path.insert(0, "bench/probes/ab_prev")
import fc1_prev  # noqa: E402
import fc2_prev  # noqa: E402

from densemoe.timing import Timer  # noqa: E402
from densemoe.bench.layer import ExpertsCase  # noqa: E402
from densemoe.bench.skip import routing_alpha  # noqa: E402
from densemoe.kernels.triton.fc1 import fc1_triton  # noqa: E402
from densemoe.kernels.common import Fc1Problem
from densemoe.ops.fc1_configs import default_skip_config
from densemoe.kernels.triton.fc2 import fc2_triton  # noqa: E402
from densemoe.kernels.common import Fc2Problem  # noqa: E402
from densemoe.ops.fc2_configs import default_skip_config as fc2_skip_config  # noqa: E402
from densemoe.quant import quantize_per_token  # noqa: E402

out_path = sys.argv[1] if len(sys.argv) > 1 else None
ms = [int(m) for m in (sys.argv[2] if len(sys.argv) > 2 else "1,2,4").split(",")]
timer = Timer(reps=30)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
E, I, H, k = case.E, case.I, case.H, case.k
gen = torch.Generator(device="cuda").manual_seed(3)
rows = []
print("| M | op | new us | prev us | new in graph | prev in graph |")
print("|---:|---|---:|---:|---:|---:|")
for M in ms:
    x = case.x(M)
    alpha = routing_alpha(M, E, k, "uniform", gen, "cuda")
    x8, sx = quantize_per_token(x)
    c1 = default_skip_config(Fc1Problem(M, H, E, I, p.w1.dtype, torch.bfloat16))
    c1p = fc1_prev.Fc1TritonConfig.from_str(c1.to_str())
    y = torch.empty(M, E * I, dtype=torch.bfloat16, device="cuda")
    y8 = torch.randn(M, E * I, device="cuda").to(torch.float8_e4m3fn)
    c2 = fc2_skip_config(Fc2Problem(M, H, E, I, torch.float8_e4m3fn, torch.bfloat16))
    c2p = fc2_prev.Fc2TritonConfig.from_str(c2.to_str()) if hasattr(fc2_prev.Fc2TritonConfig, "from_str") else c2
    o = torch.empty(M, H, dtype=torch.bfloat16, device="cuda")
    cases = {
        "fc1 fill": (lambda: fc1_triton(x8, p.w1, p.alpha1, y, c1, x_scale=sx, routing=alpha, skip=True),
                     lambda: fc1_prev.fc1_triton(x8, p.w1, p.alpha1, y, c1p, x_scale=sx, routing=alpha, skip=True), y),
        "fc1 no fill": (lambda: fc1_triton(x8, p.w1, p.alpha1, y, c1, x_scale=sx, routing=alpha, skip=True, fill=False),
                        lambda: fc1_prev.fc1_triton(x8, p.w1, p.alpha1, y, c1p, x_scale=sx, routing=alpha, skip=True,
                                                    fill=False), y),
        "fc2": (lambda: fc2_triton(y8, p.w2, alpha, o, c2, skip=True),
                lambda: fc2_prev.fc2_triton(y8, p.w2, alpha, o, c2p, skip=True), o),
    }
    for name, (new, prev, buf) in cases.items():
        res = []
        for f in (new, prev):
            buf.fill_(float("nan"))
            f()
            res.append(buf.float().clone())
        live = ~torch.isnan(res[1])
        assert torch.equal(torch.isnan(res[0]), torch.isnan(res[1])) and torch.equal(res[0][live], res[1][live]), name
        if name != "fc1 no fill":
            assert not torch.isnan(res[0]).any(), name
        r = timer.compare([new, prev], rounds=3)
        g = [timer.in_graph(f)["us"] for f in (new, prev)]
        rows.append(dict(M=M, op=name, us_new=r[0]["us"], us_prev=r[1]["us"], rounds=[q["us_rounds"] for q in r],
                         in_graph_new=g[0], in_graph_prev=g[1], device=torch.cuda.get_device_name()))
        print(f"| {M} | {name} | {r[0]['us']:.1f} | {r[1]['us']:.1f} | {g[0]:.1f} | {g[1]:.1f} |", flush=True)
if out_path:
    json.dump(rows, open(out_path, "w"), indent=1)
