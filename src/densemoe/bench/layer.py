"""FC1 and whole-layer benchmarks: ours against cuBLAS and transformers, in one process.

Protocol as for FC2 (``bench/fc2.py``): every result is checked against an fp32 reference before
anything is timed; timings are CUDA-graph replays with the L2 flushed before each (``Timer``),
ours and the baselines in three interleaved rounds (``Timer.compare``; ``us`` is the median of
the round medians, ``us_rounds`` the rounds); the read ceiling and GEMM peaks come from the
same process.

FC1 (``op="fc1"``): ``densemoe.fc1`` (SwiGLU and, for fp8, per-token dequantisation fused)
against cuBLAS's *bare* GEMM of the same shape (``x @ w1.T``: FP8 ``_scaled_mm`` and bf16), which
does no activation at all. Floor = max(bytes / read ceiling, FLOPs / peak). fp8 records also
carry FC1 with its output quantised for FC2 per (token, expert): ``fused_quant_us``
(``fc1_fp8_dynamic``, in the epilogue, I <= 256) and ``separate_quant_us`` (bf16 FC1, then
``quantize_y_fold_alpha``), timed in the same interleaved rounds.

Layer (``op="layer"``): router + FC1 + FC2 (``DenseMoE.forward``, its fused Triton router)
against the same routing done in torch ops (gate GEMM, softmax top-k: ``impl="torch"``, timed
in every baseline) followed by
  * transformers' experts module (``Qwen3MoeExperts``, bf16) under its own ``grouped_mm`` and
    ``batched_mm`` implementations;
  * the same fp8 pipeline through cuBLAS: per-token quantisation of x, FP8 ``_scaled_mm`` for
    FC1 (row-wise scales), SwiGLU in torch, routing weights folded into the activations,
    per-token quantisation, FP8 ``_scaled_mm`` for FC2.
``experts_only_us`` is ours without the router (``experts_forward`` with a given alpha; where
it takes ``strategy=``, also the router's ``expert_ids`` and ``topk_weights``, as the layer calls it),
``router_us`` our router alone and ``torch_router_us`` the baselines' router alone; none is a
baseline.
Layer floor (``floor_us``): the larger of the bytes of the experts the routing picked
(``active_experts``, the union over the M tokens; ``routing="gate"``: the benchmark gate on random
x, near-uniform top-k; x is the first of up to 32 draws whose routing picks the number of experts
uniform top-k is expected to, within one: ``expected_active``, ``routing_draws``; see
``ExpertsCase.typical_x``) plus x and out, over the read ceiling, and the routed FLOPs (2 * M * top_k *
3 * I * H; ``tflops`` is these over the time) at the peak; ``dense_floor_us`` counts every expert
for every token (the dense path's own floor, not the problem's).
Errors against the fp32 reference are recorded for ours and for the cuBLAS pipeline
(``rel_err``, ``rel_err_torch_fp8``: the issue bounds their ratio by 1.5).

Experts path (``op="experts"``, issue 19): the same x, routing (our router's top-k on the
benchmark gate) and fp32 reference as the layer records, no router timed. Per dtype,
``densemoe.experts_forward(x, prepared, alpha, strategy=S, expert_ids=topk_ids,
topk_weights=topk_weights)`` with each strategy forced (``dense_us``, ``skip_us``,
``routed_us``) and with the library's rule (``chosen_us``, S = None; ``chosen`` = the name
``densemoe.ops.strategy.pick`` gives for the batch; where S = None gives that strategy's bits,
checked, it is timed once as that line: ``chosen_timed_as``), and the baselines on the same routing, no
router: the cuBLAS fp8 pipeline, transformers' experts under ``grouped_mm`` (``batched_mm`` is
left out: timed once in the layer records), and ``torch_grouped_us`` (``bench/torch_grouped.py``:
the routed pipeline through ``torch._grouped_mm`` in bf16, ``torch._scaled_grouped_mm`` in fp8;
None with ``torch_grouped_note`` where the torch build or device cannot run it). Everything is
checked against the fp32 reference before timing (bounds 0.1 in fp8, 2e-2 in bf16; on a GPU also
captured once in a CUDA graph): what fails or is wrong gets ``<name>_us`` None and
``<name>_error``, and is not timed. All of it is timed in the same interleaved rounds as the layer
records. In a tree whose ``experts_forward`` has no ``strategy=`` yet, dense and skip run through
``skip=False`` / ``skip=True``, chosen through ``skip=None`` and ``routed_us`` is None with
``routed_note``.
Floors of the experts path, A = experts some token picked (``active_experts``, the union over the
M tokens), es = 1 (fp8) or 2 (bf16): ``routed_floor_us`` = max(A * 3*I*H*es (``bytes``: both
weight matrices of the picked experts) / read ceiling, 2*M*k*3*H*I (``flops``, the routed FLOPs)
/ peak); ``floor_us`` is the same, ``dense_floor_us`` as for the layer. Per line L (each strategy,
``chosen``, each baseline): ``L_us``, ``L_tb_s`` (bytes / time), ``L_pct_floor`` (routed floor /
time), ``L_rounds`` (the round medians); ``us``, ``tb_s``, ``pct_floor`` are chosen's;
``speedup_vs_<baseline>`` = baseline us / chosen us; ``best`` = the fastest forced strategy,
``chosen_over_best`` = chosen us / its us (the issue's bound: 1.03). ``run_layer`` returns the
layer records, then the experts records; ``skip_max_m`` leaves the skip strategy untimed above it
(``skip_note``). transformers' ``batched_mm`` is not run where it would gather more than
``BATCHED_MM_MAX_BYTES`` of expert weights (DeepSeek-V3 TP8 and Qwen3-30B-A3B: M > 512).

dtype ``fp8block`` (issue 20; ``layer`` only, not ``fc1``): the case's bf16 weights quantised to
e4m3 per 128 x 128 block (``quantize_per_block``: scale = block amax / 448, float32 [E, rows/128,
cols/128]) and prepared with ``prepare_weights(..., w13_scale=, w2_scale=)``; its reference is
fp32 on the dequantised weights (``rel_err`` of its layer and experts records). Its experts
record: ``dense_us``, ``skip_us`` and ``routed_us`` (every strategy runs block-scaled weights);
``chosen`` from the library's rule, and where ``strategy=None`` gives that strategy's line's
bits, timed once (``chosen_timed_as``: ``chosen_us`` = that line's us);
``routed_per_expert_fp8_us``: the dequantised weights requantised per expert
(``prepare_weights(deq, dtype="fp8")``) on strategy "routed", in the same rounds, with
``rel_err_routed_per_expert_fp8`` against the same reference; ``block_over_per_expert`` =
routed us / its us (issue 20's bar at M <= 64: 1.08) and ``err_block_over_per_expert`` = the
errors' ratio; ``torch_grouped_us``: torch's bf16 grouped pipeline on the dequantised weights;
the cuBLAS fp8 and transformers baselines are the shared ones (on the original bf16 weights).
Its bytes (floors, TB/s) count the fp8 weights plus the float32 block scales (1/4096 of them:
one 4-byte scale per 16384 weights).
"""

