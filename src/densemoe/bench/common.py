"""Hardware ceilings, profiles and provenance shared by the benchmarks (GPU only). The timer
itself is ``densemoe.timing`` (the tuner uses it too)."""

from __future__ import annotations

import subprocess

import torch
import triton

from densemoe.timing import Timer, capture, read_kernel

FP8 = torch.float8_e4m3fn


def graph_kernels(fn, timer: Timer, replays: int = 5) -> list[tuple[str, float, float]]:
    """The kernels of ``fn`` captured in a CUDA graph, from torch.profiler over ``replays``
    replays each after the timer's L2 flush: (name, start after the last flush ends, duration)
    in us, for the last replay."""
    g = capture(fn)[0]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            timer.flush()
            g.replay()
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    last = max(i for i, e in enumerate(evs) if "read_kernel" in e.name)
    t0 = evs[last].time_range.end
    return [(e.name, e.time_range.start - t0, e.time_range.end - e.time_range.start) for e in evs[last + 1:]]


def read_ceiling(timer: Timer, gib: float = 2.0) -> dict:
    """Measured streaming-read bandwidth (TB/s) over ``gib`` GiB: a Triton read kernel (several
    block sizes) and torch.sum; the best is the ceiling."""
    n = int(gib * 2**30) // 4
    x = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device="cuda")
    res = {}
    for block, iters in ((4096, 8), (2048, 16), (8192, 4)):
        grid = triton.cdiv(n, block * iters)
        out = torch.empty(grid, dtype=torch.int32, device="cuda")
        t = timer(lambda: read_kernel[(grid,)](x, out, n, BLOCK=block, ITERS=iters), graph=False)
        res[f"triton_read_b{block}_i{iters}"] = n * 4 / t["us"] / 1e6
    t = timer(lambda: x.sum(), graph=False)
    res["torch_sum"] = n * 4 / t["us"] / 1e6
    t = timer(lambda: x.view(torch.float32).sum(), graph=False)
    res["torch_sum_f32"] = n * 4 / t["us"] / 1e6
    del x
    torch.cuda.empty_cache()
    return {"tb_s": max(res.values()), "variants": res}


def peak_tflops(timer: Timer, size: int = 8192) -> dict:
    """Measured dense GEMM peaks (cuBLAS through PyTorch) on random data: fp8 and bf16."""
    a = torch.randn(size, size, device="cuda").to(torch.bfloat16)
    b = torch.randn(size, size, device="cuda").to(torch.bfloat16)
    flops = 2 * size**3
    bf16 = flops / timer(lambda: a @ b.T, graph=False)["us"] / 1e6
    a8, b8 = a.to(FP8), b.to(FP8)
    one = torch.ones((), device="cuda")
    fp8 = flops / timer(lambda: torch._scaled_mm(a8, b8.T, scale_a=one, scale_b=one,
                                                 out_dtype=torch.bfloat16), graph=False)["us"] / 1e6
    return {"bf16": bf16, "fp8": fp8}


def git_commit() -> str:
    try:
        c = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                           check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return c + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"
