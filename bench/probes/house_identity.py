"""Two source trees, the same outputs? The public calls of densemoe run on the GPU under each tree
in turn, on the same inputs, and every output is compared bit for bit (issue 18: the house moved,
no kernel's arithmetic may change).

    python bench/probes/house_identity.py BEFORE_SRC AFTER_SRC [OUT_DIR] [--smoke]

``--smoke``: tiny shapes on the CPU through Triton's interpreter, to check the script itself.

BEFORE_SRC / AFTER_SRC: directories holding a ``densemoe`` package (e.g. ``git archive 7b52f36
src | tar -x -C .carry/before`` gives ``.carry/before/src``). Each tree runs in a subprocess of its
own (``PYTHONPATH``), twice for the "before" tree: launches whose split tiles meet in fp32 atomics
are not bit-reproducible run to run, so an output that differs between the two "before" runs is
held to that run-to-run difference instead of bit equality. Only the public API is called (what
both trees have): ``fc1``, ``fc2`` (default, dense, skipping, CuTe forced), ``experts_forward``,
``DenseMoE`` and the routers, at DeepSeek-V3 TP8 and Qwen3-30B-A3B shapes, fp8 and bf16.
Prints one line per output and a verdict; writes ``identity.json`` to OUT_DIR when given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

BATTERY = r'''
import os, sys, torch
if os.environ.get("HOUSE_INTERPRETER_FIX"):  # smoke test: the same interpreter numerics in both trees
    import importlib.util
    spec = importlib.util.spec_from_file_location("_fix", os.environ["HOUSE_INTERPRETER_FIX"])
    fix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fix)
    fix.install()
import densemoe
from densemoe.routing import softmax_topk

torch.backends.cuda.matmul.allow_tf32 = False
FP8, BF16 = torch.float8_e4m3fn, torch.bfloat16
SMOKE = len(sys.argv) > 2  # a CPU smoke test of the script itself: tiny shapes, Triton's interpreter
dev = "cpu" if SMOKE else "cuda"
SHAPES = ((("tiny", (256, 8, 64)),) if SMOKE else (("tp8", (7168, 256, 256)), ("qwen3", (2048, 128, 768))))
MS = (1, 8) if SMOKE else (1, 8, 64, 256, 512)
outs = {}

def keep(name, t):
    outs[name] = t.detach().view(torch.uint8).cpu() if t.dtype == FP8 else t.detach().cpu()

def cute_ok():
    if SMOKE:
        return False
    try:
        import cutlass  # noqa: F401
        return True
    except Exception:
        return False

for shape, (H, E, I) in SHAPES:
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, generator=g, device=dev, dtype=BF16) * H ** -0.5
    w2 = torch.randn(E, H, I, generator=g, device=dev, dtype=BF16) * I ** -0.5
    gate = torch.randn(E, H, generator=g, device=dev, dtype=BF16) * H ** -0.5
    for dt in ("fp8", "bf16"):
        p = densemoe.prepare_weights(w13, w2, dtype=dt)
        moe = densemoe.DenseMoE(p, gate, min(8, E))
        for M in MS:
            x = torch.randn(M, H, generator=g, device=dev, dtype=BF16)
            r = softmax_topk(torch.randn(M, E, generator=g, device=dev), min(8, E), renormalize=True)
            tag = f"{shape}/{dt}/M{M}"
            keep(f"{tag}/route_alpha", r.alpha)
            keep(f"{tag}/experts", densemoe.experts_forward(x, p, r.alpha))
            keep(f"{tag}/experts_dense", densemoe.experts_forward(x, p, r.alpha, skip=False))
            keep(f"{tag}/moe", moe(x))
            xin = x.to(FP8) if dt == "fp8" else x
            xs = torch.ones(M, device=dev) if dt == "fp8" else None
            keep(f"{tag}/fc1_route", densemoe.fc1(xin, p.w1, p.alpha1, x_scale=xs, routing=r.alpha))
            keep(f"{tag}/fc1_dense", densemoe.fc1(xin, p.w1, p.alpha1, x_scale=xs))
            a = torch.randn(M, E * I, generator=g, device=dev).to(p.w2.dtype)
            keep(f"{tag}/fc2", densemoe.fc2(a, p.w2, r.alpha))
            keep(f"{tag}/fc2_dense", densemoe.fc2(a, p.w2, r.alpha, skip=False))
            keep(f"{tag}/fc2_triton", densemoe.fc2(a, p.w2, r.alpha, skip=False, backend="triton"))
            if cute_ok():
                keep(f"{tag}/fc2_cute", densemoe.fc2(a, p.w2, r.alpha, backend="cute"))
                try:
                    keep(f"{tag}/fc1_cute", densemoe.fc1(xin, p.w1, p.alpha1, x_scale=xs, backend="cute"))
                except ValueError as exc:
                    print("no CuTe FC1 for", tag, exc, file=sys.stderr)
        del p, moe
torch.save(outs, sys.argv[1])
print("saved", len(outs))
'''


def run(src: str, path: str, smoke: bool = False) -> None:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DENSEMOE_NO_HF_REGISTER="1")
    env.pop("TRITON_INTERPRET", None)
    if smoke:  # the interpreter's numerics fixes lived in tests/conftest.py before 18: give both trees them
        env["TRITON_INTERPRET"] = "1"
        env["HOUSE_INTERPRETER_FIX"] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                    "src", "densemoe", "_interpreter.py")
    r = subprocess.run([sys.executable, "-c", BATTERY, path] + (["smoke"] if smoke else []), env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{src}: {r.stderr[-3000:]}")
    print(f"{src}: {r.stdout.strip()}", flush=True)


def main() -> int:
    import torch

    smoke = "--smoke" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--smoke"]
    before, after = args[0], args[1]
    out_dir = args[2] if len(args) > 2 else None
    tmp = tempfile.mkdtemp()
    paths = [os.path.join(tmp, n) for n in ("before1.pt", "before2.pt", "after.pt")]
    run(before, paths[0], smoke)
    run(before, paths[1], smoke)
    run(after, paths[2], smoke)
    b1, b2, a = (torch.load(p) for p in paths)
    rows, ok = [], True
    for key in sorted(set(b1) | set(a)):
        if key not in a or key not in b1:
            rows.append((key, "missing in " + ("after" if key not in a else "before"), False))
            ok = False
            continue
        x, y, z = b1[key], b2[key], a[key]
        if torch.equal(x, z):
            rows.append((key, "identical", True))
            continue
        spread = (x.double() - y.double()).abs().max().item() if not torch.equal(x, y) else 0.0
        diff = (x.double() - z.double()).abs().max().item()
        good = spread > 0 and diff <= 2 * spread
        rows.append((key, f"differs by {diff:.3g} (before runs differ by {spread:.3g})", good))
        ok = ok and good
    for key, what, good in rows:
        print(f"{'ok  ' if good else 'FAIL'} {key}: {what}")
    n_id = sum(w == "identical" for _, w, _ in rows)
    verdict = "the rest within the before runs' own spread" if ok else "DIFFERENCES"
    print(f"{n_id}/{len(rows)} identical; {verdict}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "identity.json"), "w") as f:
            device = "cpu (smoke)" if smoke else torch.cuda.get_device_name()
            json.dump({"device": device, "rows": rows, "ok": ok}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
