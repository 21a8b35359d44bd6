"""Does FC2's column stream beat the tuned routed FC2? (issue 19, docs/routed.md "The column
stream".) For each M: the library's choice for the routed call (the tuned table where it has
the key) against the column-stream configs of the tuning space that keep its FC1 tile (so y and
its scales are the same), and the choice itself with ``fc2_col_groups`` set. Each FC2 is checked
against the choice's rows first (the same y; tiles of another shape may sum in another order:
within two bf16 roundings), then timed alone (Timer: CUDA graphs, L2 flushed, medians) beside
the whole routed path with that config and the read ceiling of the same process.

    python bench/probes/routed_fc2_stream.py [shape] [M,...]     (a CUDA GPU; fp8)
    TRITON_INTERPRET=1 python bench/probes/routed_fc2_stream.py --check   (CPU: a tiny shape)

One line per (M, config): FC2 us, its TB/s of the picked experts' w2 bytes plus the rows it
writes, the whole path's us, and the ratio to the choice's FC2."""

import dataclasses
import sys

import torch

from densemoe.kernels.common import SMEM_BYTES, RoutedProblem
from densemoe.kernels.triton import routed as kern
from densemoe.kernels.triton.routed import can_implement
from densemoe.ops import routed_configs
from densemoe.ops.routed import routed_experts
from densemoe.quant import FP8, quantize_per_token
from densemoe.tuning.ops import make_routed_inputs
from densemoe.tuning.space import _column_groups, routed_space


def with_stream(cfg, p, groups):
    """``cfg`` with FC2's column stream in ``groups`` groups, its ring as deep as fits its programs
    per SM (None: not two stages)."""
    steps = p.i // cfg.fc2_block_k
    for n in (cfg.fc2_block_n, 128, 64):
        stage = (cfg.block_m + n) * cfg.fc2_block_k * p.dtype.itemsize * steps
        st = min(4, (SMEM_BYTES - 1024) // cfg.programs_per_sm // stage)
        c = dataclasses.replace(cfg, fc2_col_groups=groups, fc2_block_n=n, fc2_stages=st, flatten=False,
                                fused_combine=False)
        if st >= 2 and can_implement(p, c)[0]:
            return c
    return None


def candidates(p, base, programs):
    out = [with_stream(base, p, _column_groups(p, base.block_m, base.fc2_block_n, programs, per))
           for per in (8, 2)]
    out += [c for c in routed_space(p, num_sms=programs) if c.fc2_col_groups and c.fc1_block_i == base.fc1_block_i]
    seen, keep = set(), []
    for c in out:
        if c is not None and c not in seen:
            seen.add(c)
            keep.append(c)
    return keep


def setup(p, device, seed):
    inp = make_routed_inputs(p, device, seed=seed)
    pw, ids, wts = inp.prepared, inp.topk_ids, inp.topk_weights.float()
    P = p.m * p.top_k
    s_pairs = torch.empty(P, dtype=torch.int32, device=device)
    offs = torch.empty(p.e + 1, dtype=torch.int32, device=device)
    kern.schedule_launch(ids, p.e, s_pairs, offs)
    return inp, pw, ids, wts, s_pairs, offs


def fc2_runner(p, pw, wts, s_pairs, offs, y, ys, cfg, q):
    rows = torch.full((p.m * p.top_k, p.h), float("nan"), dtype=torch.bfloat16, device=y.device)
    return rows, lambda: kern.fc2_launch(y, ys, pw.w2, pw.w2_scale, s_pairs, offs, wts, rows, q, cfg, p.top_k)


def check_rows(got, want, name):
    d = (got.float() - want.float()).abs()
    bound = 2 ** -7 * want.float().abs() + 1e-6  # two bf16 roundings of fp32 sums, summed differently
    ok = torch.isfinite(want)  # rows of dropped pairs are never written (NaN in both)
    assert torch.equal(ok, torch.isfinite(got)) and (d[ok] <= bound[ok]).all(), \
        f"{name}: {(d[ok] - bound[ok]).max().item():.3e}"


def run(shape_dims, ms, device, timer=None, programs=132):
    H, E, I, k = shape_dims
    checked = 0
    for M in ms:
        p = RoutedProblem(M, H, E, I, k, FP8, torch.bfloat16)
        base = routed_configs.choose(p, device).config
        base = dataclasses.replace(base, atomic_combine=False, fused_combine=False)
        inp, pw, ids, wts, s_pairs, offs = setup(p, device, M)
        xq, sx = quantize_per_token(inp.x)
        y = torch.empty(M * k, I, dtype=FP8, device=device)
        ys = torch.empty(M * k, -(-I // base.fc1_block_i), device=device)
        kern.fc1_launch(xq, pw.w1, pw.alpha1, sx, s_pairs, offs, y, ys, k, base)
        want, run_base = fc2_runner(p, pw, wts, s_pairs, offs, y, ys, base, base.fc1_block_i)
        run_base()
        picked = int(torch.zeros(E, dtype=torch.bool, device=device).index_fill_(0, ids.reshape(-1), True).sum())
        valid = int(((ids >= 0) & (ids < E)).sum())
        moved = picked * H * I * pw.w2.element_size() + valid * H * 2  # w2 of the picked experts + the rows
        ref_us = None
        for cfg in [base] + candidates(p, base, programs):
            got, go = fc2_runner(p, pw, wts, s_pairs, offs, y, ys, cfg, base.fc1_block_i)
            go()
            check_rows(got, want, f"M={M} {cfg.short()}")
            checked += 1
            if timer is None:
                continue
            us = timer(go)["us"]
            whole = timer(lambda: routed_experts(inp.x, pw, ids, wts, config=cfg))["us"]
            ref_us = ref_us or us
            print(f"M={M} {cfg.short()}: fc2 {us:.1f} us ({moved / (us * 1e6):.2f} TB/s) whole {whole:.1f} us "
                  f"fc2 vs choice {ref_us / us:.2f}x", flush=True)
    return checked


if "--check" in sys.argv:  # CPU interpreter: a tiny shape, each candidate's rows against the choice's
    n = run((256, 8, 256, 2), (1, 20), "cpu", programs=4)
    assert n >= 6, n  # the choice and at least two stream configs per M
    print(f"check passed: {n} FC2 configs against the choice's rows")
elif __name__ == "__main__":
    from densemoe.bench.common import read_ceiling
    from densemoe.shapes import SHAPES
    from densemoe.timing import Timer

    shape = sys.argv[1] if len(sys.argv) > 1 else "deepseek-v3-tp8"
    ms = [int(m) for m in (sys.argv[2] if len(sys.argv) > 2 else "16,64,128,512,2048,4096").split(",")]
    s = SHAPES[shape]
    timer = Timer(reps=20)
    print(f"# {shape} fp8 FC2 column stream; read ceiling {read_ceiling(timer)['tb_s']:.2f} TB/s")
    run((s.hidden, s.experts, s.inter, s.topk), ms, "cuda", timer)
