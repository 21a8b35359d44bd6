"""Compile a sweep's candidates before timing them, Triton's in parallel worker processes.

Compiling, not timing, is what a tuning sweep spends its time on: one (shape, dtype) sweep over
the sweep's token counts compiles a few hundred kernels at about a second each, while timing one
candidate takes tens of milliseconds. So, before the timing loop:

- **Triton** candidates run once each in ``workers`` spawned processes. Triton keeps what it
  compiles in its on-disk cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), keyed by
  source, constexprs and argument specialisation; the workers run the tuner's exact calls (same
  shapes, dtypes, token count), so the tuner's own first call of each candidate only loads the
  binary.
- **CuTe DSL** candidates compile in this process meanwhile: ``compile_fc2`` / ``compile_fc1``
  are keyed by config and model shape (N or H, E, I), not by M, and their in-process caches
  cannot be shared with workers.

Nothing here decides a result. A candidate that fails in a worker is simply left to the timing
loop, which compiles it again and reports the failure; a pool that cannot start (no CUDA, a
sandbox that forbids processes) leaves every compile to the timing loop.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from densemoe.kernels.common import Fc1Problem, Fc2Problem, RoutedProblem
from densemoe.kernels.cute import fc1_sm90, fc2_sm90
from densemoe.tuning.ops import op_of


@dataclasses.dataclass
class PrecompileStats:
    triton_jobs: int = 0
    triton_ok: int = 0
    cute_configs: int = 0
    cute_ok: int = 0
    workers: int = 0
    seconds: float = 0.0
    error: str = ""

    def line(self) -> str:
        s = (f"precompiled {self.triton_ok}/{self.triton_jobs} Triton runs in {self.workers} processes and "
             f"{self.cute_ok}/{self.cute_configs} CuTe configs in {self.seconds:.0f} s")
        return s + (f" ({self.error})" if self.error else "")


def default_workers() -> int:
    """Half the CPUs, at most 8 (each worker holds a CUDA context and one weight tensor)."""
    return max(0, min(8, (os.cpu_count() or 2) // 2))


def _worker(jobs: list, device: str) -> int:
    """Run each (problem, Triton config) once on ``device``; returns how many ran. Inputs are
    made once per token count and the weights once per process."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    inputs, weights, ran = {}, {}, 0
    for p, cfg in jobs:
        spec = op_of(p)
        key = (spec.name, p)
        if key not in inputs:
            wkey = (spec.name, p.n, p.k, p.dtype, getattr(p, "block", 0))  # block-scaled weights apart
            made, shared = spec.make_inputs(p, device, p.m, weights.get(wkey))
            weights = {wkey: shared}  # one weight tensor at a time
            inputs = {key: (made, spec.make_out(p, device))}
        made, out = inputs[key]
        try:
            spec.run(made, out, cfg)
            ran += 1
        except Exception:  # noqa: BLE001 - the timing loop retries it and reports the failure
            pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ran


def precompile(plan: list[tuple[Fc1Problem | Fc2Problem | RoutedProblem, list]], device,
               workers: int | None = None) -> PrecompileStats:
    """Compile every candidate of ``plan`` ([(problem, configs), ...], problems at their
    bucket's top M; FC1, FC2 or routed) ahead of timing; see the module docstring.
    ``workers=0``: CuTe only."""
    device = torch.device(device)
    stats = PrecompileStats()
    if device.type != "cuda":
        return stats
    t0 = time.time()
    workers = default_workers() if workers is None else workers
    jobs = [(p, c) for p, cfgs in plan for c in cfgs if c.backend == "triton"]
    # one job per (config, M): a config shared by buckets is compiled by the first worker that
    # meets it and found in the disk cache by the next; group by M so workers build few inputs
    jobs.sort(key=lambda pc: pc[0].m)
    stats.triton_jobs = len(jobs)
    pool, futures = None, []
    if workers > 0 and jobs:
        try:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            step = -(-len(jobs) // workers)
            futures = [pool.submit(_worker, jobs[i:i + step], f"cuda:{device.index or 0}") for i in range(0, len(jobs), step)]
            stats.workers = len(futures)
        except Exception as exc:  # noqa: BLE001 - no pool: the timing loop compiles everything
            stats.error = f"no worker pool: {type(exc).__name__}: {exc}"
            pool = None
    cute = []  # static compile keys: (compile function, config, dtype, out dtype, N or H, E, I)
    for p, cfgs in plan:
        for c in cfgs:
            if getattr(c, "backend", "") != "cute":
                continue
            if isinstance(p, Fc1Problem):
                k = (fc1_sm90.compile_fc1, c, p.dtype, p.out_dtype, p.h, p.e, p.i)
            else:
                k = (fc2_sm90.compile_fc2, c, p.dtype, p.out_dtype, p.n, p.e, p.i)
            if k not in cute:
                cute.append(k)
    stats.cute_configs = len(cute)
    if cute and fc2_sm90.cute_available():
        for fn, *k in cute:
            try:
                fn(*k)
                stats.cute_ok += 1
            except Exception:  # noqa: BLE001 - reported by the timing loop
                pass
    for f in futures:
        try:
            stats.triton_ok += f.result()
        except Exception as exc:  # noqa: BLE001 - a worker that died: its jobs compile in the loop
            stats.error = f"a worker failed: {type(exc).__name__}: {str(exc)[:200]}"
    if pool is not None:
        pool.shutdown()
    stats.seconds = time.time() - t0
    return stats
