"""Expert-skipping benchmark (issue 6): FC1, FC2 and the whole layer with skipping against the
same op without it (the dense path) and against the skipping floor.

Protocol as for ``bench/layer.py``: every result is checked against the fp32 reference first
(``fc1_ref`` / ``fc2_ref`` / ``experts_ref``), for the skipping path *and* the dense path, and
the two must agree (their relative difference within twice the dense path's own error: two
roundings of one sum differ by about 1.4x either's error). Bounds on the error against the
reference: 1e-2 for FC1 and FC2; for the layer 2e-2 in bf16 and in fp8 0.1 or 1.5x the cuBLAS fp8
pipeline's error on the same routing, whichever is larger (the issue bounds that ratio by 1.5;
small shapes quantise coarsely). Then ours with skipping (``us``),
ours without (``dense_us``, the same call with ``skip=False``) and, for the layer, the baselines
are timed in the same interleaved rounds (``Timer.compare``). Nothing wrong is timed.

Ops (``op``):
  * ``fc1``: ``densemoe.fc1(x8, w1, alpha1, x_scale=sx, routing=alpha, skip=True)`` against
    ``skip=False`` (x8, sx from ``quantize_per_token``). The reference is ``fc1_ref`` with the
    segments of experts a token did not pick zeroed (what ``routing`` asks for).
  * ``fc2``: ``densemoe.fc2(y8, w2, alpha2, skip=True)`` against ``skip=False``, where
    ``y8, alpha2 = quantize_y_fold_alpha(fc1(x8, ..., routing=alpha), alpha, w2_scale)``: the
    layer's own FC2 input (bf16: FC1's bf16 output and ``alpha * w2_scale``).
  FC1 records also carry ``layer_call_us`` (``layer_call_us_in_graph``): the same FC1 as the
  layer calls it (``fill_unpicked=False``; at M = 1 ``expert_ids``, the token's picked experts),
  checked against ``us``'s output on the picked segments, timed after the interleaved rounds.
  FC1 and FC2 records carry cuBLAS's bare dense GEMMs of the op's shape (every expert, no
  scales: ``cublas_fp8_us``, ``cublas_bf16_us``; ``speedup_vs_*`` = baseline / ours).
  * ``layer``: ``DenseMoE`` (its fused router, then FC1, FC2) built with ``skip=True`` against
    ``skip=False``, plus the baselines of ``run_layer`` with the same gate routed in torch: the
    cuBLAS fp8 pipeline (``cublas_fp8_pipeline_us``) and transformers' experts under
    ``grouped_mm`` in bf16 (``hf_grouped_mm_bf16_us``); ``speedup_vs_*`` = baseline / ours.

Routing (``routing``), DeepSeek-V3 TP8 numbers in brackets (E = 256, k = 8):
  * ``uniform``: per (token, expert) a logit z ~ N(0, 1), iid; a token picks the top-k of its
    logits (a uniformly random k-subset of the experts) with weights softmax(picked z).
  * ``skewed``: a fixed set of ``n_hot = min(16, E // 2)`` hot experts (``hot_experts``:
    ``torch.randperm(E)`` with seed ``HOT_SEED`` on the CPU, the first n_hot); the hot experts'
    logits are multiplied by ``s`` before the top-k (weights still softmax of the unscaled
    picked z). ``s`` (``hot_scale``) is set by bisection on a Monte-Carlo sample (8192 tokens,
    seed 0) so that ``HOT_SHARE`` = 70% of all picks land on the hot set [s = 6.44: each token
    picks ~5.6 of its 8 from the 16 hot experts, and at M >= 16 all 16 are active].
  * the layer routes with its own gate ([E, H], N(0, 1/H) entries, so on random x ~ N(0, 1) the
    logits are ~N(0, 1) per (token, expert), iid: the ``uniform`` recipe); ``skewed`` multiplies
    the hot experts' gate rows by the same ``s`` (the hot logits are then ~N(0, s^2): the
    ``skewed`` recipe through a real gate).
Each record carries what the routing realised: ``active_experts`` (experts picked by at least
one of the M tokens), ``picks_per_expert`` (tokens per expert), ``hot_fraction`` (share of the
picks on the hot set; n_hot / E expected under uniform), ``expected_active_uniform`` =
E * (1 - (1 - k/E)^M), and for FC1 / FC2 ``tile_pairs`` (sum over the skipping config's token
tiles of the experts each picked: the expert reads the kernel issues) and ``block_m``.

Floors (``floor_us``: skipping; ``dense_floor_us``: the same with every expert read) are
max(bytes / read ceiling, FLOPs / peak), element size es = 1 (fp8) or 2 (bf16), A = active:
  * fc1: A * 2*I*H*es (w1 of the active experts) + M*H*es (x) + M*E*4 (routing)
         + M*E*I*2 (the bf16 output, zeros included); FLOPs 2*M*A*2*I*H.
  * fc2: A * H*I*es (w2) + M*A*I*es (the picked segments of a) + M*E*4 (alpha) + M*H*2 (out);
         FLOPs 2*M*A*H*I.
  * layer: A * 3*I*H*es (w1 + w2) + E*H*2 (the router's bf16 gate) + 2*M*H*2 (x, out);
           FLOPs 2*M*A*3*I*H + 2*M*E*H.
Targets (``target_us``, ``target`` names the rule, ``meets_target`` = us <= target_us; None
where the issue sets none):
  * M >= 128 (every expert active under uniform routing), every op: at most 2% slower than the
    dense path, target_us = 1.02 * dense_us.
  * fc1, fc2 below: 1.15 * floor_us + 5 us (issue: at M = 1 ... 64).
  * layer: 35 us at M = 1, 90 us at M = 8.
``floor_target_us`` = 1.15 * floor_us + 5 on every record; ``vs_dense`` = dense_us / us.
"""

