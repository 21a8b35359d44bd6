"""Does the routed fp8 FC2 gain from keeping its MMAs in flight? (issue 19, docs/routed-journal.md "First
H200 measurements", next step 2.) The library's grouped FC2 multiplies each k-step's product by
y's group scale, so each step waits for its wgmma (`routed_mma_waits.py`: pendings 0). Where one
FC1 tile covers all of I (DeepSeek-V3 TP8: I = 256, fc1_block_i 256), y has one scale per pair
row; then FC2 can accumulate over I like the bf16 path (async wgmma, the k-tile promotion of
gate_up.py) and scale once at the end. This probe holds that variant as a copy of the library's
FC2 unit (rows mode, no block scales, not in the package) and, on the same y and schedule:

1. checks it against the library's FC2 (same rows within two bf16 roundings);
2. times both (Timer: CUDA graphs, L2 flushed, medians) at the given M, with the tuned config of
   each M but fc1_block_i 256 (so Q = I), not flattened, and w2 through pointer loads in both
   (the copy has no TMA path).

Compiled for sm_90a (CPU), the copy keeps one MMA in flight (`warp_group_dot_wait {pendings =
1}`), where the library's fp8 FC2 keeps none.

    python bench/probes/routed_fc2_rowscale.py [M,...]            (a CUDA GPU; DeepSeek-V3 TP8 fp8)
    TRITON_INTERPRET=1 python bench/probes/routed_fc2_rowscale.py --check   (CPU: a tiny shape)
"""

import dataclasses
import sys

import torch
import triton
import triton.language as tl

from densemoe.kernels.common import RoutedProblem
from densemoe.kernels.triton import routed as kern
from densemoe.kernels.triton.routed import _tile_at, _tile_table
from densemoe.ops import routed_configs
from densemoe.quant import FP8, quantize_per_token


@triton.jit
def _fc2_rowscale_kernel(y_ptr, ys_ptr, w_ptr, w2s_ptr, sorted_ptr, offsets_ptr, tw_ptr, out_ptr,
                         H, I, E, NUM_PROGS, TOP_K, stride_ym, stride_ysm, stride_wn, stride_om,
                         E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SWAP_AB: tl.constexpr, NUM_STAGES: tl.constexpr):
    run, tiles, n_tiles = _tile_table(offsets_ptr, E, BLOCK_M, E_PAD)
    n_tiles_n = tl.cdiv(H, BLOCK_N)
    for u in tl.range(tl.program_id(0), n_tiles * n_tiles_n, NUM_PROGS):
        t = u // n_tiles_n
        nt = u % n_tiles_n
        e, r0, r1 = _tile_at(t, run, tiles, offsets_ptr, BLOCK_M, E_PAD)
        rows = r0 + tl.arange(0, BLOCK_M)
        r_ok = rows < r1
        offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < H
        y_rows = rows.to(tl.int64) * stride_ym
        w_rows = offs_n.to(tl.int64) * stride_wn + e * I
        offs_k = tl.arange(0, BLOCK_K)
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(0, I, BLOCK_K, num_stages=NUM_STAGES):
            kk = k0 + offs_k
            k_ok = kk < I
            a = tl.load(y_ptr + y_rows[:, None] + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptr + w_rows[:, None] + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if SWAP_AB:  # accumulated over I: the MMA stays in flight; one y scale per row, at the end
                acc = tl.dot(b, tl.trans(a), acc, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BLOCK_K)
        if SWAP_AB:
            acc = tl.trans(acc)
        sy = tl.load(ys_ptr + rows.to(tl.int64) * stride_ysm, mask=r_ok, other=0.0)
        pair = tl.load(sorted_ptr + rows, mask=r_ok, other=0)
        wt = tl.load(tw_ptr + pair, mask=r_ok, other=0.0) * tl.load(w2s_ptr + e) * sy
        v = acc * wt[:, None]
        tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :], v.to(out_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & n_ok[None, :])


def fc2_rowscale(y, ys, w2, w2_scale, s_pairs, offs, wts, rows, cfg, top_k, num_sms):
    H, E = w2.shape[0], w2_scale.shape[0]
    I = w2.shape[1] // E
    progs = num_sms * cfg.programs_per_sm
    _fc2_rowscale_kernel[(progs,)](
        y, ys, w2, w2_scale, s_pairs, offs, wts, rows, H, I, E, progs, top_k, y.stride(0), ys.stride(0),
        w2.stride(0), rows.stride(0), E_PAD=triton.next_power_of_2(E), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.fc2_block_n, BLOCK_K=cfg.fc2_block_k, SWAP_AB=cfg.fc2_swap_ab, NUM_STAGES=cfg.fc2_stages,
        num_warps=cfg.fc2_warps)


