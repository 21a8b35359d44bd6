"""The tuner: time every valid tactic on real inputs, keep the fastest verified one.

For one problem (shape, dtypes, M bucket) on one device:

1. inputs: fresh random ``a`` and ``w`` (never zeros) and a top-k routing ``alpha``, at the
   bucket's top M (its largest, slowest call);
2. candidates: ``space.fc2_space`` for the requested backends (``tune`` adds the configs tuned
   for the neighbouring buckets: ``with_neighbours``); a candidate that fails to compile or run
   is dropped and reported (``TuneResult.failures``), never hidden;
3. timing: CUDA-graph replays with L2 flushed by a read before each, median of ``reps``
   (``densemoe.timing.Timer``); then the finalists (the ``finalists`` fastest, each
   backend's fastest and the heuristic's own choice) are timed again, ``rounds`` interleaved
   rounds of ``reps`` each, and ranked by the median of their round medians, so one lucky
   screening run does not pick the winner and the heuristic is compared on equal terms;
4. verification: the fastest candidate's output is checked against the fp32 reference
   (relative error <= ``TOL``); a failure drops it and the next fastest is checked. If it beats
   the heuristic's own choice by no more than ``MARGIN`` (2%), the heuristic's choice is kept:
   the same two configs move by more than that between the tuner's and the benchmark's runs
   (``docs/tuning.md``);
5. recording: the winner, each backend's best and the heuristic's time, under the problem's key,
   into the user's cache (atomic, locked: ``cache.write_entries``).

The ops are ``tuning.ops.OPS``: "fc2", "fc1" and "routed" (a ``RoutedProblem``: the routed
path's ``RoutedConfig``, key ``routed|...``; its fp8 output is checked against a reference
rounded with the candidate's own y scale groups).

The strategy crossovers (``tune_strategy``, ``tune(op="strategy")``): for a shape, dtype and M
bucket, ``experts_forward`` forced to "skip", "dense" and "routed" (each with whatever configs
the caches give it: tune fc1, fc2 and routed first) is checked against the float reference and
timed in the same interleaved rounds; the fastest (the rule's own pick unless beaten by more
than ``MARGIN``) is recorded under ``strategy|...``, where ``ops.strategy.pick`` reads it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings

import torch

from densemoe._runtime import sm_count
from densemoe.kernels.common import Fc1Problem, Fc2Problem, RoutedProblem
from densemoe.ops import routed_configs
from densemoe.ops import strategy as rule
from densemoe.timing import Timer
from densemoe.tuning import cache
from densemoe.tuning.buckets import m_bucket, neighbours
from densemoe.tuning.ops import OPS, op_of, routed_reference, run_strategy, strategy_inputs
from densemoe.tuning.space import BACKENDS, describe

TOL = 1e-2  # relative Frobenius error against the fp32 reference (bf16 output: ~4e-3)
MARGIN = 0.02  # a tuned winner must beat the heuristic's choice by more than this (see tune_problem)
DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}
# fp8 weights with 128 x 128 block scales (issue 20): the routed path and the crossovers only
BLOCK_DTYPES = {"fp8block": 128}
BLOCK_OPS = ("routed", "strategy")
# what ``tune``'s op= (and the CLI's --op) takes: the ops with configs, and the crossovers
TUNABLE = (*OPS, "strategy")
# a strategy's output against the exact float reference (relative Frobenius error): a guard
# against a broken pipeline, not a precision test. fp8: each strategy rounds y to fp8 its own
# way (per token or per 128-column group), a few percent from the exact math
STRATEGY_TOL = {torch.float8_e4m3fn: 0.1, torch.bfloat16: 2e-2}


@dataclasses.dataclass
class Timing:
    config: object
    us: float | None = None
    error: str = ""
    screen_us: float | None = None  # the first, single-run time (``us`` is the finals' when re-timed)


@dataclasses.dataclass
class TuneResult:
    key: str
    problem: Fc1Problem | Fc2Problem | RoutedProblem
    best: Timing | None
    per_backend: dict
    heuristic: Timing
    failures: list
    timings: list

    @property
    def speedup(self) -> float:
        """Heuristic time / tuned time (>= 1 when tuning helped)."""
        if not self.best or not self.heuristic.us:
            return float("nan")
        return self.heuristic.us / self.best.us

    def entry(self, device: str) -> dict:
        def slot(t: Timing | None):
            return None if t is None else {"backend": t.config.backend, "config": t.config.to_str(), "us": t.us}
        return {"best": slot(self.best), **{b: slot(t) for b, t in self.per_backend.items()},
                "heuristic": slot(self.heuristic), "m": self.problem.m, "device": device,
                "failures": len(self.failures), "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    def dropped(self) -> list[str]:
        """One line per candidate left out, and why (the CLI prints them)."""
        return [f"dropped M<={self.problem.m} {f.config.to_str()}: {f.error}" for f in self.failures]


def _as_us(t) -> float:
    return float(t["us"] if isinstance(t, dict) else t)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _at_bucket(problem, device, timer, reps: int):
    """(device, the problem at its M bucket's top, a timer): ``timer`` or, on a CUDA device, a
    ``Timer`` of ``reps`` runs (elsewhere a ValueError: only a GPU times kernels)."""
    device = torch.device(device)
    if timer is None:
        if device.type != "cuda":
            raise ValueError("tuning times kernels on a CUDA GPU; on another device pass timer=")
        timer = Timer(reps=reps)
    return device, dataclasses.replace(problem, m=m_bucket(problem.m)), timer


def tune_problem(problem: Fc1Problem | Fc2Problem | RoutedProblem, device, *, backends=BACKENDS, timer=None,
                 space=None, reps: int = 20, inputs=None, save: bool = True, progress=None, finalists: int = 3,
                 rounds: int = 3, precompile_workers: int | None = 0, margin: float = MARGIN) -> TuneResult:
    """Tune one problem; ``problem.m`` is rounded up to its bucket's top. ``timer(fn)`` returns
    microseconds (or a dict with "us"); default: the benchmark's cold-L2 CUDA-graph timer.
    ``space``: candidate configs (default: the op's space, ``tuning.space``); ``inputs``: the
    op's inputs to reuse (``tuning.ops``: fc2's (a, w, alpha), a ``RoutedInputs``, ...).
    ``finalists`` / ``rounds``: the re-timing of the fastest (module docstring); 0 skips it.
    ``precompile_workers``: compile the candidates first (``tuning.precompile``) with this many
    Triton worker processes; None picks a default, 0 (the default here) compiles in the loop.
    ``margin``: the heuristic's choice stays the winner unless the fastest beats it by more than
    this fraction (a tuned entry that only wins inside run-to-run noise would make calls slower
    as often as faster)."""
    spec = op_of(problem)
    device, p, timer = _at_bucket(problem, device, timer, reps)
    inputs = inputs if inputs is not None else spec.make_inputs(p, device, 0, None)[0]
    out = spec.make_out(p, device)
    hcfg = spec.heuristic(p, inputs, out)
    refs: dict = {}

    def run(c):
        return spec.run(inputs, out, c)

    def error_of(c) -> float:
        """The relative error of ``c``'s output, the output poisoned first where the op writes
        into ``out`` (the reference is made once per ``spec.ref_key(c)``)."""
        out.fill_(float("nan"))
        got = run(c)
        rk = spec.ref_key(c)
        if rk not in refs:
            refs[rk] = spec.reference(inputs, c)
        return _rel_err(out if got is None else got, refs[rk])
    cands = list(space) if space is not None else spec.space(p, backends, _sms(device))
    if hcfg not in cands and hcfg.backend in backends:
        cands.insert(0, hcfg)
    if precompile_workers != 0 and device.type == "cuda":
        from densemoe.tuning.precompile import precompile

        precompile([(p, cands)], device, precompile_workers)
    timings: list[Timing] = []
    for i, cfg in enumerate(cands):
        t = Timing(cfg)
        if progress:
            progress(i, len(cands), cfg)
        try:
            fn = (lambda c=cfg: run(c))  # noqa: E731
            fn()  # compile + first run outside the timer
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t.us = t.screen_us = _as_us(timer(fn))
            if not (t.us > 0 and math.isfinite(t.us)):
                raise RuntimeError(f"timer returned {t.us}")
        except Exception as exc:  # noqa: BLE001 - a tactic that fails is dropped and reported
            t.us, t.error = None, f"{type(exc).__name__}: {str(exc)[:300]}"
        timings.append(t)
    if progress:
        progress(len(cands), len(cands), None)
    _finals(timings, hcfg, timer, reps, finalists, rounds, run)
    ok = sorted((t for t in timings if t.us is not None), key=lambda t: t.us)
    failures = [t for t in timings if t.us is None]
    best = None
    for t in ok:  # verify the fastest; a wrong one is dropped, the next is checked
        err = error_of(t.config)
        if math.isfinite(err) and err <= TOL:
            best = t
            break
        t.error = f"wrong result: relative error {err:.3g} > {TOL}"
        failures.append(t)
    h = next((t for t in timings if t.config == hcfg and t.us is not None and not t.error), None)
    if best is not None and h is not None and h is not best and best.us * (1 + margin) >= h.us:
        err = error_of(h.config)  # the fastest won by less than the margin: keep the heuristic's choice
        if math.isfinite(err) and err <= TOL:
            best = h
    per_backend = {}
    for t in ok:
        if t.error:
            continue
        b = t.config.backend
        if b not in per_backend:
            per_backend[b] = t
    if best is not None and getattr(best.config, "uses_cute", False):
        plain = fastest_without_cute(ok, error_of)
        if plain is not None:
            per_backend["no_cute"] = plain
    heur = next((t for t in timings if t.config == hcfg), None)
    if heur is None:  # the heuristic's backend is outside ``backends``: timed for the comparison only
        heur = Timing(hcfg)
        try:
            heur.us = _as_us(timer(lambda: run(hcfg)))
        except Exception as exc:  # noqa: BLE001
            heur.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    key = cache.make_key(spec.name, cache.device_name(device), p)
    result = TuneResult(key, p, best, per_backend, heur, failures, timings)
    if save and best is not None:
        try:
            cache.record(key, result.entry(cache.device_name(device)))
        except OSError as exc:  # an unwritable cache must not throw the measurements away
            warnings.warn(f"densemoe: could not save the tuned entry to {cache.cache_path()} ({exc}); "
                          f"set DENSEMOE_CACHE_DIR to a writable directory", RuntimeWarning, stacklevel=2)
    return result


def fastest_without_cute(ok: list, error_of) -> "Timing | None":
    """The fastest of ``ok`` (timings, fastest first) whose config runs no GEMM on CuTe and whose
    result is right (``error_of`` within TOL): a routed entry's ``no_cute`` slot, which
    ``routed_configs.choose`` takes where CuTe DSL cannot run (the best's tiles need not fit the
    Triton GEMMs, nor be the fastest Triton ones; an entry without the slot gives way to the
    default rule there)."""
    for t in ok:
        if t.error or getattr(t.config, "uses_cute", False):
            continue
        err = error_of(t.config)
        if math.isfinite(err) and err <= TOL:
            return t
        t.error = f"wrong result: relative error {err:.3g} > {TOL}"
    return None


def _finals(timings: list, hcfg, timer, reps: int, finalists: int, rounds: int, run) -> None:
    """Re-time the finalists in place: the ``finalists`` fastest by screening time, each
    backend's fastest and the heuristic's choice, in ``rounds`` interleaved rounds; each gets the
    median of its round medians as ``us`` (its screening time stays in ``screen_us``)."""
    ok = sorted((t for t in timings if t.us is not None), key=lambda t: t.us)
    if finalists <= 0 or rounds <= 0 or len(ok) < 2:
        return
    chosen = ok[:finalists]
    for t in ok:
        if t.config == hcfg or all(c.config.backend != t.config.backend for c in chosen):
            if t not in chosen:
                chosen.append(t)
    samples = {id(t): [] for t in chosen}
    for _ in range(rounds):
        for t in chosen:
            fn = (lambda c=t.config: run(c))  # noqa: E731
            try:
                us = _as_us(timer(fn, reps=reps) if _takes_reps(timer) else timer(fn))
            except Exception as exc:  # noqa: BLE001 - it ran in screening; a failure now is reported
                t.us, t.error = None, f"failed when re-timed: {type(exc).__name__}: {str(exc)[:300]}"
                continue
            samples[id(t)].append(us)
    for t in chosen:
        if t.us is not None and samples[id(t)]:
            round_medians = sorted(samples[id(t)])
            t.us = round_medians[len(round_medians) // 2]


def _takes_reps(timer) -> bool:
    return isinstance(timer, Timer)


def _sms(device: torch.device) -> int:
    return sm_count(device)


def _progress_bar(label: str, stream=None):
    stream = stream or sys.stderr
    t0 = time.time()

    def show(i: int, n: int, cfg) -> None:
        width = 30
        filled = width * i // max(n, 1)
        line = f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {i}/{n} {time.time() - t0:5.0f}s"
        stream.write(line + ("\n" if i == n else ""))
        stream.flush()
    return show


def _shape_of(shape):
    """A shape name of ``densemoe.shapes.SHAPES``, (N, E, I) or (N, E, I, top_k) -> MoEShape."""
    from densemoe.shapes import SHAPES, MoEShape

    if isinstance(shape, MoEShape):
        return shape
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
        return SHAPES[shape]
    n, e, i, *k = shape
    return MoEShape("custom", n, e, i, k[0] if k else 8)


def _dtype_of(dt) -> torch.dtype:
    if isinstance(dt, str) and dt in BLOCK_DTYPES:
        return torch.float8_e4m3fn
    if isinstance(dt, str) and dt not in DTYPES:
        raise ValueError(f"dtypes: {dt!r} is not one of {sorted(DTYPES) + sorted(BLOCK_DTYPES)}")
    dtype = DTYPES[dt] if isinstance(dt, str) else dt
    if dtype not in DTYPES.values():
        raise ValueError(f"dtypes: {dtype} is not one of {sorted(DTYPES)} (float8_e4m3fn, bfloat16)")
    return dtype


def _block_of(dt) -> int:
    """The weights' scale block a dtype name asks for ("fp8block": 128), else 0."""
    return BLOCK_DTYPES.get(dt, 0) if isinstance(dt, str) else 0


def strategy_problem(m: int, shape, dtype, out_dtype: torch.dtype = torch.bfloat16) -> RoutedProblem:
    """The problem a strategy crossover of ``shape`` (as ``tune`` takes it, or a ``MoEShape``)
    at M = ``m`` is keyed by: ``ops.strategy.recorded`` builds the same from a layer call.
    ``dtype`` "fp8block": fp8 with 128 x 128 block-scaled weights (``block`` 128)."""
    s = _shape_of(shape)
    return RoutedProblem(m, s.hidden, s.experts, s.inter, s.topk, _dtype_of(dtype), out_dtype, block=_block_of(dtype))


def tune(op: str = "fc2", shape="deepseek-v3-tp8", m_values=(1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512),
         dtypes=("fp8",), out_dtype: torch.dtype = torch.bfloat16, backends=BACKENDS, device=None,
         reps: int = 20, save: bool = True, progress: bool = True, timer=None,
         compile_workers: int | None = None, missing_only: bool = False) -> list:
    """Tune ``op`` for a model shape over token counts; returns one result per (dtype, M bucket).

    op: "fc2", "fc1", "routed" (``TuneResult``s) or "strategy" (the crossovers,
    ``StrategyResult``s: run it after the other three, whose tuned configs the strategies use).
    shape: a name from ``densemoe.shapes.SHAPES`` or (N, E, I) or (N, E, I, top_k) (top-k 8 when
    not given; only "routed" and "strategy" read it). m_values: token counts (each is tuned at
    its bucket's top; duplicates within a bucket are tuned once). Results are written to the
    user's cache (``DENSEMOE_CACHE_DIR``) when ``save``; ``missing_only`` skips the buckets that
    already have an entry there (a sweep cut short resumes where it stopped). On a GPU, each
    dtype's candidates are compiled first (``tuning.precompile``), Triton's in
    ``compile_workers`` processes (None: half the CPUs, at most 8; 0: compile in the timing loop).
    """
    if op not in TUNABLE:
        raise ValueError(f"op={op!r}: tunable ops are {sorted(TUNABLE)}")
    s = _shape_of(shape)
    if device is None:
        if not torch.cuda.is_available():
            raise ValueError("densemoe.tune times kernels on a CUDA GPU and none is available")
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    dts = [(dt, _dtype_of(dt), _block_of(dt)) for dt in dtypes]
    if any(blk for *_, blk in dts) and op not in BLOCK_OPS:
        raise ValueError(f"dtypes: {sorted(BLOCK_DTYPES)} tune {' and '.join(BLOCK_OPS)} only (op={op!r})")
    if timer is None and device.type == "cuda":
        timer = Timer(reps=reps)  # one flush buffer for the whole sweep
    label = shape
    results = []
    for dt, dtype, blk in dts:
        shared = None

        def problem_at(b, spec=None, dtype=dtype, blk=blk):
            q = spec.problem(b, s, dtype, out_dtype)
            return dataclasses.replace(q, block=blk) if blk else q
        buckets = sorted({m_bucket(m) for m in m_values})
        if op == "strategy":
            for b in buckets:
                p = strategy_problem(b, s, dt, out_dtype)
                if missing_only and _have(cache.make_key("strategy", cache.device_name(device), p)):
                    continue
                inputs = strategy_inputs(p, device, b, shared)
                shared = inputs.routed.prepared
                r = tune_strategy(p, device, timer=timer, reps=reps, inputs=inputs, save=save)
                if progress:
                    print(f"strategy {label} {dt} M<={b}: {r.line()}", file=sys.stderr)
                results.append(r)
            continue
        spec = OPS[op]
        todo = [b for b in buckets if not (missing_only and _have(
            cache.make_key(spec.name, cache.device_name(device), problem_at(b, spec))))]
        if device.type == "cuda" and compile_workers != 0 and todo:
            from densemoe.tuning.precompile import precompile

            plan = [(problem_at(b, spec), with_neighbours(spec, problem_at, b, device, backends)) for b in todo]
            stats = precompile(plan, device, compile_workers)
            if progress:
                print(f"{op} {label} {dt}: {stats.line()}", file=sys.stderr)
        for b in todo:
            p = problem_at(b, spec)
            inputs, shared = spec.make_inputs(p, device, b, shared)
            bar = _progress_bar(f"{op} {label} {dt} M<={b}") if progress else None
            # the neighbours again: the bucket below may have just been tuned (its new entry joins)
            space = with_neighbours(spec, problem_at, b, device, backends)
            results.append(tune_problem(p, device, backends=backends, timer=timer, reps=reps, space=space,
                                        inputs=inputs, save=save, progress=bar))
    return results


def with_neighbours(spec, problem_at, bucket: int, device, backends=BACKENDS) -> list:
    """The op's space at ``bucket`` and after it the configs tuned for the buckets just below and
    just above (every slot of their entries but the heuristic's, from the user's cache or the
    shipped tables) that fit this bucket's problem and are not in the space already. The space
    cuts token tiles by the rows an expert gets, so a tile can win just across a bucket's edge
    while its own space leaves it out (docs/tuning.md, "Neighbours")."""
    device = torch.device(device)
    p = problem_at(bucket, spec)
    space = list(spec.space(p, backends, _sms(device)))
    dev = cache.device_name(device)
    for nb in neighbours(bucket):
        entry, _ = cache.lookup(cache.make_key(spec.name, dev, problem_at(nb, spec)))
        for slot, item in (entry or {}).items():
            if slot == "heuristic" or not isinstance(item, dict) or "config" not in item:
                continue
            try:
                cfg = spec.parse(item["config"])
            except Exception:  # noqa: BLE001 - an entry that no longer parses is the lookup's warning
                continue
            fits = spec.fits.get(cfg.backend)
            if cfg.backend in backends and cfg not in space and fits is not None and fits(p, cfg)[0]:
                space.append(cfg)
    return space


def _have(key: str) -> bool:
    """Whether the user's cache (not the shipped tables) has an entry for ``key``."""
    return cache.lookup(key)[1] == "cache"


# ------------------------------------------------------------------------------------------ strategies

@dataclasses.dataclass
class StrategyResult:
    """One crossover: ``us`` per strategy that ran and was right, ``best`` (what is recorded),
    ``rule`` (what ``strategy.pick`` gives without a recorded choice), ``errors`` per strategy
    left out, ``routed``: the routed config the routed strategy ran and where it came from."""

    key: str
    problem: RoutedProblem
    best: str | None
    us: dict
    rule: str
    errors: dict
    routed: dict

    def entry(self, device: str) -> dict:
        """The cache entry: ``{"best": {"config": name, "us"}, "us": {name: us}, "heuristic":
        {"config": the rule's pick, "us"}, "routed": ..., "errors": ..., "m", "device", "time"}``."""
        return {"best": {"config": self.best, "us": self.us[self.best]}, "us": dict(self.us),
                "heuristic": {"config": self.rule, "us": self.us.get(self.rule)}, "routed": dict(self.routed),
                "errors": dict(self.errors), "m": self.problem.m, "device": device,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    def line(self) -> str:
        times = ", ".join(f"{n} {u:.1f} us" for n, u in self.us.items())
        return f"{self.best or 'none'} ({times}; rule: {self.rule}; routed {self.routed.get('source')})"

    def dropped(self) -> list[str]:
        return [f"left out M<={self.problem.m} strategy {n}: {why}" for n, why in self.errors.items()]


def tune_strategy(problem: RoutedProblem, device, *, timer=None, reps: int = 20, rounds: int = 3, inputs=None,
                  save: bool = True, strategies=rule.STRATEGIES, margin: float = MARGIN) -> StrategyResult:
    """Time ``experts_forward`` forced to each of ``strategies`` on ``problem`` (M rounded up to
    its bucket's top) and record the fastest under ``cache.make_key("strategy", device,
    problem)``: each runs once and is checked against the exact float reference (relative error
    <= ``STRATEGY_TOL``; a failure or a wrong result leaves it out, in ``errors``), then all are
    timed in ``rounds`` interleaved rounds of ``reps`` (median of the round medians). The rule's
    own pick (``strategy.pick`` without a recorded choice) stays the answer unless the fastest
    beats it by more than ``margin``. The strategies run with whatever configs the caches hold:
    the routed config used is in the result (``routed``: its config and source)."""
    device, p, timer = _at_bucket(problem, device, timer, reps)
    inputs = inputs if inputs is not None else strategy_inputs(p, device, 0)
    ref = routed_reference(inputs.routed)
    tol = STRATEGY_TOL.get(p.dtype, STRATEGY_TOL[torch.float8_e4m3fn])
    errors: dict = {}
    fns: dict = {}
    for name in strategies:
        try:
            got = run_strategy(inputs, name)  # compiles, and the output to check
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            err = _rel_err(got, ref)
            if not (math.isfinite(err) and err <= tol):
                errors[name] = f"wrong result: relative error {err:.3g} > {tol}"
                continue
        except Exception as exc:  # noqa: BLE001 - a strategy that cannot run is left out and reported
            errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        fns[name] = (lambda n=name: run_strategy(inputs, n))  # noqa: E731
    samples: dict = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                us = _as_us(timer(fn, reps=reps) if _takes_reps(timer) else timer(fn))
                if not (us > 0 and math.isfinite(us)):
                    raise RuntimeError(f"timer returned {us}")
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"failed when timed: {type(exc).__name__}: {str(exc)[:300]}"
                continue
            samples[name].append(us)
    us = {n: sorted(v)[len(v) // 2] for n, v in samples.items() if v and n not in errors}
    picked = rule.pick(p.m, p.e, p.top_k)
    best = min(us, key=us.get) if us else None
    if best is not None and picked in us and best != picked and us[best] * (1 + margin) >= us[picked]:
        best = picked  # within the margin: the rule's own pick (noise must not flip a recorded choice)
    rc = routed_configs.choose(p, device)
    routed = {"config": rc.config.to_str(), "source": rc.source}
    key = cache.make_key("strategy", cache.device_name(device), p)
    result = StrategyResult(key, p, best, us, picked, errors, routed)
    if save and best is not None:
        try:
            cache.record(key, result.entry(cache.device_name(device)))
        except OSError as exc:
            warnings.warn(f"densemoe: could not save the crossover to {cache.cache_path()} ({exc}); "
                          f"set DENSEMOE_CACHE_DIR to a writable directory", RuntimeWarning, stacklevel=2)
    return result


def summary(results: list) -> str:
    """Markdown tables. Config tuning (``TuneResult``): M bucket, chosen config, us, heuristic
    us, speedup over the heuristic. Crossovers (``StrategyResult``): M bucket, the recorded
    strategy, each strategy's us, the rule's pick, the routed config's source."""
    tuned = [r for r in results if isinstance(r, TuneResult)]
    cross = [r for r in results if isinstance(r, StrategyResult)]
    tables = []
    if tuned or not cross:
        lines = ["| dtype | M bucket | tuned config | us | heuristic config | heuristic us | speedup | failed |",
                 "|---|---:|---|---:|---|---:|---:|---:|"]
        for r in tuned:
            dt = cache._DTYPE_NAMES.get(r.problem.dtype, str(r.problem.dtype)) + ("block" if getattr(
                r.problem, "block", 0) else "")
            best = f"{describe(r.best.config)} | {r.best.us:.1f}" if r.best else "none | -"
            h = f"{r.heuristic.us:.1f}" if r.heuristic.us else "-"
            lines.append(f"| {dt} | {r.problem.m} | {best} | {describe(r.heuristic.config)} | {h} | "
                         f"{r.speedup:.3f} | {len(r.failures)} |")
        tables.append("\n".join(lines))
    if cross:
        names = rule.STRATEGIES
        lines = [f"| dtype | M bucket | recorded | {' | '.join(n + ' us' for n in names)} | rule | "
                 f"rule / recorded | routed config from |",
                 "|---|---:|---|" + "---:|" * len(names) + "---|---:|---|"]
        for r in cross:
            dt = cache._DTYPE_NAMES.get(r.problem.dtype, str(r.problem.dtype)) + ("block" if getattr(
                r.problem, "block", 0) else "")
            cells = " | ".join(f"{r.us[n]:.1f}" if n in r.us else "-" for n in names)
            gain = (f"{r.us[r.rule] / r.us[r.best]:.3f}" if r.best and r.rule in r.us else "-")
            lines.append(f"| {dt} | {r.problem.m} | {r.best or 'none'} | {cells} | {r.rule} | {gain} | "
                         f"{r.routed.get('source', '-')} |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _autotune_missing(problem, device) -> None:
    """The autotune-on-miss hook (``DENSEMOE_AUTOTUNE=1``, ``cache.lookup_or_autotune``): the
    ops that look their configs up through it (fc1, fc2, routed) pass their problem, which is
    tuned here. The strategy crossovers never come through it (``strategy.recorded`` only reads):
    timing three whole pipelines inside a layer call is not done; ``tune(op="strategy")`` does."""
    if not isinstance(problem, (Fc1Problem, Fc2Problem, RoutedProblem)):
        return
    tune_problem(problem, device, save=True)


cache.set_autotuner(_autotune_missing)
