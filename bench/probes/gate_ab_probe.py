"""The router's gate kernel with the x quantisation spread over all programs (each quantises a
slice of every row) against the version where one program quantised a whole row
(``_gate_before.py``: commit dfbf49d's gate.py, put there by hand for the A/B, not committed):
bits compared, then the gate alone and the DeepSeek-V3 TP8 fp8 layer (DenseMoE, uniform top-8)
timed alternately in one process, each both ways (Timer: one-op graph; Timer.in_graph: behind
the flush in one graph). python bench/probes/gate_ab_probe.py"""

import importlib.util
import pathlib
import statistics

import torch

import densemoe.kernels.triton.gate as gate_new
from densemoe.timing import Timer
from densemoe.bench.layer import ExpertsCase
from densemoe.layer import DenseMoE

spec = importlib.util.spec_from_file_location("gate_before", pathlib.Path(__file__).with_name("_gate_before.py"))
gate_old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate_old)
new_fn = gate_new.gate_triton
timer = Timer(reps=40)
case = ExpertsCase("deepseek-v3-tp8", "cuda")
p = case.prepared["fp8"]
moe = DenseMoE(p, case.gate, case.k, renormalize=True)
E, H = case.E, case.H
print("| M | gate before us | gate after us | in graph before | in graph after | layer before | layer after | "
      "layer in graph before | layer in graph after |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for M in (1, 2, 4):
    x = case.x(M)
    outs = []
    for fn in (gate_old.gate_triton, new_fn):
        out = torch.empty(M, E, dtype=torch.bfloat16, device="cuda")
        q = torch.empty(M, H, dtype=torch.float8_e4m3fn, device="cuda")
        s = torch.empty(M, device="cuda")
        fn(x, case.gate, out, q, s)
        outs.append((out, q, s))
    (o0, q0, s0), (o1, q1, s1) = outs
    assert torch.equal(o0, o1) and torch.equal(q0.view(torch.uint8), q1.view(torch.uint8)) and torch.equal(s0, s1)
    ref = moe(x).float()
    gate_new.gate_triton = gate_old.gate_triton
    old_out = moe(x).float()
    gate_new.gate_triton = new_fn
    assert torch.equal(ref, old_out)

    def layer(fn):
        def run():
            gate_new.gate_triton = fn
            return moe(x)
        return run

    fns = {"g0": lambda: gate_old.gate_triton(x, case.gate, o0, q0, s0),
           "g1": lambda: new_fn(x, case.gate, o1, q1, s1),
           "l0": layer(gate_old.gate_triton), "l1": layer(new_fn)}
    t = {k: [] for k in fns}
    tg = {k: [] for k in fns}
    for _ in range(3):
        for k, fn in fns.items():
            t[k].append(timer(fn)["us"])
            tg[k].append(timer.in_graph(fn)["us"])
    gate_new.gate_triton = new_fn
    t = {k: statistics.median(v) for k, v in t.items()}
    tg = {k: statistics.median(v) for k, v in tg.items()}
    print(f"| {M} | {t['g0']:.1f} | {t['g1']:.1f} | {tg['g0']:.1f} | {tg['g1']:.1f} | {t['l0']:.1f} | {t['l1']:.1f} | "
          f"{tg['l0']:.1f} | {tg['l1']:.1f} |", flush=True)
