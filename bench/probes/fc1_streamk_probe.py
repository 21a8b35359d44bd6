"""FC1 stream-K (every persistent program takes an equal contiguous share of all units' k-steps)
against the default skip config (whole units round-robin; M = 1 keeps its split_k = 4),
DeepSeek-V3 TP8 fp8, uniform and skewed top-8 routing (the skipping benchmark's): only a last
wave of at most STREAM_K_TAIL x the programs is cut by k-steps (0: never, 1: always). Outputs checked against each other and
the fp32 reference first; timed alternately (3 rounds, the benchmark's Timer: CUDA-graph
replays, L2 flushed), and once inside a graph. FC1 as the layer calls it (fill=False), and the
layer with the ops' default patched. Prints a markdown table; JSON to argv[1] if given.

SHAPE=deepseek-v3-tp8 DTYPE=fp8 TAILS=0,0.25,0.5,1 python bench/probes/fc1_streamk_probe.py [out.json] [M,...]"""

import dataclasses
import json
import os
import sys

import torch

import densemoe.kernels.triton.fc1 as k1
import densemoe.ops.fc1_configs as ops1
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.bench.skip import routing_alpha, skewed_gate
from densemoe.kernels.triton.fc1 import fc1_triton
from densemoe.kernels.common import Fc1Problem
from densemoe.layer import DenseMoE
from densemoe.quant import quantize_per_token
from densemoe.reference import fc1_ref
from densemoe.tuning.space import describe

try:  # the kernel before this change (git show HEAD:src/densemoe/kernels/triton/fc1.py), for an A/B
    sys.path.insert(0, "bench/experiments")
    import _fc1_head as head
except ImportError:
    head = None
out_path = sys.argv[1] if len(sys.argv) > 1 else None
ms = [int(m) for m in (sys.argv[2] if len(sys.argv) > 2 else "1,2,4,8,16,32,64,128,256").split(",")]
timer = Timer(reps=30)
case = ExpertsCase(os.environ.get("SHAPE", "deepseek-v3-tp8"), "cuda")
p = case.prepared[os.environ.get("DTYPE", "fp8")]
E, I, H, k = case.E, case.I, case.H, case.k
gen = torch.Generator(device="cuda").manual_seed(1)
orig_skip_cfg = ops1.default_skip_config


def nosk(prob, sms=132):  # the rule without stream-K
    return dataclasses.replace(orig_skip_cfg(prob, sms), stream_k=0)


def streamk(c):
    return dataclasses.replace(c, persistent=max(1, c.persistent), split_k=1, stream_k=1)


def patched(variant, fn):
    def run():
        ops1.default_skip_config = (nosk if variant == "base" else lambda prob, sms=132: streamk(orig_skip_cfg(prob, sms)))
        try:
            return fn()
        finally:
            ops1.default_skip_config = orig_skip_cfg
    return run


rows = []
TAILS = tuple(float(t) for t in os.environ.get("TAILS", "0,0.25,0.5,1").split(","))
hd = [" HEAD kernel"] if head is not None else []
print("| routing | M | active | units | base cfg | FC1 base us | " + " | ".join(hd + [f"SK tail {t}" for t in TAILS])
      + " | in graph base | " + " | ".join(hd + [f"in graph SK {t}" for t in TAILS])
      + " | layer base | layer SK 0.5 | rel diff |")
print("|---|---:|---:|---:|---|" + "---:|" * (2 * len(TAILS) + 5 + 2 * len(hd)))


def tail(t, fn):
    def run():
        k1.STREAM_K_TAIL = t
        try:
            return fn()
        finally:
            k1.STREAM_K_TAIL = 0.5
    return run


for routing in ("uniform", "skewed"):
    gate = case.gate if routing == "uniform" else skewed_gate(case.gate, k)
    moe = DenseMoE(p, gate, k, renormalize=True)
    for M in ms:
        x = case.x(M)
        alpha = routing_alpha(M, E, k, routing, gen, "cuda")
        x8, sx = quantize_per_token(x) if p.w1.dtype != torch.bfloat16 else (x, None)
        prob = Fc1Problem(M, H, E, I, p.w1.dtype, torch.bfloat16)
        base = nosk(prob)
        sk = streamk(base) if base.split_k == 1 else base  # (M = 1 keeps split_k: a check of the base only)
        y = torch.empty(M, E * I, dtype=torch.bfloat16, device="cuda")
        fns = [lambda: fc1_triton(x8, p.w1, p.alpha1, y, base, x_scale=sx, routing=alpha, skip=True, fill=False)]
        if head is not None:
            fns.append(lambda: head.fc1_triton(x8, p.w1, p.alpha1, y, head.Fc1TritonConfig.from_str(base.to_str().replace(
                ",stream_k=0", "")), x_scale=sx, routing=alpha, skip=True, fill=False))
        nb = len(fns)
        fns += [tail(t, lambda: fc1_triton(x8, p.w1, p.alpha1, y, sk, x_scale=sx, routing=alpha, skip=True,
                                           fill=False)) for t in TAILS]
        ref = fc1_ref(x8, p.w1, p.alpha1, x_scale=sx, out_dtype=torch.float32, compute_dtype=torch.float32)
        live = (alpha != 0).repeat_interleave(I, dim=1)
        outs = []
        for f in fns:
            y.fill_(float("nan"))
            f()
            outs.append(y.float().clone())
        diff = max(((o[live] - outs[0][live]).norm() / outs[0][live].norm()).item() for o in outs)
        errs = [((o[live] - ref[live]).norm() / ref[live].norm()).item() for o in outs]
        assert not any(torch.isnan(o[live]).any() for o in outs), "NaN in an output"
        assert diff < 1e-2 and max(errs) < 1e-2, (diff, errs)
        if M <= 64:
            fns += [patched("base", lambda: moe(x)), tail(0.5, patched("sk", lambda: moe(x)))]
        r = timer.compare(fns, rounds=3)
        g = [timer.in_graph(f)["us"] for f in fns[:nb + len(TAILS)]]
        active = int((alpha != 0).any(0).sum())
        pairs = sum(int((alpha[t:t + base.block_m] != 0).any(0).sum()) for t in range(0, M, base.block_m))
        units = pairs * -(-I // base.block_i)
        layer = [r[-2]["us"], r[-1]["us"]] if M <= 64 else [None, None]
        rec = dict(shape=case.shape.name, dtype=str(p.w1.dtype), routing=routing, M=M, active=active, units=units, base=base.to_str(),
                   us=[q["us"] for q in r[:nb + len(TAILS)]], head_kernel=head is not None, rounds=[q["us_rounds"] for q in r],
                   tails=TAILS, in_graph=g, layer_base=layer[0], layer_sk=layer[1], rel_diff=diff, rel_err=errs,
                   device=torch.cuda.get_device_name())
        rows.append(rec)
        short = describe(base).split(":")[1]
        lay = " | ".join("-" if v is None else f"{v:.1f}" for v in layer)
        print(f"| {routing} | {M} | {active} | {units} | {short} | "
              + " | ".join(f"{q['us']:.1f}" for q in r[:nb + len(TAILS)]) + " | "
              + " | ".join(f"{v:.1f}" for v in g) + f" | {lay} | {diff:.1e} |", flush=True)
if out_path:
    json.dump(rows, open(out_path, "w"), indent=1)