from __future__ import annotations

import functools
import math
import time

import torch

import densemoe
from densemoe.bench.layer import (ExpertsCase, _compare, _rates, cublas_fp8_pipeline, hf_experts, layer_baselines,
                                  rel_err)
from densemoe.layer import DenseMoE
from densemoe.ops import strategy as strategy_rule
from densemoe.quant import quantize_per_token, quantize_y_fold_alpha
from densemoe.reference import experts_ref, fc1_ref, fc2_ref
from densemoe.routing import softmax_topk

ROUTINGS = ("uniform", "skewed")
OPS = ("fc1", "fc2", "layer")
HOT_EXPERTS = 16  # hot experts of the skewed routing (at most E // 2)
HOT_SHARE = 0.7  # share of all picks that land on them
HOT_SEED = 0
ALL_ACTIVE_M = 128  # from here every expert is active under uniform top-8 routing: the dense target
DENSE_SLACK = 1.02  # ... no more than 2% slower than the dense path
LAYER_TARGET_US = {1: 35.0, 8: 90.0}
BOUNDS = {"fc1": {"fp8": 1e-2, "bf16": 1e-2}, "fc2": {"fp8": 1e-2, "bf16": 1e-2},
          "layer": {"fp8": 0.1, "bf16": 2e-2}}
NOT_BASELINES = ("us", "floor_us", "dense_us", "dense_floor_us", "target_us", "floor_target_us", "us_in_graph",
                 "graph_launch_us", "layer_call_us", "layer_call_us_in_graph")


# -- routing ---------------------------------------------------------------------------------------

