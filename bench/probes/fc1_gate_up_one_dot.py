"""Does FC1's k-loop gain from one MMA over gate and up together? (issue 19, docs/routed.md "The
floor of this pipeline".) The library's FC1 (dense and routed: ``kernels/triton/gate_up.py``)
multiplies each k-tile twice, x . wg^T and x . wu^T, each fp8 product added into its fp32
accumulator per k-tile (the promotion that keeps fp8 accurate). ptxas then waits after each of
the two wgmma groups (``routed_mma_waits.py``). Here the same loop in two forms, in a kernel of
this probe (not the package's): two dots of BLOCK_I columns, as the library does, or one dot of
2 * BLOCK_I columns over the gate and up rows loaded as one tile (one m64n256 wgmma group, one
wait a k-step). Each program is one (expert, row tile, column tile) of an even routing: every
expert gets ``rows`` gathered token rows (a random permutation of x, loaded through cp.async).

  python bench/probes/fc1_gate_up_one_dot.py --compile     (CPU: what the compiler makes of each)
  TRITON_INTERPRET=1 python bench/probes/fc1_gate_up_one_dot.py --check    (CPU: same bits)
  python bench/probes/fc1_gate_up_one_dot.py [qwen3-30b-a3b|deepseek-v3-tp8] [rows per expert,...]
                                                            (a CUDA GPU: checked, then timed)

The two forms do the same sums in the same order per output element, so their outputs must be
the same bits (checked before timing, and against a float32 torch reference within fp8's
rounding of y). Timed with the library's Timer (CUDA graphs, L2 flushed, medians); TFLOP/s of
the gate/up products; the weight bytes' floor at the read ceiling beside them.

Beside them, the library's routed FC1 (``kernels.triton.routed.fc1_launch``) on the same x, w
and rows (top-k 1, unit scales, the rows of expert e in the probe's order), pinned to each of the
probe's tiles with one and two programs per SM: its fp8 y, dequantised, is checked against the
same reference first. The fifth session's H200 run put the library's FC1 at 277 us where this
loop took 170 (Qwen3 M = 2048, the same tile); the sixth session's H100 run bisected it
(``--bisect``: the library 1.15x the loop on the same even routing) and found the rest in the
routing (``--ragged``: uniform top-8 routing 1.28-1.37x the even one; docs/routed-journal.md "Sixth
session"). ``--ragged --tails``: the same with FC1's tails (``fc1_tail_m``: an expert's rest of
a few rows rides on its last whole tile) against the plain tiles (eighth session).

  python bench/probes/fc1_gate_up_one_dot.py --bisect [shape] [rows,...]   (a CUDA GPU)
  python bench/probes/fc1_gate_up_one_dot.py --ragged [--tails] [shape,...] [M,...]  (a CUDA GPU)"""

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl

from densemoe._runtime import sm_count
from densemoe.kernels.triton.fp8 import amax_abs, clamp_e4m3, e4m3_scale

FP8 = torch.float8_e4m3fn