from __future__ import annotations

import inspect
import math
import time

import torch

import densemoe
from densemoe.kernels.common import RoutedProblem
from densemoe.bench.torch_grouped import TorchGrouped
from densemoe.layer import DenseMoE
from densemoe.ops import strategy as strategy_rule
from densemoe.ops.fc1 import DYNAMIC_MAX_I, fc1_fp8_dynamic
from densemoe.quant import FP8, quantize_per_expert, quantize_per_token, quantize_y_fold_alpha
from densemoe.reference import experts_ref, fc1_ref
from densemoe.ops.fc1 import which_backend as fc1_which_backend
from densemoe.routing import softmax_topk
from densemoe.shapes import SHAPES
from densemoe.tuning.ops import typical_draw
from densemoe.timing import capture
from densemoe.weights import prepare_weights

DTYPES = {"fp8": FP8, "bf16": torch.bfloat16}
BLOCK_DTYPE = "fp8block"  # issue 20: e4m3 weights with a float32 scale per 128 x 128 block (layer only)
LAYER_DTYPES = tuple(DTYPES) + (BLOCK_DTYPE,)
BLOCK = 128
PEAK_OF = {"fp8": "fp8", "bf16": "bf16", BLOCK_DTYPE: "fp8"}  # which measured GEMM peak bounds a dtype
BLOCK_NOTE = "the FC1 benchmark has no block-scaled baseline"  # why `fc1` leaves fp8block out
# fp8block records' extra line: the same weights requantised per expert, routed (issue 20's 1.08x bar)
PER_EXPERT = "routed_per_expert_fp8"
NOT_BASELINES = ("floor_us", "us", "experts_only_us", "router_us", "torch_router_us", "fused_quant_us",
                 "separate_quant_us", "dense_floor_us")  # *_us keys that are not baselines
STRATEGIES = ("dense", "skip", "routed")  # the experts path's forced strategies; None: the rule ("chosen")
BOUNDS = {"fp8": 0.1, "bf16": 2e-2, BLOCK_DTYPE: 0.1}  # rel err against the fp32 reference, ours and the baselines
# transformers' batched_mm gathers each (token, slot)'s expert weights: M*k*3*I*H*2 bytes (DeepSeek-V3
# TP8: 45 GB at M = 512, 360 GB at M = 4096); above this it is not run (it would not fit, or crowd
# out the rest of the run)
BATCHED_MM_MAX_BYTES = 48 * 2**30


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _rates(rec: dict, nbytes: float, flops: float, floor: float, base: dict) -> None:
    us = rec["us"]
    rec.update(bytes=nbytes, floor_us=floor, tb_s=nbytes / us / 1e6, tflops=flops / us / 1e6,
               pct_floor=100 * floor / us)
    for name, t in base.items():
        rec[name] = t
        if t:
            rec["speedup_vs_" + name[:-3]] = t / us


def _wrong(rec: dict, err: float, bound: float, records: list, log) -> bool:
    """Record and report a result above ``bound`` (never timed); False when it is right."""
    if math.isfinite(err) and err <= bound:
        return False
    rec.update(us=None, error=f"wrong result: rel err {err:.3e} > {bound}")
    records.append(rec)
    log(f"  WRONG {rec['op']} {rec['shape']} {rec['dtype']} M={rec['M']}: {err:.3e}")
    return True