def case(M, H, E, I, k, device, cfg):
    """Weights, routing, schedule and FC1's y (one scale per row: fc1_block_i >= I) on ``device``."""
    from densemoe.tuning.ops import make_routed_inputs

    p = RoutedProblem(M, H, E, I, k, FP8, torch.bfloat16)
    inp = make_routed_inputs(p, device, seed=M)
    pw, ids, wts = inp.prepared, inp.topk_ids, inp.topk_weights.float()
    P = M * k
    s_pairs = torch.empty(P, dtype=torch.int32, device=device)
    offs = torch.empty(E + 1, dtype=torch.int32, device=device)
    kern.schedule_launch(ids, E, s_pairs, offs)
    xq, sx = quantize_per_token(inp.x)
    y = torch.empty(P, I, dtype=FP8, device=device)
    ys = torch.empty(P, -(-I // cfg.fc1_block_i), device=device)
    assert ys.shape[1] == 1, "one y scale per row needs fc1_block_i >= I"
    kern.fc1_launch(xq, pw.w1, pw.alpha1, sx, s_pairs, offs, y, ys, k, cfg)
    return pw, wts, s_pairs, offs, y, ys


def compare(M, H, E, I, k, device, cfg, num_sms):
    pw, wts, s_pairs, offs, y, ys = case(M, H, E, I, k, device, cfg)
    lib = torch.full((M * k, H), float("nan"), dtype=torch.bfloat16, device=device)
    new = torch.full_like(lib, float("nan"))
    run_lib = lambda: kern.fc2_launch(y, ys, pw.w2, pw.w2_scale, s_pairs, offs, wts, lib, cfg.fc1_block_i, cfg, k)  # noqa: E731
    run_new = lambda: fc2_rowscale(y, ys, pw.w2, pw.w2_scale, s_pairs, offs, wts, new, cfg, k, num_sms)  # noqa: E731
    run_lib()
    run_new()
    d = (new.float() - lib.float()).abs()
    bound = 2 ** -7 * lib.float().abs() + 1e-6  # two bf16 roundings of the same fp32 sums, summed differently
    assert torch.isfinite(new).all() and (d <= bound).all(), f"M={M}: {(d - bound).max().item():.3e}"
    return run_lib, run_new


if "--check" in sys.argv:  # CPU interpreter: a tiny shape, the probe kernel against the library's
    cfg = routed_configs.RoutedConfig(block_m=16, fc1_block_i=128, fc1_block_k=64, fc1_swap_ab=True,
                                      fc2_block_n=64, fc2_block_k=64, fc2_swap_ab=True, tma=False)
    for m in (1, 7, 20):
        compare(m, 128, 4, 128, 2, "cpu", cfg, 2)
        compare(m, 128, 4, 128, 2, "cpu", dataclasses.replace(cfg, fc1_swap_ab=False, fc2_swap_ab=False), 2)
    print("check passed")
else:
    from densemoe._runtime import sm_count
    from densemoe.shapes import SHAPES
    from densemoe.timing import Timer

    s = SHAPES["deepseek-v3-tp8"]
    timer = Timer(reps=20)
    sms = sm_count(torch.device("cuda"))
    print(f"# FC2 us, DeepSeek-V3 TP8 fp8, library (per-step scale) vs row scale (async), same y")
    for M in [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "16,64,128,512,2048").split(",")]:
        base = routed_configs.choose(RoutedProblem(M, s.hidden, s.experts, s.inter, s.topk, FP8, torch.bfloat16),
                                     "cuda").config
        cfg = dataclasses.replace(base, fc1_block_i=256, fc2_block_k=min(base.fc2_block_k, 256), flatten=False,
                                  atomic_combine=False, tma=False)  # both FC2s load w2 through pointers
        run_lib, run_new = compare(M, s.hidden, s.experts, s.inter, s.topk, "cuda", cfg, sms)
        a, b = timer(run_lib)["us"], timer(run_new)["us"]
        print(f"M={M} {cfg.short()}: library {a:.1f} row-scale {b:.1f} ({a / b:.2f}x)", flush=True)