@triton.jit
def _fc1_loop_unit(pid, x_ptr, w_ptr, w_desc, tok_ptr, y_ptr, ys_ptr, H, I, ROWS, stride_xm, stride_wn, stride_ym,
                   BM: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr, ONE_DOT: tl.constexpr,
                   STAGES: tl.constexpr, TMA: tl.constexpr, FP8_OUT: tl.constexpr, K_MASK: tl.constexpr):
    """Unit pid = (e, t, c): expert e's row tile t (rows of tok) and column tile c of I; y = silu(g) * u
    in bf16, or (FP8_OUT) in fp8 with one scale per (row, BI columns) as the library's epilogue
    (no other scales: the loop is what is compared). TMA: the weight tiles through a descriptor (as
    the library); K_MASK: x's loads masked by k < H too (as the library)."""
    tiles = tl.cdiv(ROWS, BM)
    c = pid % tl.cdiv(I, BI)
    t = pid // tl.cdiv(I, BI)
    e = t // tiles
    r0 = e * ROWS + (t % tiles) * BM
    rows = r0 + tl.arange(0, BM)
    r_ok = rows < e * ROWS + ROWS
    tok = tl.load(tok_ptr + rows, mask=r_ok, other=0)
    x_rows = tok.to(tl.int64) * stride_xm
    offs_k = tl.arange(0, BK)
    if ONE_DOT:  # gate rows then up rows in one [2 BI, BK] tile, one dot of 2 BI columns
        r = tl.arange(0, 2 * BI)
        w_rows = (e * 2 * I + (r // BI) * I + c * BI + r % BI).to(tl.int64) * stride_wn
        acc = tl.zeros((BM, 2 * BI), dtype=tl.float32)
        for k0 in tl.range(0, H, BK, num_stages=STAGES):
            xt = tl.load(x_ptr + x_rows[:, None] + (k0 + offs_k)[None, :], mask=r_ok[:, None], other=0.0)
            w = tl.load(w_ptr + w_rows[:, None] + (k0 + offs_k)[None, :])
            acc = tl.dot(xt, tl.trans(w), acc, max_num_imprecise_acc=BK)
        g, u = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BI)), (0, 2, 1)))
    else:  # the library's form: two dots of BI columns
        r = tl.arange(0, BI)
        g_rows = (e * 2 * I + c * BI + r).to(tl.int64) * stride_wn
        u_rows = g_rows + I * stride_wn
        g = tl.zeros((BM, BI), dtype=tl.float32)
        u = tl.zeros((BM, BI), dtype=tl.float32)
        for k0 in tl.range(0, H, BK, num_stages=STAGES):
            kk = k0 + offs_k
            if K_MASK:
                xt = tl.load(x_ptr + x_rows[:, None] + kk[None, :], mask=r_ok[:, None] & (kk < H)[None, :], other=0.0)
            else:
                xt = tl.load(x_ptr + x_rows[:, None] + kk[None, :], mask=r_ok[:, None], other=0.0)
            if TMA:
                wg = w_desc.load([e * 2 * I + c * BI, k0])
                wu = w_desc.load([e * 2 * I + I + c * BI, k0])
            else:
                wg = tl.load(w_ptr + g_rows[:, None] + kk[None, :])
                wu = tl.load(w_ptr + u_rows[:, None] + kk[None, :])
            g = tl.dot(xt, tl.trans(wg), g, max_num_imprecise_acc=BK)
            u = tl.dot(xt, tl.trans(wu), u, max_num_imprecise_acc=BK)
    v = g * tl.sigmoid(g) * u
    cols = c * BI + tl.arange(0, BI)
    if FP8_OUT:
        sc = e4m3_scale(amax_abs(v, 1))
        v = clamp_e4m3(tl.math.div_rn(v, sc[:, None]))
        tl.store(ys_ptr + rows * tl.cdiv(I, BI) + c, sc, mask=r_ok)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], v.to(y_ptr.dtype.element_ty),
             mask=r_ok[:, None])


@triton.jit
def _fc1_loop_kernel(x_ptr, w_ptr, w_desc, tok_ptr, y_ptr, ys_ptr, H, I, ROWS, N_UNITS, NUM_PROGS, stride_xm,
                     stride_wn, stride_ym, BM: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr,
                     ONE_DOT: tl.constexpr, STAGES: tl.constexpr, TMA: tl.constexpr = False,
                     FP8_OUT: tl.constexpr = False, K_MASK: tl.constexpr = False, PERSIST: tl.constexpr = False):
    """One unit a program, or (PERSIST) NUM_PROGS programs taking the units in turn (as the
    library's persistent loop)."""
    if PERSIST:
        for u in tl.range(tl.program_id(0), N_UNITS, NUM_PROGS):
            _fc1_loop_unit(u, x_ptr, w_ptr, w_desc, tok_ptr, y_ptr, ys_ptr, H, I, ROWS, stride_xm, stride_wn,
                           stride_ym, BM, BI, BK, ONE_DOT, STAGES, TMA, FP8_OUT, K_MASK)
    else:
        _fc1_loop_unit(tl.program_id(0), x_ptr, w_ptr, w_desc, tok_ptr, y_ptr, ys_ptr, H, I, ROWS, stride_xm,
                       stride_wn, stride_ym, BM, BI, BK, ONE_DOT, STAGES, TMA, FP8_OUT, K_MASK)