def weight_bytes(dt: str, experts: int, I: int, H: int) -> int:
    """Bytes of ``experts`` experts' two matrices (3*I*H weights each) held in ``dt``; fp8block
    adds its float32 scales, one per 128 x 128 block: 3*(I/128)*(H/128)*4 bytes an expert, 1/4096
    of the fp8 bytes (issue 20 says 1/16384: that counts scales, not their 4 bytes)."""
    n = 3 * experts * I * H
    if dt == BLOCK_DTYPE:
        return n + 3 * experts * (I // BLOCK) * (H // BLOCK) * 4
    return n * (2 if dt == "bf16" else 1)


def quantize_per_block(w: torch.Tensor, block: int = BLOCK, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, R, C] (R, C multiples of ``block``) -> (q [E, R, C] e4m3, scale [E, R/block, C/block]
    float32), w ~= q * scale per block: scale = block amax / 448 (1 for an all-zero block), as
    DeepSeek-V3 / Qwen3-FP8 checkpoints hold them (``weight_scale_inv``). ``chunk`` experts at a
    time, so the fp32 copy stays small."""
    E, R, C = w.shape
    if R % block or C % block:
        raise ValueError(f"quantize_per_block: {tuple(w.shape)} is not made of {block} x {block} blocks")
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    s = torch.empty(E, R // block, C // block, dtype=torch.float32, device=w.device)
    for e0 in range(0, E, chunk):
        wf = w[e0:e0 + chunk].float().reshape(-1, R // block, block, C // block, block)
        amax = wf.abs().amax(dim=(2, 4))
        sc = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
        q[e0:e0 + chunk] = (wf / sc[:, :, None, :, None]).clamp(-448.0, 448.0).to(FP8).reshape(-1, R, C)
        s[e0:e0 + chunk] = sc
    return q, s


def dequantize_per_block(q: torch.Tensor, s: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The float32 weights block-scaled ``q`` stands for: q * scale, block by block."""
    E, R, C = q.shape
    return (q.float().reshape(E, R // block, block, C // block, block) * s[:, :, None, :, None]).reshape(E, R, C)


class ExpertsCase:
    """One shape's experts in checkpoint layout (bf16), prepared once per dtype."""

    def __init__(self, shape_name, device="cuda", seed: int = 0, scale: float = 1.0):
        s = SHAPES[shape_name] if isinstance(shape_name, str) else shape_name  # a name or a MoEShape
        self.shape, self.E, self.I, self.H, self.k = s, s.experts, s.inter, s.hidden, s.topk
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.device = device
        self.w13 = (torch.randn(self.E, 2 * self.I, self.H, generator=self.gen, device=device) * self.H ** -0.5
                    * scale).to(torch.bfloat16)
        self.w2 = (torch.randn(self.E, self.H, self.I, generator=self.gen, device=device) * self.I ** -0.5
                   * scale).to(torch.bfloat16)
        self.gate = torch.randn(self.E, self.H, generator=self.gen, device=device).to(torch.bfloat16) * self.H ** -0.5
        self.prepared = {dt: prepare_weights(self.w13, self.w2, dtype=dt) for dt in DTYPES}
        self.w13_deq = self.w2_deq = self.per_expert_from_block = None

    def add_block(self) -> None:
        """dtype fp8block: the bf16 weights quantised per 128 x 128 block (``quantize_per_block``),
        prepared with their block scales (``prepared["fp8block"]``); ``w13_deq`` / ``w2_deq`` the
        float32 weights those stand for (the fp8block reference and torch's baseline use them);
        ``per_expert_from_block``: the same, requantised per expert (``prepare_weights(deq,
        dtype="fp8")``)."""
        q13, s13 = quantize_per_block(self.w13)
        q2, s2 = quantize_per_block(self.w2)
        self.w13_deq, self.w2_deq = dequantize_per_block(q13, s13), dequantize_per_block(q2, s2)
        self.prepared[BLOCK_DTYPE] = prepare_weights(q13, q2, w13_scale=s13, w2_scale=s2)
        self.per_expert_from_block = prepare_weights(self.w13_deq, self.w2_deq, dtype="fp8")

    def x(self, M: int) -> torch.Tensor:
        return torch.randn(M, self.H, generator=self.gen, device=self.device).to(torch.bfloat16)

    def typical_x(self, M: int, topk_ids_of, draws: int = 32) -> tuple[torch.Tensor, int]:
        """(x, the draws it took): the first of up to ``draws`` random x whose routing
        (``topk_ids_of(x)``) picks as many distinct experts as uniform top-k is expected to
        (``strategy.expected_picked``, within one; ``tuning.ops.typical_draw``). At Qwen3-30B-A3B M = 16
        one draw's picked experts vary by +-3.5 of 82 (docs/routed.md, "Routing draws")."""
        if M == 0:
            return self.x(0), 1
        return typical_draw(lambda: self.x(M), topk_ids_of, strategy_rule.expected_picked(M, self.E, self.k), draws)


def cublas_fp8_pipeline(case: ExpertsCase):
    """The fp8 layer through cuBLAS and torch (see the module docstring). Returns fn(x, alpha)."""
    E, I, H = case.E, case.I, case.H
    w1_8, s1 = quantize_per_expert(case.w13)
    w2_8, s2 = quantize_per_expert(case.w2)
    w1 = w1_8.reshape(E * 2 * I, H)
    s1_cols = s1.repeat_interleave(2 * I)[None, :].contiguous()
    w2 = w2_8.permute(1, 0, 2).reshape(H, E * I).contiguous()
    one = torch.ones((1, H), device=case.device)

    def run(x, alpha):
        x8, sx = quantize_per_token(x)
        h = torch._scaled_mm(x8, w1.T, scale_a=sx[:, None], scale_b=s1_cols, out_dtype=torch.bfloat16)
        h = h.float().view(-1, E, 2, I)
        y = torch.nn.functional.silu(h[:, :, 0]) * h[:, :, 1] * (alpha * s2[None, :])[:, :, None]
        y8, sy = quantize_per_token(y.reshape(-1, E * I))
        return torch._scaled_mm(y8, w2.T, scale_a=sy[:, None], scale_b=one, out_dtype=torch.bfloat16)
    return run


def hf_experts(case: ExpertsCase, implementation: str):
    """transformers' Qwen3MoeExperts holding the same weights, under ``implementation``."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=case.H, num_experts=case.E, moe_intermediate_size=case.I,
                         num_experts_per_tok=case.k)
    cfg._experts_implementation = implementation
    mod = Qwen3MoeExperts(cfg).to(device=case.device, dtype=torch.bfloat16)
    with torch.no_grad():
        mod.gate_up_proj.copy_(case.w13)
        mod.down_proj.copy_(case.w2)
    return mod


def layer_baselines(x, alpha, ref, cublas, hf: dict, torch_route, M: int, log):
    """The layer's baselines for tokens x, each checked to run first: (interleaved {name: fn},
    once {name: fn}: ``batched_mm``, 5-40x slower, timed once, error of the cuBLAS fp8 pipeline
    against ``ref`` or None). Every baseline routes with ``torch_route``; ``alpha`` is that
    routing's result, for the error check."""
    interleaved, once, err_torch = {}, {}, None
    if cublas is not None:
        try:
            err_torch = rel_err(cublas(x, alpha), ref)
            interleaved["cublas_fp8_pipeline_us"] = lambda: cublas(x, torch_route(x).alpha)
        except RuntimeError as exc:
            log(f"  cuBLAS pipeline failed at M={M}: {exc}")
    for impl, mod in hf.items():
        def hf_run(m=mod):
            r = torch_route(x)
            return m(x, r.topk_ids, r.topk_weights.to(x.dtype))
        try:
            hf_run()
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported
            log(f"  transformers {impl} failed at M={M}: {type(exc).__name__}: {exc}")
            continue
        (once if impl == "batched_mm" else interleaved)[f"hf_{impl}_bf16_us"] = hf_run
    return interleaved, once, err_torch


def strategy_api() -> bool:
    """Whether ``experts_forward`` takes issue 19's ``strategy=`` and ``topk_weights=`` (the tree
    has the routed path)."""
    params = inspect.signature(densemoe.experts_forward).parameters
    return "strategy" in params and "topk_weights" in params


def experts_call(x, prepared, route, strategy: str | None, top_k: int):
    """(fn, None): ``fn()`` runs densemoe's experts path on ``route`` (a RouterOutput) under
    ``strategy`` ("dense", "skip", "routed"; None: the library's rule), or (None, why not)."""
    if strategy_api():
        return (lambda: densemoe.experts_forward(x, prepared, route.alpha, strategy=strategy,
                                                 expert_ids=route.topk_ids, topk_weights=route.topk_weights)), None
    # before issue 19's API: the dense path and skipping through skip=, no routed path
    if strategy == "routed":
        return None, "not in this tree: experts_forward has no strategy= / topk_weights= (no routed path)"
    skip = {"dense": False, "skip": True, None: None}[strategy]
    return (lambda: densemoe.experts_forward(x, prepared, route.alpha, skip=skip, top_k=top_k,
                                             expert_ids=route.topk_ids)), None


def picked_strategy(M: int, E: int, top_k: int, H: int, I: int, dtype: torch.dtype,
                    device="cpu") -> tuple[str | None, str | None]:
    """(name, None): the strategy that ``experts_forward(strategy=None)`` with the router's ids
    runs for the batch (``densemoe.ops.strategy.pick`` on the same problem and device, recorded
    crossovers included); or (None, why not)."""
    pick = getattr(strategy_rule, "pick", None)
    if pick is None:
        return None, "densemoe.ops.strategy has no pick()"
    try:
        problem = RoutedProblem(M, H, E, I, top_k, dtype, torch.bfloat16)
        return str(pick(M, E, top_k, problem=problem, device=device)), None
    except (TypeError, ValueError) as exc:
        return None, f"strategy.pick failed: {_why(exc)}"


def _why(exc: BaseException) -> str:
    """An exception as one short line for a record (torch's dispatcher errors run to pages)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:240] if text else ''}"


def _checked(fn, ref: torch.Tensor, bound: float) -> tuple[float | None, str | None]:
    """Run ``fn`` once and compare with ``ref``: (rel err, None) when it is right, else (rel err
    or None, why). On a GPU it is then captured once in a CUDA graph, as the timer will: what
    cannot be captured is reported here instead of ending the run."""
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - a line that cannot run is recorded, the run goes on
        return None, f"failed: {_why(exc)}"
    err = rel_err(out, ref)
    if not (math.isfinite(err) and err <= bound):
        return err, f"wrong result: rel err {err:.3e} > {bound}"
    if ref.is_cuda:
        try:
            capture(fn)
        except Exception as exc:  # noqa: BLE001
            return err, f"no CUDA graph capture: {_why(exc)}"
    return err, None


def torch_grouped_pipelines(case, dtypes, log) -> dict:
    """{dtype: TorchGrouped, or the reason it cannot be built (str)}. fp8block: the bf16 pipeline
    on the dequantised block-fp8 weights."""
    out = {}
    for dt in dtypes:
        try:
            if dt == BLOCK_DTYPE:
                out[dt] = TorchGrouped(case.w13_deq, case.w2_deq, "bf16")
            else:
                out[dt] = TorchGrouped(case.w13, case.w2, dt)
        except Exception as exc:  # noqa: BLE001 - a baseline this torch lacks is recorded, not fatal
            out[dt] = f"not built: {_why(exc)}"
            log(f"  no torch grouped baseline in {dt}: {out[dt]}")
    return out


def experts_path(case, x, route, ref, dtypes, cublas, hf: dict, grouped: dict, M: int, commit: str, device: str,
                 log, skip_max_m: int | None = None, block_ref=None) -> tuple[list[dict], dict, list]:
    """The experts path at one M (module docstring): (records, one per dtype; shared, the
    baselines common to every dtype (their ``*_us`` filled in after timing, then copied into each
    record); timed, [(target dict, key, fn)] for the interleaved rounds). Every line is checked
    first; what fails is recorded (``*_error`` / ``*_note``) and left out of ``timed``.
    ``block_ref``: the fp32 reference on the dequantised block-fp8 weights (dtype fp8block)."""
    E, I, H, k = case.E, case.I, case.H, case.k
    ids, weights = route.topk_ids, route.topk_weights
    shared, timed = {"baselines": []}, []

    def line(target: dict, name: str, fn, bound: float, err_key: str | None = None, against=None) -> None:
        err, bad = _checked(fn, ref if against is None else against, bound)
        target[err_key or f"rel_err_{name}"] = err
        if bad:
            target[f"{name}_us"] = None
            target[f"{name}_error"] = bad
            log(f"  FAILED experts {case.shape.name} M={M} {name}: {bad}")
        else:
            timed.append((target, f"{name}_us", fn))

    if cublas is not None:
        shared["baselines"].append("cublas_fp8_pipeline")
        line(shared, "cublas_fp8_pipeline", lambda: cublas(x, route.alpha), BOUNDS["fp8"])
    for impl, mod in hf.items():
        if impl == "batched_mm":  # 5-40x slower and memory-hungry: timed once in the layer records
            continue
        name = f"hf_{impl}_bf16"
        shared["baselines"].append(name)
        line(shared, name, lambda m=mod: m(x, ids, weights.to(x.dtype)), BOUNDS["bf16"])
    act = int(torch.zeros(E, dtype=torch.bool, device=ids.device).index_fill_(0, ids.reshape(-1), True).sum())
    api = strategy_api()
    records = []
    for dt in dtypes:
        p = case.prepared[dt]
        if dt == BLOCK_DTYPE:
            records.append(_block_record(case, x, route, block_ref, p, shared, grouped.get(dt), line, M, commit,
                                         device, act, api, log))
            continue
        rec = dict(device=device, op="experts", shape=case.shape.name, dtype=dt, M=M, N=H, K=H, E=E, I=I,
                   top_k=k, backend="triton", commit=commit, routing="gate", active_experts=act,
                   strategy_api=api, baselines=list(shared["baselines"]) + ["torch_grouped"])
        rec["chosen"], note = picked_strategy(M, E, k, H, I, p.dtype, x.device)
        if note:
            rec["chosen_note"] = note
        g = grouped.get(dt)
        if isinstance(g, TorchGrouped):
            line(rec, "torch_grouped", lambda g=g: g(x, ids, weights), BOUNDS[dt])
            if rec.get("torch_grouped_error"):  # why it is None, under the key the issue names
                rec["torch_grouped_note"] = rec["torch_grouped_error"]
        else:
            rec.update(torch_grouped_us=None, torch_grouped_note=g or "not built")
        fns = {}
        for s in STRATEGIES:
            if s == "skip" and skip_max_m is not None and M > skip_max_m:
                rec.update(skip_us=None, skip_note=f"not timed above M = {skip_max_m} (slow there)")
                continue
            fn, why = experts_call(x, p, route, s, k)
            fns[s] = fn
            if fn is None:
                rec[f"{s}_us"] = None
                rec[f"{s}_note"] = why
                continue
            line(rec, s, fn, BOUNDS[dt])
        _chosen_line(rec, fns, experts_call(x, p, route, None, k), line, BOUNDS[dt], None,
                     lambda why: log(f"  experts {case.shape.name} {dt} M={M}: strategy=None failed: {why}"))
        if rec.get("chosen_error"):
            rec["error"] = rec["chosen_error"]
        records.append(rec)
    return records, shared, timed


def _block_record(case, x, route, ref, p, shared, g, line, M, commit, device, act, api, log) -> dict:
    """dtype fp8block's experts record (module docstring): ``dense``, ``skip`` and ``routed``
    forced; ``chosen`` = the library's rule, timed once as the forced line it runs (same output
    bits, checked) and on its own otherwise; the per-expert requantisation, routed
    (``PER_EXPERT``); torch's bf16 grouped pipeline on the dequantised weights. All checked
    against ``ref`` (fp32 on the dequantised weights)."""
    E, I, H, k = case.E, case.I, case.H, case.k
    rec = dict(device=device, op="experts", shape=case.shape.name, dtype=BLOCK_DTYPE, M=M, N=H, K=H, E=E, I=I,
               top_k=k, backend="triton", commit=commit, routing="gate", active_experts=act, strategy_api=api,
               baselines=list(shared["baselines"]) + ["torch_grouped"], block=p.block)
    if isinstance(g, TorchGrouped):
        line(rec, "torch_grouped", lambda: g(x, route.topk_ids, route.topk_weights), BOUNDS["bf16"], against=ref)
        if rec.get("torch_grouped_error"):
            rec["torch_grouped_note"] = rec["torch_grouped_error"]
    else:
        rec.update(torch_grouped_us=None, torch_grouped_note=g or "not built")
    try:
        problem = RoutedProblem(M, H, E, I, k, p.dtype, torch.bfloat16, getattr(p, "block", 0))
        rec["chosen"] = strategy_rule.resolve("bench", None, None, M, E, top_k=k, problem=problem, device=x.device)
    except (TypeError, ValueError, AttributeError) as exc:
        rec.update(chosen=None, chosen_note=f"strategy.resolve failed: {_why(exc)}")
    fns = {}
    for name in STRATEGIES:
        fn, why = experts_call(x, p, route, name, k)
        fns[name] = fn
        if fn is None:
            rec.update({f"{name}_us": None, f"{name}_note": why})
        else:
            line(rec, name, fn, BOUNDS[BLOCK_DTYPE], against=ref)
    _chosen_line(rec, fns, experts_call(x, p, route, None, k), line, BOUNDS[BLOCK_DTYPE], ref,
                 lambda why: log(f"  experts {case.shape.name} fp8block M={M}: strategy=None failed: {why}"))
    pe, why = experts_call(x, case.per_expert_from_block, route, "routed", k)
    if pe is None:
        rec.update({f"{PER_EXPERT}_us": None, f"{PER_EXPERT}_note": why})
    else:
        line(rec, PER_EXPERT, pe, BOUNDS["fp8"], against=ref)
    if rec.get("chosen_error"):
        rec["error"] = rec["chosen_error"]
    return rec


def _chosen_line(rec: dict, fns: dict, chosen_call, line, bound: float, against, warn) -> None:
    """The ``chosen`` line (``strategy=None``): where it gives the bits of the forced strategy it
    picked (checked here), that strategy's timing is its timing (``chosen_timed_as``), so the
    two are one callable timed once; else it is checked and timed on its own. Timed twice, the
    same work read 3-5% apart at M >= 1024 on the H200 (2026-12-05, seventh session: the line
    right after the dense one read slower; docs/routed.md), a gap that then showed as a chosen
    strategy faster than the best forced one."""
    chosen_fn, chosen_why = chosen_call
    name = rec.get("chosen")
    fn = fns.get(name)
    same = False
    if fn is not None and chosen_fn is not None and rec.get(f"{name}_error") is None:
        try:
            same = torch.equal(fn(), chosen_fn())
        except Exception as exc:  # noqa: BLE001 - timed on its own below, where it fails too
            warn(_why(exc))
    if same:  # one callable, timed once; its result lands on both keys
        rec.update(chosen_timed_as=name, rel_err=rec[f"rel_err_{name}"])
    elif chosen_fn is None:
        rec.update(chosen_us=None, chosen_note=chosen_why, rel_err=None)
    else:
        line(rec, "chosen", chosen_fn, bound, err_key="rel_err", against=against)


def _experts_rates(rec: dict, shared: dict, I: int, H: int, ceiling: dict, peaks: dict) -> None:
    """Fill in the experts record's floors, rates and ratios (module docstring) once timed."""
    rec.update({key: v for key, v in shared.items() if key != "baselines"})
    dt, M, k, E, act = rec["dtype"], rec["M"], rec["top_k"], rec["E"], rec["active_experts"]
    peak = peaks[PEAK_OF[dt]]
    nbytes = weight_bytes(dt, act, I, H)
    flops = 2 * M * k * 3 * H * I
    floor = max(nbytes / ceiling["tb_s"] / 1e6, flops / peak / 1e6)
    dense_bytes = weight_bytes(dt, E, I, H) + 2 * M * H * 2
    rec.update(bytes=nbytes, flops=flops, routed_floor_us=floor, floor_us=floor,
               dense_floor_us=max(dense_bytes / ceiling["tb_s"] / 1e6, 2 * M * 3 * E * I * H / peak / 1e6))
    if dt == BLOCK_DTYPE:  # issue 20's bars: time and error of block scales over per-expert requantisation
        t, t_pe = rec.get("routed_us"), rec.get(f"{PER_EXPERT}_us")
        e, e_pe = rec.get("rel_err_routed"), rec.get(f"rel_err_{PER_EXPERT}")
        rec["block_over_per_expert"] = t / t_pe if t and t_pe else None
        rec["err_block_over_per_expert"] = e / e_pe if e is not None and e_pe else None
    for name in STRATEGIES + ("chosen", PER_EXPERT) + tuple(rec["baselines"]):
        if name == PER_EXPERT and dt != BLOCK_DTYPE:
            continue
        t = rec.get(f"{name}_us")
        rec[f"{name}_tb_s"] = nbytes / t / 1e6 if t else None
        rec[f"{name}_pct_floor"] = 100 * floor / t if t else None
    us = rec["us"] = rec.get("chosen_us")
    rec.update(tb_s=rec["chosen_tb_s"], pct_floor=rec["chosen_pct_floor"], tflops=flops / us / 1e6 if us else None)
    for b in rec["baselines"]:
        t = rec.get(f"{b}_us")
        rec[f"speedup_vs_{b}"] = t / us if t and us else None
    forced = {s: rec[f"{s}_us"] for s in STRATEGIES if rec.get(f"{s}_us")}
    rec["best"] = min(forced, key=forced.get) if forced else None
    rec["chosen_over_best"] = us / forced[rec["best"]] if us and forced else None


def _compare(timer, fns: list) -> list[dict]:
    """Interleaved rounds (``Timer.compare``): a slow spell of the GPU (seen after the fp32
    references: the first timing then reads 10-20% slow) lands on one round of every callable."""
    if hasattr(timer, "compare"):
        return timer.compare(fns)
    return [timer(fn) for fn in fns]


def run_fc1(shapes, dtypes, ms, timer, ceiling, peaks, device, commit, log=print, dev="cuda"):
    """Per M: every result checked first; then ours (each dtype) and cuBLAS's bare FP8 and bf16
    GEMMs timed in interleaved rounds. fp8block is left out here (``BLOCK_NOTE``), with a log
    line; ``layer`` times it."""
    if BLOCK_DTYPE in dtypes:
        log(f"  fc1: {BLOCK_DTYPE} left out ({BLOCK_NOTE}; `layer` times it)")
        dtypes = [dt for dt in dtypes if dt != BLOCK_DTYPE]
    records = []
    for shape_name in shapes:
        case = ExpertsCase(shape_name, dev)
        shape_name = case.shape.name
        E, I, H = case.E, case.I, case.H
        N = E * 2 * I
        w1_bf16 = case.w13.reshape(N, H)
        w1_fp8 = case.prepared["fp8"].w1
        one = torch.ones((), device=dev)
        for M in ms:
            x = case.x(M)
            x8, sx = quantize_per_token(x)
            bases = {"cublas_fp8_us": lambda: torch._scaled_mm(x8, w1_fp8.T, scale_a=one, scale_b=one,
                                                               out_dtype=torch.bfloat16),
                     "cublas_bf16_us": lambda: x @ w1_bf16.T}
            ours = []
            for dt in dtypes:
                p = case.prepared[dt]
                xin, xs = (x8, sx) if dt == "fp8" else (x, None)
                out = torch.full((M, E * I), float("nan"), dtype=torch.bfloat16, device=dev)
                fn = (lambda xin=xin, p=p, xs=xs, out=out:
                      densemoe.fc1(xin, p.w1, p.alpha1, x_scale=xs, out=out))
                _, cfg, src = fc1_which_backend(xin, p.w1, p.alpha1, out, x_scale=xs, with_source=True)
                rec = dict(device=device, op="fc1", shape=shape_name, dtype=dt, M=M, N=N, K=H, E=E,
                           backend=cfg.backend, config=cfg.to_str(), config_source=src, commit=commit)
                t0 = time.time()
                fn()
                rec["compile_s"] = time.time() - t0
                ref = fc1_ref(xin, p.w1, p.alpha1, x_scale=xs, out_dtype=torch.float32, compute_dtype=torch.float32)
                rec["rel_err"] = err = rel_err(out, ref)
                del ref
                if not _wrong(rec, err, 1e-2, records, log):
                    ours.append((rec, fn))
            # FC1 with its output quantised for FC2 (fp8 only): in the epilogue (I <= 256), and
            # as bf16 FC1 + the separate quantisation kernel; checked, then timed with the rest
            extra = {}
            p8 = case.prepared["fp8"]
            if "fp8" in dtypes:
                top = torch.randn(M, E, device=dev, generator=case.gen).topk(case.k, dim=1)
                alpha = torch.zeros(M, E, device=dev).scatter_(1, top.indices, top.values.softmax(dim=1))
                y_ref = fc1_ref(x8, p8.w1, p8.alpha1, x_scale=sx, out_dtype=torch.float32, compute_dtype=torch.float32)
                if I <= DYNAMIC_MAX_I:
                    y8, ys = fc1_fp8_dynamic(x8, p8.w1, p8.alpha1, x_scale=sx)
                    deq = (y8.float().reshape(M, E, I) * ys[:, :, None]).reshape(M, E * I)
                    if rel_err(deq, y_ref) <= 0.08:
                        extra["fused_quant_us"] = lambda: fc1_fp8_dynamic(x8, p8.w1, p8.alpha1, x_scale=sx)
                    else:
                        log(f"  WRONG fc1_fp8_dynamic at M={M}: rel err {rel_err(deq, y_ref):.3e}")
                extra["separate_quant_us"] = lambda: quantize_y_fold_alpha(
                    densemoe.fc1(x8, p8.w1, p8.alpha1, x_scale=sx), alpha, p8.w2_scale)
                del y_ref
            res = _compare(timer, list(bases.values()) + [fn for _, fn in ours] + list(extra.values()))
            base = {name: r["us"] for name, r in zip(bases, res)}
            extra_us = {name: r["us"] for name, r in zip(extra, res[len(bases) + len(ours):])}
            for (rec, _), r in zip(ours, res[len(bases):len(bases) + len(ours)]):
                rec.update(r)
                if rec["dtype"] == "fp8":
                    rec.update(extra_us)
                es = 1 if rec["dtype"] == "fp8" else 2
                nbytes = N * H * es + M * H * es + M * E * I * 2
                flops = 2 * M * N * H
                floor = max(nbytes / ceiling["tb_s"] / 1e6, flops / peaks[rec["dtype"]] / 1e6)
                _rates(rec, nbytes, flops, floor, base)
                records.append(rec)
                log(fmt(rec))
        del case
    return records


def run_layer(shapes, dtypes, ms, timer, ceiling, peaks, device, commit, log=print, dev="cuda",
              hf_implementations=("grouped_mm", "batched_mm"), skip_max_m: int | None = None):
    """Per M: every result checked first; then ours (each dtype, and its experts without the
    router), the cuBLAS fp8 pipeline and transformers' ``grouped_mm`` timed in interleaved
    rounds, and in the same rounds the experts path (``experts_path``: each strategy, the
    chosen one and the baselines without a router); ``batched_mm`` (5-40x slower) and the
    routers alone once. ``skip_max_m``: the skip strategy is not timed above it (None: at
    every M). Returns the layer records, then the experts records."""
    records, experts_records = [], []
    for shape_name in shapes:
        case = ExpertsCase(shape_name, dev)
        shape_name = case.shape.name
        E, I, H, k = case.E, case.I, case.H, case.k
        if BLOCK_DTYPE in dtypes:
            case.add_block()
        cublas = cublas_fp8_pipeline(case)
        hf = {}
        for impl in hf_implementations:
            try:
                hf[impl] = hf_experts(case, impl)
            except Exception as exc:  # noqa: BLE001 - a baseline that cannot be built is reported
                log(f"  no transformers {impl} baseline: {type(exc).__name__}: {exc}")
        grouped = torch_grouped_pipelines(case, dtypes, log)
        router = DenseMoE(case.prepared["bf16"], case.gate, k, renormalize=True)  # ours: the fused router

        def torch_route(x, gate=case.gate, k=k):  # the baselines' router: same gate, softmax top-k in torch
            return softmax_topk(torch.nn.functional.linear(x, gate), k, renormalize=True, impl="torch")
        for M in ms:
            x, draws = case.typical_x(M, lambda x: router.route(x).topk_ids)
            route = router.route(x)
            ref = experts_ref(x, case.w13, case.w2, route.alpha, compute_dtype=torch.float32, experts_per_chunk=32)
            # fp8block: its own reference, fp32 on the weights the blocks stand for (dequantised)
            block_ref = (experts_ref(x, case.w13_deq, case.w2_deq, route.alpha, compute_dtype=torch.float32,
                                     experts_per_chunk=32) if BLOCK_DTYPE in dtypes else None)
            refs = {BLOCK_DTYPE: block_ref}
            hf_m = hf
            if "batched_mm" in hf and M * k * 3 * I * H * 2 > BATCHED_MM_MAX_BYTES:
                hf_m = {impl: mod for impl, mod in hf.items() if impl != "batched_mm"}
                log(f"  transformers batched_mm not run at M={M}: it would gather "
                    f"{M * k * 3 * I * H * 2 / 2**30:.0f} GiB of expert weights")
            interleaved, once, err_torch = layer_baselines(x, route.alpha, ref, cublas, hf_m, torch_route, M, log)
            ours = []
            for dt in dtypes:
                moe = DenseMoE(case.prepared[dt], case.gate, k, renormalize=True)
                fn = lambda m=moe: m(x)  # noqa: E731
                rec = dict(device=device, op="layer", shape=shape_name, dtype=dt, M=M, N=H, K=H, E=E,
                           backend="triton", commit=commit, rel_err_torch_fp8=err_torch)
                t0 = time.time()
                out = fn()
                rec["compile_s"] = time.time() - t0
                rec["rel_err"] = err = rel_err(out, refs.get(dt, ref))
                if err_torch and dt != BLOCK_DTYPE:  # fp8block: against another reference, no ratio
                    rec["err_ratio_vs_torch_fp8"] = err / err_torch
                if not _wrong(rec, err, BOUNDS[dt], records, log):
                    ours.append((rec, fn, moe))
            exp_recs, exp_shared, exp_timed = experts_path(case, x, route, ref, dtypes, cublas, hf, grouped, M, commit,
                                                           device, log, skip_max_m=skip_max_m, block_ref=block_ref)
            typical = dict(expected_active=strategy_rule.expected_picked(M, E, k), routing_draws=draws)
            for r in exp_recs:
                r.update(typical)
            del ref, block_ref, refs
            if strategy_api():  # issue 19's call, as the layer makes it: the router's ids and weights too
                experts_only = [experts_call(x, moe.prepared, route, None, k)[0] for _, _, moe in ours]
            else:
                experts_only = [lambda m=moe: densemoe.experts_forward(x, m.prepared, route.alpha)
                                for _, _, moe in ours]
            # one set of interleaved rounds: the layer's baselines, ours, ours without the
            # router, then the experts path (shared baselines, then per dtype its lines)
            res = _compare(timer, list(interleaved.values()) + [fn for _, fn, _ in ours] + experts_only
                           + [fn for _, _, fn in exp_timed])
            for (target, key, _), r in zip(exp_timed, res[len(res) - len(exp_timed):]):
                target[key] = r["us"]
                target[key[:-3] + "_rounds"] = r.get("us_rounds")
                if key == target.get("chosen_timed_as", "chosen") + "_us":  # chosen timed as its forced line
                    target.update(chosen_us=r["us"], chosen_rounds=r.get("us_rounds"), us_min=r.get("us_min"),
                                  us_p90=r.get("us_p90"))
            for rec in exp_recs:
                _experts_rates(rec, exp_shared, I, H, ceiling, peaks)
                experts_records.append(rec)
                log(fmt_experts(rec))
            base = {name: r["us"] for name, r in zip(interleaved, res)}
            base.update({name: timer(fn)["us"] for name, fn in once.items()})
            n, k_ours = len(interleaved), len(ours)
            for j, (rec, _, moe) in enumerate(ours):
                rec.update(res[n + j])
                rec["experts_only_us"] = res[n + k_ours + j]["us"]
                rec["router_us"] = timer(lambda: router.route(x))["us"]
                rec["torch_router_us"] = timer(lambda: torch_route(x))["us"]
                peak = peaks[PEAK_OF[rec["dtype"]]]
                act = int((route.alpha != 0).any(dim=0).sum())  # experts some token picked
                nbytes = weight_bytes(rec["dtype"], act, I, H) + 2 * M * H * 2
                flops = 2 * M * k * 3 * I * H  # routed: each token's top-k experts
                floor = max(nbytes / ceiling["tb_s"] / 1e6, flops / peak / 1e6)
                dense_bytes = weight_bytes(rec["dtype"], E, I, H) + 2 * M * H * 2
                rec.update(routing="gate", active_experts=act, **typical,
                           dense_floor_us=max(dense_bytes / ceiling["tb_s"] / 1e6, 2 * M * 3 * E * I * H / peak / 1e6))
                _rates(rec, nbytes, flops, floor, base)
                records.append(rec)
                log(fmt(rec))
        del case, hf, grouped
    return records + experts_records


def fmt(r: dict) -> str:
    extra = " ".join(f"{k[:-3]}={v:.1f}" for k, v in r.items() if k.endswith("_us") and k != "floor_us" and v)
    if r.get("config"):
        extra += f" [{r['config']}]"
    return (f"{r['op']:5} {r['shape']:16} {r['dtype']:4} {r['M']:>4} {r['us']:8.1f} us {r['tb_s']:5.2f} TB/s "
            f"{r['pct_floor']:5.1f}% floor err {r['rel_err']:.2e}  {extra}")


def _cell(t) -> str:
    return f"{t:.1f}" if t else "-"


def fmt_experts(r: dict) -> str:
    """One log line of an experts record: each line's us (routed floor %), chosen's ratios."""
    parts = []
    extra = (PER_EXPERT,) if r["dtype"] == BLOCK_DTYPE else ()
    for name in STRATEGIES + ("chosen",) + extra + tuple(r["baselines"]):
        t = r.get(f"{name}_us")
        parts.append(f"{name}={t:.1f}({r[f'{name}_pct_floor']:.0f}%)" if t else f"{name}=-")
    ratio = f" chosen/best {r['chosen_over_best']:.3f}" if r.get("chosen_over_best") else ""
    if r.get("block_over_per_expert"):
        ratio += f" block/per-expert {r['block_over_per_expert']:.3f}"
    if r.get("err_block_over_per_expert"):
        ratio += f" err block/per-expert {r['err_block_over_per_expert']:.2f}"
    return (f"experts {r['shape']:16} {r['dtype']:4} {r['M']:>4} chosen={r.get('chosen')} routed floor "
            f"{r['routed_floor_us']:.1f} us ({r['active_experts']} experts){ratio}  " + " ".join(parts))


def markdown_experts(records: list[dict]) -> list[str]:
    """The experts path: a table per shape and dtype, M rows; every line's us with its % of the
    routed floor, chosen's TB/s and its speedup over each baseline; then the notes."""
    rs = [r for r in records if r["op"] == "experts"]
    if not rs:
        return []
    lines = ["## experts path (no router): strategies, the chosen one, baselines", "",
             "Same routing (our router on the benchmark gate: near-uniform top-k) and fp32 reference as the "
             "layer; no router timed. Each cell: us (% of the routed floor). Routed floor = max(bytes of the "
             "experts the batch picked, both matrices, at the weight dtype / read ceiling, routed FLOPs / "
             "peak). `chosen` = the library's rule (`strategy=None`); `/ best` = chosen us over the fastest "
             "forced strategy's; `x b` = baseline b's us / chosen us.", ""]
    if any(r["dtype"] == BLOCK_DTYPE for r in rs):
        lines += ["fp8block (issue 20): the bf16 weights quantised to e4m3 per 128 x 128 block (scale = block amax / "
                  "448, float32), prepared with their block scales; every strategy runs them (the Triton kernels), "
                  "and the routed floor counts the scales' bytes too (1/4096 of the fp8 bytes). Its reference "
                  "and `rel err` are fp32 on the dequantised weights; `per-expert fp8` = the same dequantised "
                  "weights requantised per expert (`prepare_weights(deq, dtype=\"fp8\")`), routed, same rounds, "
                  "its error against the same reference; `block / per-expert` = routed us over its us (issue 20's "
                  "bar at M <= 64: 1.08), `err block / per-expert` the same for the errors. Its torch_grouped is the "
                  "bf16 grouped pipeline on the dequantised weights; the cuBLAS and transformers baselines are the "
                  "ones of the other dtypes (per-expert fp8 and bf16 on the original bf16 weights, timed once).", ""]
    notes = {}
    for shape in dict.fromkeys(r["shape"] for r in rs):
        for dt in dict.fromkeys(r["dtype"] for r in rs if r["shape"] == shape):
            sub = sorted((r for r in rs if r["shape"] == shape and r["dtype"] == dt), key=lambda r: r["M"])
            bases = list(dict.fromkeys(b for r in sub for b in r["baselines"]))
            block = dt == BLOCK_DTYPE
            lines += [f"### {shape} {dt}", "",
                      "| M | picked experts | routed floor us | chosen | chosen us | TB/s | / best | "
                      + " | ".join(f"{s} us" for s in STRATEGIES) + " | "
                      + ("per-expert fp8 us | block / per-expert | " if block else "")
                      + " | ".join(f"{b} us | x {b}" for b in bases) + " | rel err |"
                      + (" rel err per-expert fp8 | err block / per-expert |" if block else ""),
                      "|---:|---:|---:|---|---:|---:|---:|"
                      + "---:|" * (len(STRATEGIES) + 2 * len(bases) + 1 + 4 * block)]
            for r in sub:
                def c(name, r=r):
                    t = r.get(f"{name}_us")
                    return f"{t:.1f} ({r[f'{name}_pct_floor']:.0f}%)" if t else "-"
                cells = [c(s) for s in STRATEGIES]
                if block:
                    x = r.get("block_over_per_expert")
                    cells += [c(PER_EXPERT), f"{x:.3f}" if x else "-"]
                for b in bases:
                    x = r.get(f"speedup_vs_{b}")
                    cells += [c(b), f"{x:.2f}" if x else "-"]
                tb = f"{r['tb_s']:.2f}" if r.get("tb_s") else "-"
                ob = f"{r['chosen_over_best']:.3f}" if r.get("chosen_over_best") else "-"
                err = f"{r['rel_err']:.2e}" if r.get("rel_err") is not None else "-"
                if block:
                    e_pe, ratio = r.get(f"rel_err_{PER_EXPERT}"), r.get("err_block_over_per_expert")
                    err += (f" | {e_pe:.2e}" if e_pe is not None else " | -") + (f" | {ratio:.2f}" if ratio else " | -")
                lines.append(f"| {r['M']} | {r['active_experts']} | {r['routed_floor_us']:.1f} | "
                             f"{r.get('chosen') or '-'} | {c('chosen')} | {tb} | {ob} | " + " | ".join(cells)
                             + f" | {err} |")
                for text in dict.fromkeys(f"{key[:key.rfind('_')]}: {v}" for key, v in r.items()
                                          if (key.endswith("_note") or key.endswith("_error")) and v):
                    notes.setdefault(text, []).append(f"{shape} {dt} M={r['M']}")
            lines.append("")
    if notes:
        lines += ["Not timed, failed or wrong (JSON `*_note`, `*_error`):", ""]
        for text, where in notes.items():
            lines.append(f"- {text} ({', '.join(where[:4])}{', ...' if len(where) > 4 else ''})")
        lines.append("")
    return lines


def markdown(meta: dict, records: list[dict]) -> str:
    """One table per op: us, TB/s, TFLOP/s, % floor and every baseline with our speedup."""
    lines = [f"# {'/'.join(sorted({r['op'] for r in records}))} on {meta['device']}", "",
             f"commit `{meta['commit']}`, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}. "
             f"Read ceiling {meta['read_ceiling_tb_s']:.2f} TB/s, peaks fp8 {meta['peak_tflops']['fp8']:.0f} / "
             f"bf16 {meta['peak_tflops']['bf16']:.0f} TFLOP/s, same run.", "", f"Command: `{meta['command']}`", ""]
    for op in ("fc1", "layer"):
        rs = [r for r in records if r["op"] == op and r.get("us")]
        if not rs:
            continue
        bases = sorted({k for r in rs for k in r if k.endswith("_us") and k not in NOT_BASELINES})
        ratio = op == "layer"  # the fp8 layer's error over the torch fp8 pipeline's (bound: 1.5)
        lines += [f"## {op}", "", "| shape | dtype | M | us | TB/s | TFLOP/s | floor us | % floor | "
                  + " | ".join(f"{b[:-3]} us | x {b[:-3]}" for b in bases) + " | rel err |"
                  + (" err / torch fp8 |" if ratio else ""),
                  "|---|---|---:|" + "---:|" * (6 + 2 * len(bases) + ratio)]
        for r in rs:
            cells = []
            for b in bases:
                t = r.get(b)
                cells += [f"{t:.1f}", f"{t / r['us']:.2f}"] if t else ["-", "-"]
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['M']} | {r['us']:.1f} | {r['tb_s']:.2f} | "
                         f"{r['tflops']:.0f} | {r['floor_us']:.1f} | {r['pct_floor']:.1f} | " + " | ".join(cells)
                         + f" | {r['rel_err']:.2e} |"
                         + (f" {r['err_ratio_vs_torch_fp8']:.3f} |" if ratio and r.get("err_ratio_vs_torch_fp8") else
                            " - |" if ratio else ""))
        lines.append("")
    lines += markdown_experts(records)
    failed = [r for r in records if r.get("us") is None]
    if failed:
        lines += [f"{len(failed)} runs failed or were wrong (see JSON `error`)."]
    return "\n".join(lines) + "\n"