def n_hot(E: int) -> int:
    return max(1, min(HOT_EXPERTS, E // 2))


def hot_experts(E: int) -> torch.Tensor:
    """The skewed routing's hot experts (CPU, int64, ascending): fixed per E."""
    g = torch.Generator().manual_seed(HOT_SEED)
    return torch.randperm(E, generator=g)[:n_hot(E)].sort().values


@functools.lru_cache(maxsize=None)
def hot_scale(E: int, k: int, share: float = HOT_SHARE, tokens: int = 8192) -> float:
    """The factor on the hot experts' N(0, 1) logits that puts ``share`` of the top-k picks on
    them (bisection on a fixed Monte-Carlo sample; the largest tried, 64, if out of reach)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(tokens, E, generator=g)
    hot = torch.zeros(E, dtype=torch.bool)
    hot[hot_experts(E)] = True

    def frac(s: float) -> float:
        ids = torch.where(hot, z * s, z).topk(k, dim=1).indices
        return hot[ids].float().mean().item()

    lo, hi = 1.0, 64.0
    if frac(hi) < share:
        return hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if frac(mid) < share else (lo, mid)
    return hi


def routing_alpha(M: int, E: int, k: int, routing: str, gen: torch.Generator, device) -> torch.Tensor:
    """alpha [M, E] float32 for the ops (module docstring): ``uniform`` or ``skewed``."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    z = torch.randn(M, E, generator=gen, device=device)
    score = z
    if routing == "skewed":
        score = z.clone()
        hot = hot_experts(E).to(device)
        score[:, hot] *= hot_scale(E, k)
    ids = score.topk(min(k, E), dim=1).indices
    return torch.zeros(M, E, device=device).scatter_(1, ids, torch.softmax(z.gather(1, ids), dim=1))


def skewed_gate(gate: torch.Tensor, k: int) -> torch.Tensor:
    """The gate with its hot experts' rows times ``hot_scale`` (module docstring)."""
    E = gate.shape[0]
    g = gate.clone()
    g[hot_experts(E).to(gate.device)] *= hot_scale(E, k)
    return g


def routing_stats(alpha: torch.Tensor, k: int) -> dict:
    """What a routing realised: active experts (union over the tokens), picks per expert, the
    share of picks on the hot set, and the active count uniform routing would give on average."""
    M, E = alpha.shape
    picked = alpha != 0
    per = picked.sum(dim=0)
    hot = hot_experts(E).to(alpha.device)
    total = int(per.sum())
    return dict(active_experts=int((per > 0).sum()), picks_per_expert=per.tolist(),
                hot_fraction=int(per[hot].sum()) / total if total else 0.0, n_hot=len(hot),
                expected_active_uniform=strategy_rule.expected_picked(M, E, k))


def tile_pairs(alpha: torch.Tensor, block_m: int) -> int:
    """Sum over token tiles of ``block_m`` rows of the experts some token of the tile picked."""
    picked = alpha != 0
    return sum(int(picked[t:t + block_m].any(dim=0).sum()) for t in range(0, alpha.shape[0], block_m))


def target(op: str, M: int, floor_us: float, dense_us: float | None) -> tuple[float | None, str | None]:
    """(target_us, rule) the issue sets for ``op`` at M (module docstring), or (None, None)."""
    if M >= ALL_ACTIVE_M:
        return (DENSE_SLACK * dense_us, f"<= {DENSE_SLACK:g}x dense") if dense_us else (None, None)
    if op == "layer":
        t = LAYER_TARGET_US.get(M)
        return (t, f"layer <= {t:g} us") if t else (None, None)
    return 1.15 * floor_us + 5.0, "1.15x floor + 5 us"


# -- the benchmark ---------------------------------------------------------------------------------

def _floor(nbytes: float, flops: float, ceiling: dict, peak: float) -> float:
    return max(nbytes / ceiling["tb_s"] / 1e6, flops / peak / 1e6)


def _config_fields(op: str, xin, w, alpha_or_scale, out, x_scale=None) -> dict:
    """The skipping and the dense path's configs, as the op chooses them (for the record only)."""
    try:
        if op == "fc1":
            from densemoe.ops.fc1 import which_backend

            _, cs = which_backend(xin, w, alpha_or_scale, out, x_scale=x_scale, skip=True)
            _, cd = which_backend(xin, w, alpha_or_scale, out, x_scale=x_scale, routing=True)
        else:
            from densemoe.ops.fc2 import which_backend

            _, cs = which_backend(xin, w, alpha_or_scale, out, skip=True)
            _, cd = which_backend(xin, w, alpha_or_scale, out, skip=False)
        return dict(config=cs.to_str(), dense_config=cd.to_str(), block_m=getattr(cs, "block_m", None))
    except Exception:  # noqa: BLE001 - the configs are for the record only
        return {}


def _check(rec: dict, out, dense, ref, bound: float, records: list, log) -> bool:
    """Skip and dense against the reference and each other; False (and the record kept with its
    error, never timed) when anything is wrong."""
    rec["rel_err"] = err = rel_err(out, ref)
    rec["rel_err_dense"] = err_d = rel_err(dense, ref)
    rec["rel_diff_skip_dense"] = diff = rel_err(out, dense)
    why = None
    if not (math.isfinite(err) and err <= bound):
        why = f"wrong result: rel err {err:.3e} > {bound}"
    elif not (math.isfinite(err_d) and err_d <= bound):
        why = f"wrong dense result: rel err {err_d:.3e} > {bound}"
    elif not (math.isfinite(diff) and diff <= 2 * err_d + 1e-6):
        why = f"skip and dense disagree: rel diff {diff:.3e} > 2 x dense err {err_d:.3e}"
    if why is None:
        return True
    rec.update(us=None, error=why)
    records.append(rec)
    log(f"  WRONG {rec['op']} {rec['shape']} {rec['dtype']} {rec['routing']} M={rec['M']}: {why}")
    return False


def _failed(rec: dict, exc: Exception, records: list, log) -> None:
    rec.update(us=None, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    records.append(rec)
    log(f"  FAIL {rec['op']} {rec['shape']} {rec['dtype']} {rec['routing']} M={rec['M']}: {rec['error']}")


def _timed(fn) -> float:
    t0 = time.time()
    fn()
    return time.time() - t0


def _finish(rec: dict, r_skip: dict, r_dense: dict, nbytes, flops, dense_bytes, dense_flops, ceiling, peak,
            base: dict) -> None:
    rec.update(r_skip)
    rec["dense_us"] = r_dense["us"]
    if "us_rounds" in r_dense:
        rec["dense_us_rounds"] = r_dense["us_rounds"]
    floor = _floor(nbytes, flops, ceiling, peak)
    _rates(rec, nbytes, flops, floor, base)
    rec.update(dense_bytes=dense_bytes, dense_floor_us=_floor(dense_bytes, dense_flops, ceiling, peak),
               floor_target_us=1.15 * floor + 5.0, vs_dense=r_dense["us"] / rec["us"])
    rec["target_us"], rec["target"] = target(rec["op"], rec["M"], floor, r_dense["us"])
    rec["meets_target"] = None if rec["target_us"] is None else bool(rec["us"] <= rec["target_us"])


def _in_graph(rec: dict, timer, fn) -> None:
    """``us_in_graph``: the op inside one CUDA graph behind the L2 flush (``Timer.in_graph``), as
    it runs inside a serving engine's graph of a whole step, without the launch of a graph of its
    own that ``us`` includes (``graph_launch_us`` = us - us_in_graph); ``meets_target_in_graph``
    where the target is absolute (the M >= 128 target compares with the dense path's ``us``)."""
    if not hasattr(timer, "in_graph"):
        return
    t = timer.in_graph(fn)["us"]
    rec.update(us_in_graph=t, graph_launch_us=rec["us"] - t)
    if rec.get("target_us") is not None and "dense" not in rec["target"]:
        rec["meets_target_in_graph"] = bool(t <= rec["target_us"])


def run_skip(shapes, dtypes, ms, timer, ceiling, peaks, device, commit, log=print, dev="cuda",
             routings=ROUTINGS, hf_implementations=("grouped_mm",), ops=OPS):
    """Records for each shape, routing, M, op and dtype (module docstring): checked first, then
    ours with and without skipping (and the layer's baselines) in one interleaved comparison."""
    bad = [r for r in routings if r not in ROUTINGS] + [o for o in ops if o not in OPS]
    if bad:
        raise ValueError(f"run_skip: unknown routings / ops {bad} (routings: {ROUTINGS}, ops: {OPS})")
    records = []
    for shape_name in shapes:
        case = ExpertsCase(shape_name, dev)
        shape_name = case.shape.name
        E, k = case.E, case.k
        gen = torch.Generator(device=dev).manual_seed(1)
        cublas, hf = None, {}
        if "layer" in ops:
            cublas = cublas_fp8_pipeline(case)
            for impl in hf_implementations:
                try:
                    hf[impl] = hf_experts(case, impl)
                except Exception as exc:  # noqa: BLE001 - a baseline that cannot be built is reported
                    log(f"  no transformers {impl} baseline: {type(exc).__name__}: {exc}")
        for routing in routings:
            gate = case.gate if routing == "uniform" else skewed_gate(case.gate, k)
            for M in ms:
                x = case.x(M)
                alpha = routing_alpha(M, E, k, routing, gen, dev)
                head = dict(device=device, shape=shape_name, routing=routing, skip=True, M=M, E=E, commit=commit)
                if routing == "skewed":
                    head["hot_scale"] = hot_scale(E, k)
                if "fc1" in ops:
                    records += _fc1(case, head, x, alpha, dtypes, timer, ceiling, peaks, log)
                if "fc2" in ops:
                    records += _fc2(case, head, x, alpha, dtypes, timer, ceiling, peaks, log)
                if "layer" in ops:
                    records += _layer(case, head, x, gate, dtypes, cublas, hf, timer, ceiling, peaks, log)
        del case, hf
    return records


def _gemm_baselines(case, a8: torch.Tensor, a16: torch.Tensor, w8: torch.Tensor, w16: torch.Tensor) -> dict:
    """cuBLAS's bare dense GEMMs of the op's shape (every expert, no scales, no activation):
    FP8 ``_scaled_mm`` and bf16, the baselines every record carries."""
    one = torch.ones((), device=a8.device)
    return {"cublas_fp8_us": lambda: torch._scaled_mm(a8, w8.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
            "cublas_bf16_us": lambda: a16 @ w16.T}


def _fc1(case, head, x, alpha, dtypes, timer, ceiling, peaks, log) -> list:
    E, I, H, k, M = case.E, case.I, case.H, case.k, head["M"]
    records, ours, layer_calls = [], [], {}
    stats = routing_stats(alpha, k)
    x8, sx = quantize_per_token(x)
    mask = (alpha != 0).repeat_interleave(I, dim=1)
    for dt in dtypes:
        p = case.prepared[dt]
        xin, xs = (x8, sx) if dt == "fp8" else (x, None)
        rec = dict(head, op="fc1", dtype=dt, N=E * 2 * I, K=H, backend="triton", **stats)
        out_s, out_d = (torch.full((M, E * I), float("nan"), dtype=torch.bfloat16, device=x.device) for _ in range(2))
        f_skip = (lambda xin=xin, p=p, xs=xs, out=out_s:
                  densemoe.fc1(xin, p.w1, p.alpha1, x_scale=xs, routing=alpha, skip=True, out=out))
        f_dense = (lambda xin=xin, p=p, xs=xs, out=out_d:
                   densemoe.fc1(xin, p.w1, p.alpha1, x_scale=xs, routing=alpha, skip=False, out=out))
        # FC1 as the layer calls it: unpicked segments left unwritten, at M = 1 the token's ids as the list
        out_l = torch.full((M, E * I), float("nan"), dtype=torch.bfloat16, device=x.device)
        ids = alpha[0].nonzero().reshape(-1) if M == 1 else None
        f_layer = (lambda xin=xin, p=p, xs=xs, out=out_l, ids=ids:
                   densemoe.fc1(xin, p.w1, p.alpha1, x_scale=xs, routing=alpha, skip=True, out=out,
                                fill_unpicked=False, expert_ids=ids))
        rec.update(_config_fields("fc1", xin, p.w1, p.alpha1, out_s, xs))
        if rec.get("block_m"):
            rec["tile_pairs"] = tile_pairs(alpha, rec["block_m"])
        try:
            rec["compile_s"] = _timed(f_skip)
            rec["dense_compile_s"] = _timed(f_dense)
        except Exception as exc:  # noqa: BLE001 - compile/launch failure: report, don't hide
            _failed(rec, exc, records, log)
            continue
        ref = fc1_ref(xin, p.w1, p.alpha1, x_scale=xs, out_dtype=torch.float32, compute_dtype=torch.float32)
        ref = torch.where(mask, ref, torch.zeros_like(ref))
        ok = _check(rec, out_s, out_d, ref, BOUNDS["fc1"][dt], records, log)
        del ref
        if ok:
            f_layer()
            d = rel_err(out_l[mask], out_s[mask])
            if torch.isnan(out_l[mask]).any() or not d <= 2 * rec["rel_err"] + 1e-6:
                rec["layer_call_error"] = f"the layer's call disagrees with skip: rel diff {d:.3e}"
                log(f"  WRONG fc1 layer call {rec['dtype']} M={M}: {rec['layer_call_error']}")
                f_layer = None
            ours.append((rec, f_skip, f_dense))
            layer_calls[id(rec)] = f_layer
    bases = _gemm_baselines(case, x8, x.to(torch.bfloat16), case.prepared["fp8"].w1, case.w13.reshape(E * 2 * I, H))
    res = _compare(timer, [f for _, fs, fd in ours for f in (fs, fd)] + list(bases.values())) if ours else []
    base = {name: r["us"] for name, r in zip(bases, res[2 * len(ours):])}
    for j, (rec, f_skip, _) in enumerate(ours):
        es = 1 if rec["dtype"] == "fp8" else 2
        A = rec["active_experts"]
        io = M * H * es + M * E * 4 + M * E * I * 2
        _finish(rec, res[2 * j], res[2 * j + 1], A * 2 * I * H * es + io, 2 * M * A * 2 * I * H,
                E * 2 * I * H * es + io, 2 * M * E * 2 * I * H, ceiling, peaks[rec["dtype"]], base)
        _in_graph(rec, timer, f_skip)
        if layer_calls.get(id(rec)) is not None:  # (not in the interleaved rounds: a side figure)
            rec["layer_call_us"] = timer(layer_calls[id(rec)])["us"]
            if hasattr(timer, "in_graph"):
                rec["layer_call_us_in_graph"] = timer.in_graph(layer_calls[id(rec)])["us"]
        records.append(rec)
        log(fmt_skip(rec))
    return records


def _fc2(case, head, x, alpha, dtypes, timer, ceiling, peaks, log) -> list:
    E, I, H, k, M = case.E, case.I, case.H, case.k, head["M"]
    records, ours = [], []
    x8, sx = quantize_per_token(x)
    a_by_dt = {}
    for dt in dtypes:
        p = case.prepared[dt]
        if dt == "fp8":
            y = densemoe.fc1(x8, p.w1, p.alpha1, x_scale=sx, routing=alpha)
            a, a2 = quantize_y_fold_alpha(y, alpha, p.w2_scale)
        else:
            a = densemoe.fc1(x.to(torch.bfloat16), p.w1, p.alpha1, routing=alpha)
            a2 = alpha * p.w2_scale[None, :]
        a_by_dt[dt] = a
        rec = dict(head, op="fc2", dtype=dt, N=H, K=E * I, backend="triton", **routing_stats(a2, k))
        out_s, out_d = (torch.full((M, H), float("nan"), dtype=torch.bfloat16, device=x.device) for _ in range(2))
        f_skip = lambda a=a, p=p, a2=a2, out=out_s: densemoe.fc2(a, p.w2, a2, skip=True, out=out)  # noqa: E731
        f_dense = lambda a=a, p=p, a2=a2, out=out_d: densemoe.fc2(a, p.w2, a2, skip=False, out=out)  # noqa: E731
        rec.update(_config_fields("fc2", a, p.w2, a2, out_s))
        if rec.get("block_m"):
            rec["tile_pairs"] = tile_pairs(a2, rec["block_m"])
        try:
            rec["compile_s"] = _timed(f_skip)
            rec["dense_compile_s"] = _timed(f_dense)
        except Exception as exc:  # noqa: BLE001
            _failed(rec, exc, records, log)
            continue
        ref = fc2_ref(a, p.w2, a2, torch.float32, compute_dtype=torch.float32)
        ok = _check(rec, out_s, out_d, ref, BOUNDS["fc2"][dt], records, log)
        del ref
        if ok:
            ours.append((rec, f_skip, f_dense))
    if not ours:
        return records
    a8 = a_by_dt.get("fp8", a_by_dt.get("bf16", a).to(case.prepared["fp8"].w2.dtype))
    a16 = a_by_dt["bf16"] if "bf16" in a_by_dt else a8.to(torch.bfloat16)
    bases = _gemm_baselines(case, a8, a16, case.prepared["fp8"].w2, case.prepared["bf16"].w2)
    res = _compare(timer, [f for _, fs, fd in ours for f in (fs, fd)] + list(bases.values()))
    base = {name: r["us"] for name, r in zip(bases, res[2 * len(ours):])}
    for j, (rec, f_skip, _) in enumerate(ours):
        es = 1 if rec["dtype"] == "fp8" else 2
        A = rec["active_experts"]
        io = M * E * 4 + M * H * 2
        _finish(rec, res[2 * j], res[2 * j + 1], A * H * I * es + M * A * I * es + io, 2 * M * A * H * I,
                E * H * I * es + M * E * I * es + io, 2 * M * E * H * I, ceiling, peaks[rec["dtype"]], base)
        _in_graph(rec, timer, f_skip)
        records.append(rec)
        log(fmt_skip(rec))
    return records


def _layer(case, head, x, gate, dtypes, cublas, hf, timer, ceiling, peaks, log) -> list:
    E, I, H, k, M = case.E, case.I, case.H, case.k, head["M"]
    records, ours = [], []

    def torch_route(x, gate=gate, k=k):  # the baselines' router: same gate, softmax top-k in torch
        return softmax_topk(torch.nn.functional.linear(x, gate), k, renormalize=True, impl="torch")
    router = DenseMoE(case.prepared["bf16"], gate, k, renormalize=True)
    route = router.route(x)
    stats = routing_stats(route.alpha, k)
    ref = experts_ref(x, case.w13, case.w2, route.alpha, compute_dtype=torch.float32, experts_per_chunk=32)
    interleaved, once, err_torch = layer_baselines(x, route.alpha, ref, cublas, hf, torch_route, M, log)
    bases = {**interleaved, **once}
    for dt in dtypes:
        m_skip = DenseMoE(case.prepared[dt], gate, k, renormalize=True, skip=True)
        m_dense = DenseMoE(case.prepared[dt], gate, k, renormalize=True, skip=False)
        rec = dict(head, op="layer", dtype=dt, N=H, K=H, backend="triton", rel_err_torch_fp8=err_torch, **stats)
        f_skip = lambda m=m_skip: m(x)  # noqa: E731
        f_dense = lambda m=m_dense: m(x)  # noqa: E731
        try:
            t0 = time.time()
            out_s = f_skip()
            rec["compile_s"] = time.time() - t0
            t0 = time.time()
            out_d = f_dense()
            rec["dense_compile_s"] = time.time() - t0
        except Exception as exc:  # noqa: BLE001
            _failed(rec, exc, records, log)
            continue
        bound = BOUNDS["layer"][dt]
        if dt == "fp8" and err_torch:  # the bound: 1.5x the cuBLAS fp8 pipeline's error
            bound = max(bound, 1.5 * err_torch)
        if _check(rec, out_s, out_d, ref, bound, records, log):
            if err_torch:
                rec["err_ratio_vs_torch_fp8"] = rec["rel_err"] / err_torch
            ours.append((rec, f_skip, f_dense))
    del ref
    if not ours:
        return records
    res = _compare(timer, [f for _, fs, fd in ours for f in (fs, fd)] + list(bases.values()))
    base = {name: r["us"] for name, r in zip(bases, res[2 * len(ours):])}
    for j, (rec, f_skip, _) in enumerate(ours):
        es = 1 if rec["dtype"] == "fp8" else 2
        A = rec["active_experts"]
        io = E * H * 2 + 2 * M * H * 2
        router_flops = 2 * M * E * H
        _finish(rec, res[2 * j], res[2 * j + 1], A * 3 * I * H * es + io, 2 * M * A * 3 * I * H + router_flops,
                E * 3 * I * H * es + io, 2 * M * E * 3 * I * H + router_flops, ceiling, peaks[rec["dtype"]], base)
        _in_graph(rec, timer, f_skip)
        records.append(rec)
        log(fmt_skip(rec))
    return records


# -- reporting -------------------------------------------------------------------------------------

def _baselines(rs: list[dict]) -> list[str]:
    return sorted({key for r in rs for key in r if key.endswith("_us") and key not in NOT_BASELINES})


def fmt_skip(r: dict) -> str:
    tgt = f"{r['target_us']:7.1f}" if r.get("target_us") else "      -"
    meets = {True: "MEETS", False: "miss ", None: "  -  "}[r.get("meets_target")]
    extra = " ".join(f"{b[:-3]}={r[b]:.1f}" for b in _baselines([r]) if r.get(b))
    return (f"{r['op']:5} {r['shape']:16} {r['dtype']:4} {r['routing']:7} {r['M']:>4} act {r['active_experts']:>3}/"
            f"{r['E']:<3} {r['us']:8.1f} us floor {r['floor_us']:7.1f} target {tgt} {meets} dense {r['dense_us']:8.1f}"
            f" x{r['vs_dense']:5.2f} (dense floor {r['dense_floor_us']:.1f}) err {r['rel_err']:.2e}  {extra}")


def _f(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_skip(meta: dict, records: list[dict]) -> str:
    """One table per op (us, floor, target, dense path, baselines), a target summary, and the
    layer under skewed against uniform routing."""
    lines = [f"# Expert skipping ({'/'.join(o for o in OPS if any(r['op'] == o for r in records))}) on "
             f"{meta['device']}", "",
             f"commit `{meta['commit']}`, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}. "
             f"Read ceiling {meta['read_ceiling_tb_s']:.2f} TB/s, peaks fp8 {meta['peak_tflops']['fp8']:.0f} / "
             f"bf16 {meta['peak_tflops']['bf16']:.0f} TFLOP/s, same run.", "", f"Command: `{meta['command']}`", "",
             "Floor = bytes of the active experts (picked by at least one token) / read ceiling (bench/skip.py). "
             "Target: FC1 / FC2 1.15 x floor + 5 us below M = 128; the layer 35 us at M = 1 and 90 us at M = 8; "
             f"from M = {ALL_ACTIVE_M} every op at most 2% slower than its dense path (1.02 x dense us). "
             "`x dense` = dense us / us. `us`: the op alone in a CUDA graph, the graph's launch included "
             "(as every ratio here); `in graph us`: the same op inside one graph right behind the L2 flush, "
             "as inside a serving engine's graph of a whole step (Timer.in_graph).", ""]
    ok = [r for r in records if r.get("us")]
    for op in OPS:
        rs = [r for r in ok if r["op"] == op]
        if not rs:
            continue
        bases = _baselines(rs)
        lines += [f"## {op}", "",
                  "| shape | dtype | routing | M | active experts | us | floor us | target us | meets | in graph us | "
                  "meets in graph | dense us | x dense | " + "".join(f"{b[:-3]} us | x {b[:-3]} | " for b in bases)
                  + "rel err |",
                  "|---|---|---|---:|---:|---:|---:|---:|:---:|---:|:---:|---:|---:|" + "---:|" * (2 * len(bases) + 1)]
        for r in rs:
            cells = []
            for b in bases:
                t = r.get(b)
                cells += [f"{t:.1f}", f"{t / r['us']:.2f}"] if t else ["-", "-"]
            yes = {True: "yes", False: "**no**", None: "-"}
            meets, meets_g = yes[r.get("meets_target")], yes[r.get("meets_target_in_graph")]
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['routing']} | {r['M']} | {r['active_experts']} | "
                         f"{r['us']:.1f} | {r['floor_us']:.1f} | {_f(r.get('target_us'))} | {meets} | "
                         f"{_f(r.get('us_in_graph'))} | {meets_g} | {r['dense_us']:.1f} | {r['vs_dense']:.2f} | "
                         + "".join(c + " | " for c in cells)
                         + f"{r['rel_err']:.2e} |")
        for key, how in (("meets_target", ""), ("meets_target_in_graph", " in graph")):
            judged = [r for r in rs if r.get(key) is not None]
            if judged:
                n = sum(r[key] for r in judged)
                lines += ["", f"{op}: {n} of {len(judged)} points meet their target{how}"
                          + ("." if n == len(judged) else ": misses at " + ", ".join(
                              f"{r['routing']} {r['dtype']} M={r['M']}" for r in judged if not r[key]) + ".")]
        lines.append("")
    calls = [r for r in ok if r["op"] == "fc1" and r.get("layer_call_us")]
    if calls:
        lines += ["## fc1 as the layer calls it", "",
                  "`fill_unpicked=False` (the segments of unpicked experts stay unwritten: the y quantisation "
                  "and FC2 never read them) and, at M = 1, the router's top-k ids as the expert list "
                  "(`expert_ids`); output checked against the call above on the picked segments; timed "
                  "after the rounds above, not interleaved with them.", "",
                  "| shape | dtype | routing | M | us | in graph us | target us | fc1 us (above) |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in calls:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['routing']} | {r['M']} | {r['layer_call_us']:.1f} | "
                         f"{_f(r.get('layer_call_us_in_graph'))} | {_f(r.get('target_us'))} | {r['us']:.1f} |")
        lines.append("")
    lay = {(r["shape"], r["dtype"], r["M"], r["routing"]): r for r in ok if r["op"] == "layer"}
    pairs = sorted({key[:3] for key in lay if (*key[:3], "uniform") in lay and (*key[:3], "skewed") in lay})
    if pairs:
        hot = sorted({r["n_hot"] for r in lay.values()})
        lines += ["## layer: skewed against uniform routing", "",
                  f"Skewed: ~{HOT_SHARE:.0%} of the picks on {'/'.join(map(str, hot))} hot experts (their gate rows "
                  "scaled; bench/skip.py). Fewer "
                  "active experts means fewer weight bytes for the skipping path; the dense path reads all "
                  "experts either way.", "",
                  "| shape | dtype | M | active uniform | active skewed | hot share skewed | us uniform | us skewed | "
                  "skewed / uniform | dense us uniform | dense us skewed | floor uniform | floor skewed |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key in pairs:
            u, s = lay[(*key, "uniform")], lay[(*key, "skewed")]
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {u['active_experts']} | {s['active_experts']} | "
                         f"{s['hot_fraction']:.2f} | {u['us']:.1f} | {s['us']:.1f} | {s['us'] / u['us']:.2f} | "
                         f"{u['dense_us']:.1f} | {s['dense_us']:.1f} | {u['floor_us']:.1f} | {s['floor_us']:.1f} |")
        lines.append("")
    failed = [r for r in records if r.get("us") is None]
    if failed:
        lines += [f"{len(failed)} runs failed or were wrong (see JSON `error`)."]
    return "\n".join(lines) + "\n"


__all__ = ["run_skip", "markdown_skip", "fmt_skip", "routing_alpha", "skewed_gate", "hot_experts", "hot_scale",
           "routing_stats", "target"]