CONFIGS = ((64, 4, 2), (64, 4, 3), (128, 8, 3), (128, 8, 4))  # (rows a tile, warps, stages)


def launch(x, w, tok, y, E, I, rows, bm, warps, stages, one_dot, bi=128, bk=128, ys=None, tma=False, k_mask=False,
           persist=0):
    """persist > 0: that many programs per SM, persistent; ys [rows, I / bi] fp32 with an fp8 y."""
    H = x.shape[1]
    units = E * triton.cdiv(rows, bm) * triton.cdiv(I, bi)
    progs = min(units, persist * sm_count(x.device)) if persist else units
    w_desc = w
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        w_desc = TensorDescriptor.from_tensor(w, [bi, bk])
    fp8_out = y.dtype == FP8
    _fc1_loop_kernel[(progs,)](x, w, w_desc, tok, y, ys if fp8_out else y, H, I, rows, units, progs, x.stride(0),
                               w.stride(0), y.stride(0), BM=bm, BI=bi, BK=bk, ONE_DOT=one_dot, STAGES=stages,
                               TMA=tma, FP8_OUT=fp8_out, K_MASK=k_mask, PERSIST=bool(persist), num_warps=warps,
                               num_stages=stages)


def inputs(H, E, I, rows, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    M = E * rows  # one token row per (expert, slot): x has as many rows as pairs, permuted
    x = (torch.randn(M, H, generator=g) * 0.5).to(FP8).to(device)
    w = (torch.randn(E * 2 * I, H, generator=g) * 0.5).to(FP8).to(device)
    tok = torch.randperm(M, generator=g).to(torch.int32).to(device)
    return x, w, tok


def reference(x, w, tok, E, I, rows):
    xf, wf = x.float()[tok.long()], w.float().view(E, 2 * I, -1)
    out = []
    for e in range(E):
        h = xf[e * rows:(e + 1) * rows] @ wf[e].T
        gt, up = h[:, :I], h[:, I:]
        out.append(torch.nn.functional.silu(gt) * up)
    return torch.cat(out)


def library_launch(x, w, tok, E, I, rows, bm, warps, stages, programs_per_sm):
    """The library's routed FC1 on the probe's rows: y fp8 [P, I] and its scales, and the call."""
    from densemoe.kernels.triton import routed as kern
    cfg = kern.RoutedConfig(block_m=bm, fc1_block_i=128, fc1_block_k=128, fc1_warps=warps, fc1_stages=stages,
                            programs_per_sm=programs_per_sm)
    P = E * rows
    offsets = (torch.arange(E + 1, device=x.device) * rows).to(torch.int32)
    alpha1 = torch.ones(E, device=x.device)
    xs = torch.ones(x.shape[0], device=x.device)
    y = torch.empty(P, I, device=x.device, dtype=FP8)
    ys = torch.empty(P, triton.cdiv(I, 128), device=x.device)
    return y, ys, lambda: kern.fc1_launch(x, w, alpha1, xs, tok, offsets, y, ys, 1, cfg)


def check_library(x, w, tok, E, I, rows, ref, configs, programs=(1, 2)):
    for bm, warps, stages in configs:
        for p in programs:
            y, ys, run = library_launch(x, w, tok, E, I, rows, bm, warps, stages, p)
            run()
            deq = y.float() * ys.repeat_interleave(128, 1)[:, :I]
            err = ((deq - ref).norm() / ref.norm()).item()
            assert err < 5e-2, f"library FC1 {bm} rows, {p} programs an SM: {err:.2e} from the reference"


def check(H, E, I, rows, device, configs):
    x, w, tok = inputs(H, E, I, rows, device)
    ref = reference(x, w, tok, E, I, rows)
    for bm, warps, stages in configs:
        ys = []
        for one_dot in (False, True):
            y = torch.full((E * rows, I), float("nan"), device=device, dtype=torch.bfloat16)
            launch(x, w, tok, y, E, I, rows, bm, warps, stages, one_dot)
            ys.append(y)
        assert torch.equal(ys[0], ys[1]), f"{bm} rows: one dot differs from two"
        err = ((ys[1].float() - ref).norm() / ref.norm()).item()
        assert err < 2e-2, f"{bm} rows: {err:.2e} from the float32 reference"  # bf16 rounding of y
    check_library(x, w, tok, E, I, rows, ref, configs)  # fp8 y: its rounding, ~2e-2
    return x, w, tok


# the steps from the probe's loop to the library's FC1 (docs/routed-journal.md "Sixth session"): each alone, then all
VARIANTS = (("loop", {}), ("k mask", dict(k_mask=True)), ("tma", dict(tma=True)), ("fp8 y", dict(fp8=True)),
            ("persistent 1/SM", dict(persist=1)), ("persistent 2/SM", dict(persist=2)),
            ("all, 1/SM", dict(k_mask=True, tma=True, fp8=True, persist=1)),
            ("all, 2/SM", dict(k_mask=True, tma=True, fp8=True, persist=2)),
            ("all but persistent", dict(k_mask=True, tma=True, fp8=True)))


def variant(x, w, tok, E, I, rows, bm, warps, stages, v):
    """(y, ys, the call) of one bisection step; fp8 y with its scales where v asks."""
    v = dict(v)
    fp8 = v.pop("fp8", False)
    y = torch.full((E * rows, I), float("nan"), device=x.device, dtype=torch.bfloat16).to(FP8 if fp8 else torch.bfloat16)
    ys = torch.full((E * rows, triton.cdiv(I, 128)), float("nan"), device=x.device) if fp8 else None
    return y, ys, lambda: launch(x, w, tok, y, E, I, rows, bm, warps, stages, False, ys=ys, **v)


def bisect(H, E, I, rows, device, configs, timer=None):
    """Each step checked (bf16 y: the loop's bits; fp8 y: against the reference, within its rounding),
    then timed where a timer is given: {(config, step): us}."""
    x, w, tok = inputs(H, E, I, rows, device)
    ref = reference(x, w, tok, E, I, rows)
    out = {}
    for bm, warps, stages in configs:
        base = None
        for name, v in VARIANTS:
            y, ys, run = variant(x, w, tok, E, I, rows, bm, warps, stages, v)
            run()
            if ys is None:
                base = y.clone() if base is None else base
                assert torch.equal(y, base), f"{name}: other bits than the loop's"
            else:
                err = ((y.float() * ys.repeat_interleave(128, 1)[:, :I] - ref).norm() / ref.norm()).item()
                assert err < 5e-2, f"{name}: {err:.2e} from the reference"
            if timer is not None:
                out[(bm, warps, stages), name] = timer(run)["us"]
        if timer is not None:
            for p in (1, 2):
                out[(bm, warps, stages), f"library {p}/SM"] = timer(
                    library_launch(x, w, tok, E, I, rows, bm, warps, stages, p)[2])["us"]
    return out


# (rows a tile, warps, stages, programs an SM): the table's 64-row tile at Qwen3 M = 2048 and the
# probe's fastest 128-row tile. The tail tiles this mode timed on 2026-12-05 (sixth session, H100:
# slower everywhere) are in patches/issue19-tail-tiles.mbox.gz.
# (block_m, warps, stages, programs an SM[, fc1_tail_m]); TAILS: the tails against the plain tiles
RAGGED = ((64, 4, 2, 2), (64, 4, 2, 1), (128, 8, 4, 1), (128, 8, 3, 1))
TAILS = ((64, 4, 2, 2), (64, 8, 2, 2), (64, 8, 2, 2, 16), (64, 8, 2, 2, 32), (64, 8, 4, 1, 16), (128, 8, 4, 1),
         (128, 8, 4, 1, 16), (128, 8, 3, 1, 32))


def ragged(dims, m, device, timer=None, seed=0, configs=RAGGED):
    """The library's routed FC1 on uniform top-k routing of m tokens (ragged experts: each
    expert's last tile part-filled) at the tiles of ``configs``: each checked against the first
    (one fp8 step of y at its scale), then timed where a timer is given: {config: us}. dims: (H, E,
    I, top-k). Beside the even routing of ``bisect``, it shows what the ragged tiles cost."""
    from densemoe.kernels.triton import routed as kern

    H, E, I, k = dims
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(m, H, generator=g) * 0.5).to(FP8).to(device)
    w = (torch.randn(E * 2 * I, H, generator=g) * 0.5).to(FP8).to(device)
    ids = torch.rand(m, E, generator=g).topk(k, dim=1).indices.to(device)
    srt = torch.empty(m * k, dtype=torch.int32, device=device)
    off = torch.empty(E + 1, dtype=torch.int32, device=device)
    kern.schedule_launch(ids, E, srt, off)
    alpha1, xs = torch.ones(E, device=device), torch.ones(m, device=device)
    out, first = {}, None
    for bm, warps, stages, pps, *tail in configs:
        cfg = kern.RoutedConfig(block_m=bm, fc1_block_i=128, fc1_block_k=128, fc1_warps=warps, fc1_stages=stages,
                                programs_per_sm=pps, fc1_tail_m=tail[0] if tail else 0)
        y = torch.full((m * k, I), float("nan"), device=device).to(FP8)
        ys = torch.full((m * k, triton.cdiv(I, 128)), float("nan"), device=device)
        run = (lambda cfg=cfg, y=y, ys=ys: kern.fc1_launch(x, w, alpha1, xs, srt, off, y, ys, k, cfg))
        run()
        deq = y.float() * ys.repeat_interleave(128, 1)[:, :I]
        assert not deq.isnan().any(), f"{cfg.short()}: a row of y unwritten"
        if first is None:
            first = (deq, ys.repeat_interleave(128, 1)[:, :I])
        else:
            assert ((deq - first[0]).abs() <= 32 * torch.maximum(first[1], ys.repeat_interleave(128, 1)[:, :I])).all(), cfg
        if timer is not None:
            out[cfg.short().split("/fc2")[0] + f"/p{pps}"] = timer(run)["us"]
    return out


