"""The timer of the tuner and the benchmarks: CUDA graphs behind an L2 flush by reading, medians.

GPU only (it allocates its flush buffer on the current CUDA device when made). Nothing here is
imported at ``import densemoe``'s hot paths: the tuner makes a ``Timer`` when it times.
"""

from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl


class Timer:
    """Times a callable: CUDA-graph captured (launch overhead out, as in serving), L2 flushed
    before every replay, CUDA events around the replay, median of ``reps``.

    The flush *reads* 256 MB (5x the L2). Flushing by writing (``buf.zero_()``, as
    triton.testing.do_bench does) leaves tens of MB of dirty lines whose write-back to HBM then
    overlaps the timed kernel and slows a bandwidth-bound one (``docs/fc2-triton.md``)."""

    def __init__(self, reps: int = 50, warmup: int = 3, flush_mb: int = 256, settle: int = 100):
        self.reps, self.warmup, self.settle = reps, warmup, settle
        n = flush_mb * 2**20 // 4
        self._flush_buf = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device="cuda")
        self._flush_out = torch.empty(triton.cdiv(n, 4096 * 8), dtype=torch.int32, device="cuda")

    def flush(self) -> None:
        n = self._flush_buf.numel()
        read_kernel[(self._flush_out.numel(),)](self._flush_buf, self._flush_out, n, BLOCK=4096, ITERS=8)

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
        What ``__call__`` adds on top is the launch of a one-op graph (``docs/skipping.md``)."""
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


@triton.jit
def read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
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
