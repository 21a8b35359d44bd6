"""Timing, hardware ceilings and baselines shared by the benchmarks (GPU only)."""

from __future__ import annotations

import statistics
import subprocess

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn


class Timer:
    """Times a callable: CUDA-graph captured (launch overhead out, as in serving), L2 flushed
    before every replay, CUDA events around the replay, median of ``reps``.

    The flush *reads* 256 MB (5x the L2). Flushing by writing (``buf.zero_()``, as
    triton.testing.do_bench does) leaves ~50 MB of dirty lines whose write-back to HBM then
    overlaps the timed kernel and costs a bandwidth-bound kernel 10-20 us on an H100 (seen here:
    Nsight Compute put our M=16 FC2 kernel at 157 us while write-flushed events said 166-172)."""

    def __init__(self, reps: int = 50, warmup: int = 3, flush_mb: int = 256, settle: int = 100):
        self.reps, self.warmup, self.settle = reps, warmup, settle
        n = flush_mb * 2**20 // 4
        self._flush_buf = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device="cuda")
        self._flush_out = torch.empty(triton.cdiv(n, 4096 * 8), dtype=torch.int32, device="cuda")

    def flush(self) -> None:
        n = self._flush_buf.numel()
        _read_kernel[(self._flush_out.numel(),)](self._flush_buf, self._flush_out, n, BLOCK=4096, ITERS=8)

    def __call__(self, fn, graph: bool = True, reps: int | None = None) -> dict:
        """``reps`` overrides the timer's own count for this call."""
        reps = self.reps if reps is None else reps
        for _ in range(self.settle):  # ~10 ms of reads first: clocks back up after an idle GPU (a compile)
            self.flush()
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        run = capture(fn)[0].replay if graph else fn
        times = []
        for _ in range(reps):
            self.flush()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        times.sort()
        return {"us": statistics.median(times), "us_min": times[0],
                "us_p90": times[int(0.9 * (len(times) - 1))]}

    def in_graph(self, fn, reps: int | None = None) -> dict:
        """``fn`` inside one CUDA graph right behind the L2 flush, as it runs inside a serving
        engine's graph of a whole step (no graph launch of its own): the median over replays of
        the graph [flush; fn] minus the median over replays of [flush], the two replayed
        alternately with events around each (``2 * reps`` replays each, default 2x the timer's).
        What ``__call__`` adds on top is the launch of a one-op graph: an empty kernel takes 3.3 us
        there and 1.2 here (H100, ``bench/experiments/ingraph_timer_probe.py``)."""
        reps = 2 * (self.reps if reps is None else reps)
        for _ in range(self.settle):
            self.flush()
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        g1 = capture(lambda: (self.flush(), fn()))[0]
        g0 = capture(self.flush)[0]
        t1, t0 = [], []
        for i in range(reps + self.warmup):
            for g, t in ((g1, t1), (g0, t0)):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                g.replay()
                end.record()
                end.synchronize()
                if i >= self.warmup:
                    t.append(start.elapsed_time(end) * 1e3)
        return {"us": statistics.median(t1) - statistics.median(t0), "flush_us": statistics.median(t0)}

    def compare(self, fns: list, rounds: int = 3, reps: int | None = None) -> list[dict]:
        """Time several callables fairly: ``rounds`` interleaved rounds (A, B, A, B, ...), each
        a full timing; per callable ``us`` is the median of its round medians, ``us_min`` the
        least sample, ``us_rounds`` the round medians. A slow spell of the GPU then lands on
        one round of each, not on one callable."""
        per = [[] for _ in fns]
        for _ in range(rounds):
            for i, fn in enumerate(fns):
                per[i].append(self(fn, reps=reps))
        out = []
        for rs in per:
            meds = sorted(r["us"] for r in rs)
            out.append({"us": meds[len(meds) // 2], "us_min": min(r["us_min"] for r in rs),
                        "us_p90": sorted(r["us_p90"] for r in rs)[len(rs) // 2], "us_rounds": [r["us"] for r in rs]})
        return out


def capture(fn) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, fn's output inside it): one warm-up call on a side stream, then the capture."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


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
    last = max(i for i, e in enumerate(evs) if "_read_kernel" in e.name)
    t0 = evs[last].time_range.end
    return [(e.name, e.time_range.start - t0, e.time_range.end - e.time_range.start) for e in evs[last + 1:]]


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    base = pid.to(tl.int64) * BLOCK * ITERS
    for i in tl.range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + pid, tl.reduce(acc, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def read_ceiling(timer: Timer, gib: float = 2.0) -> dict:
    """Measured streaming-read bandwidth (TB/s) over ``gib`` GiB: a Triton read kernel (several
    block sizes) and torch.sum; the best is the ceiling."""
    n = int(gib * 2**30) // 4
    x = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device="cuda")
    res = {}
    for block, iters in ((4096, 8), (2048, 16), (8192, 4)):
        grid = triton.cdiv(n, block * iters)
        out = torch.empty(grid, dtype=torch.int32, device="cuda")
        t = timer(lambda: _read_kernel[(grid,)](x, out, n, BLOCK=block, ITERS=iters), graph=False)
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