def compile_report():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    bins = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    exe = next((os.path.join(bins, b) for b in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bins, b))))
    sig = dict(x_ptr="*fp8e4nv", w_ptr="*fp8e4nv", w_desc="*fp8e4nv", tok_ptr="*i32", y_ptr="*bf16", ys_ptr="*fp32")
    for bm, warps, stages in CONFIGS:
        for one_dot in (False, True):
            const = dict(BM=bm, BI=128, BK=128, ONE_DOT=one_dot, STAGES=stages, TMA=False, FP8_OUT=False, K_MASK=False,
                         PERSIST=False)
            full = {n: sig.get(n, "constexpr" if n in const else "i32") for n in _fc1_loop_kernel.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(_fc1_loop_kernel.arg_names)
                     if n not in const and n not in ("ROWS", "N_UNITS", "NUM_PROGS")}
            k = triton.compile(ASTSource(_fc1_loop_kernel, full, const, attrs), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=warps, num_stages=stages))
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(k.asm["ptx"])
                f.flush()
                log = subprocess.run([exe, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                     text=True).stderr
            mma = sorted(set(re.findall(r"wgmma.mma_async.sync.aligned.(m\d+n\d+k\d+)", k.asm["ptx"])))
            regs = re.findall(r"Used (\d+) registers", log)
            print(f"{bm} rows, {warps} warps, {stages} stages, {'one dot ' if one_dot else 'two dots'}: wgmma {mma}, "
                  f"ptxas inserted {log.count('C7517')} warpgroup.wait, {regs[-1] if regs else '?'} registers, "
                  f"shared memory {k.metadata.shared} B")


if "--compile" in sys.argv:
    compile_report()
elif "--check" in sys.argv:
    check(256, 3, 256, 40, "cpu", ((64, 4, 2),))
    bisect(256, 3, 256, 40, "cpu", ((64, 4, 2),))
    ragged((256, 4, 256, 2), 300, "cpu", configs=((64, 4, 2, 2), (128, 8, 4, 1), (64, 8, 2, 2, 16), (128, 8, 3, 1, 32)))
    print("check passed")
elif "--ragged" in sys.argv:  # a CUDA GPU: the library's FC1 on uniform (ragged) routing
    from densemoe.timing import Timer

    args = [a for a in sys.argv[1:] if a not in ("--ragged", "--tails")]
    from densemoe.shapes import SHAPES

    timer = Timer(reps=20)
    for shape in (args[0] if args else "qwen3-30b-a3b,deepseek-v3-tp8").split(","):
        s = SHAPES[shape]
        for m in [int(v) for v in (args[1] if len(args) > 1 else "512,2048,4096").split(",")]:
            res = ragged((s.hidden, s.experts, s.inter, s.topk), m, "cuda", timer,
                         configs=TAILS if "--tails" in sys.argv else RAGGED)
            print(f"ragged {shape} M={m} (us): " + ", ".join(f"{c} {us:.1f}" for c, us in res.items()), flush=True)
elif "--bisect" in sys.argv:  # a CUDA GPU: the steps from the loop to the library, each checked, then timed
    from densemoe.shapes import SHAPES
    from densemoe.timing import Timer

    args = [a for a in sys.argv[1:] if a != "--bisect"]
    shape = args[0] if args else "qwen3-30b-a3b"
    s = SHAPES[shape]
    timer = Timer(reps=20)
    for rows in [int(r) for r in (args[1] if len(args) > 1 else "128").split(",")]:
        flops = 2 * E_ * rows * 2 * s.inter * s.hidden if (E_ := s.experts) else 0
        res = bisect(s.hidden, s.experts, s.inter, rows, "cuda", ((64, 4, 2), (128, 8, 4)), timer)
        for cfg in ((64, 4, 2), (128, 8, 4)):
            line = ", ".join(f"{n} {us:.1f}" for (c, n), us in res.items() if c == cfg)
            print(f"bisect {shape} rows={rows} {cfg[0]}x128 w{cfg[1]} st{cfg[2]} (us; {flops / 1e6:.0f} MFLOP): {line}",
                  flush=True)
elif __name__ == "__main__":
    from densemoe.shapes import SHAPES
    from densemoe.timing import Timer

    shape = sys.argv[1] if len(sys.argv) > 1 else "qwen3-30b-a3b"
    rows_list = [int(r) for r in (sys.argv[2] if len(sys.argv) > 2 else "64,128,256").split(",")]
    s = SHAPES[shape]
    H, E, I = s.hidden, s.experts, s.inter
    timer = Timer(reps=20)
    print(f"# {shape}: FC1's k-loop (gathered fp8 x, fp8 w, fp32 promotion per 128-wide k-tile), two dots of 128 "
          f"columns against one of 256; every expert {rows_list} rows")
    for rows in rows_list:
        x, w, tok = check(H, E, I, rows, "cuda", CONFIGS)
        flops = 2 * E * rows * 2 * I * H
        for bm, warps, stages in CONFIGS:
            y = torch.empty(E * rows, I, device="cuda", dtype=torch.bfloat16)
            t = [timer(lambda od=od: launch(x, w, tok, y, E, I, rows, bm, warps, stages, od))["us"] for od in (False, True)]
            lib = [timer(library_launch(x, w, tok, E, I, rows, bm, warps, stages, p)[2])["us"] for p in (1, 2)]
            print(f"rows={rows} {bm}x128 w{warps} st{stages}: two dots {t[0]:.1f} us ({flops / t[0] / 1e6:.0f} TFLOP/s), "
                  f"one dot {t[1]:.1f} us ({flops / t[1] / 1e6:.0f} TFLOP/s), {t[0] / t[1]:.2f}x; the library's FC1 "
                  f"{lib[0]:.1f} us (1 program an SM), {lib[1]:.1f} (2); weights' floor "
                  f"{w.numel() / 4.58e6:.1f} us at 4.58 TB/s", flush=True)
