"""Fingerprint of what densemoe computes and launches, to compare a refactor against (CPU only).

    python bench/probes/house_fingerprint.py OUT_DIR [--part outputs,launches,choices,ptx,cute]
    python bench/probes/house_fingerprint.py --compare BEFORE_DIR AFTER_DIR

Run it from the root of each tree (``PYTHONPATH=<tree>/src``), once before and once after a
change, then compare. Issue 18 (the house) was checked this way against 7b52f36 (docs/architecture.md).

outputs:  a battery of public calls under Triton's interpreter (small shapes, fixed seeds);
          every result tensor, saved bitwise (outputs.pt)
launches: every Triton kernel launch of that battery and of a model-shape pass (no execution,
          132 "SMs"): kernel, grid, argument dtypes/shapes/strides, constexprs, launch options
choices:  the heuristics' configs for the model shapes over M = 1..4096 (both ops, both
          backends, skipping), and the tuned tables' picks as an H100 with Triton 3.6 sees them
ptx:      PTX (debug lines stripped) of the Triton kernels compiled for sm_90a
cute:     PTX (debug lines stripped) of CuTe DSL kernels compiled for sm_90a
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

PART_ALL = ("outputs", "launches", "choices", "ptx", "cute")


def _summ(x):
    import torch

    if isinstance(x, torch.Tensor):
        return ["T", str(x.dtype), list(x.shape), list(x.stride()), x.device.type]
    name = type(x).__name__
    if name == "TensorDescriptor":
        return ["D", _summ(x.base), list(x.block_shape)]
    if isinstance(x, (int, float, bool, str)) or x is None:
        return x
    if isinstance(x, (tuple, list)):
        return [_summ(v) for v in x]
    return name


def install_recorder(log, execute=True):
    from triton.runtime.interpreter import InterpretedFunction

    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        g = grid if not callable(grid) else "callable"
        log.append([self.fn.__name__, _summ(list(g) if isinstance(g, tuple) else g), _summ(list(args)),
                    {k: _summ(v) for k, v in sorted(kwargs.items())}])
        if execute:
            return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = run


def patch_interpreter():
    """Before the refactor the interpreter fixes live in tests/conftest.py; after it, in the package."""
    try:
        import densemoe._interpreter  # noqa: F401  (after: applied at import)
    except ImportError:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import conftest

        conftest._patch_interpreter_bf16_dot()


ROOT = os.getcwd()  # run from the repository root


def battery(out: dict) -> None:
    """Small-shape public calls; each result stored under a name."""
    import torch

    import densemoe
    from densemoe import routing
    from densemoe.quant import quantize_per_token, quantize_y_fold_alpha

    FP8 = torch.float8_e4m3fn
    H, E, I = 256, 8, 64

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    def alpha_topk(M, k, g):
        ids = torch.rand(M, E, generator=g).topk(k, dim=1).indices
        wts = torch.softmax(torch.randn(M, k, generator=g), dim=1)
        return torch.zeros(M, E).scatter_(1, ids, wts), ids

    # ---- fc2
    for dt in (FP8, torch.bfloat16):
        for M in (1, 7, 33, 100):
            g = gen(M)
            a = torch.randn(M, E * I, generator=g).to(dt)
            w = (torch.randn(H, E * I, generator=g) * 0.5).to(dt)
            alpha, ids = alpha_topk(M, 2, g)
            for skip in (None, True, False):
                out[f"fc2/{dt}/M{M}/skip{skip}"] = densemoe.fc2(a, w, alpha, skip=skip)
            out[f"fc2/{dt}/M{M}/fp32"] = densemoe.fc2(a, w, alpha, out_dtype=torch.float32)
            ws = torch.rand(E, generator=g) + 0.5
            out[f"fc2/{dt}/M{M}/wscale"] = densemoe.fc2(a, w, alpha, w_scale=ws, skip=True)
            out[f"fc2/{dt}/M{M}/wscale_dense"] = densemoe.fc2(a, w, alpha, w_scale=ws, skip=False)
            if M == 1:
                out[f"fc2/{dt}/M{M}/ids"] = densemoe.fc2(a, w, alpha, skip=True, expert_ids=ids[0, :2])
            for cfg in (densemoe.Fc2TritonConfig(16, 64, 64, split=0), densemoe.Fc2TritonConfig(64, 64, 32, swap_ab=False, split=3),
                        densemoe.Fc2TritonConfig(32, 32, 64, use_tma=False, split=1)):
                out[f"fc2/{dt}/M{M}/{cfg.to_str()}"] = densemoe.fc2(a, w, alpha, config=cfg, skip=False)
            strided = torch.randn(M, 2 * E * I, generator=g).to(dt)[:, ::2]
            out[f"fc2/{dt}/M{M}/strided"] = densemoe.fc2(strided, w, alpha)
    # ---- fc1
    for dt in (FP8, torch.bfloat16):
        for M in (1, 7, 33, 100):
            g = gen(100 + M)
            xf = torch.randn(M, H, generator=g)
            if dt == FP8:
                x, xs = quantize_per_token(xf)
                out[f"quant_rows/M{M}/q"], out[f"quant_rows/M{M}/s"] = x.view(torch.uint8), xs
            else:
                x, xs = xf.to(dt), None
            w1 = (torch.randn(2 * E * I, H, generator=g) * (20 if dt == FP8 else 0.1)).clamp(-448, 448).to(dt)
            a1 = (torch.rand(E, generator=g) + 0.5) * (0.01 if dt == FP8 else 1.0)
            alpha, ids = alpha_topk(M, 2, g)
            out[f"fc1/{dt}/M{M}/dense"] = densemoe.fc1(x, w1, a1, x_scale=xs)
            for skip in (None, True, False):
                out[f"fc1/{dt}/M{M}/route/skip{skip}"] = densemoe.fc1(x, w1, a1, x_scale=xs, routing=alpha, skip=skip)
            out[f"fc1/{dt}/M{M}/post"] = densemoe.fc1(x, w1, a1, x_scale=xs, alpha_post=alpha)
            out[f"fc1/{dt}/M{M}/fp8out"] = densemoe.fc1(x, w1, a1, x_scale=xs, out_dtype=FP8,
                                                       out_scale=torch.tensor([0.05])).view(torch.uint8)
            picked = alpha.repeat_interleave(I, 1) != 0  # the rest is left unwritten
            out[f"fc1/{dt}/M{M}/nofill"] = torch.where(picked, densemoe.fc1(x, w1, a1, x_scale=xs, routing=alpha,
                                                                            skip=True, fill_unpicked=False), 0)
            if M == 1:
                out[f"fc1/{dt}/M{M}/ids"] = torch.where(picked, densemoe.fc1(
                    x, w1, a1, x_scale=xs, routing=alpha, skip=True, fill_unpicked=False, expert_ids=ids[0, :2]), 0)
            y8, ys = densemoe.ops.fc1.fc1_fp8_dynamic(x, w1, a1, x_scale=xs, alpha_post=alpha)
            out[f"fc1/{dt}/M{M}/dyn"], out[f"fc1/{dt}/M{M}/dyn_s"] = y8.view(torch.uint8), ys
            for cfg in (densemoe.Fc1TritonConfig(16, 64, 64, 4, 3, 1, 1, persistent=1, split_k=4),
                        densemoe.Fc1TritonConfig(16, 32, 64, 4, 3, 0, 1, persistent=1, stream_k=1),
                        densemoe.Fc1TritonConfig(32, 64, 64, 4, 2, 0, 0),
                        densemoe.Fc1TritonConfig(64, 64, 64, 4, 2, 0, 1, persistent=2)):
                out[f"fc1/{dt}/M{M}/{cfg.to_str()}"] = densemoe.fc1(x, w1, a1, x_scale=xs, routing=alpha, config=cfg,
                                                                    skip=bool(cfg.persistent))
            bf = torch.randn(M, E * I, generator=g).to(torch.bfloat16)
            q, a2 = quantize_y_fold_alpha(bf, alpha, torch.rand(E, generator=g) + 0.5)
            out[f"quant_y/M{M}/q"], out[f"quant_y/M{M}/a2"] = q.view(torch.uint8), a2
    # ---- routers
    for M in (1, 7, 100):
        g = gen(200 + M)
        logits = torch.randn(M, 64, generator=g)
        for k, v in routing.softmax_topk(logits, 8, renormalize=True)._asdict().items():
            out[f"route/softmax/M{M}/{k}"] = v
        bias = torch.randn(64, generator=g) * 0.1
        for k, v in routing.deepseek_v3_topk(logits, 8, n_group=8, topk_group=4, e_score_correction_bias=bias,
                                            routed_scaling_factor=2.5, norm_topk_prob=True)._asdict().items():
            out[f"route/ds/M{M}/{k}"] = v
        x = torch.randn(M, H, generator=g).to(torch.bfloat16)
        gw = torch.randn(E, H, generator=g).to(torch.bfloat16)
        lg, xq = routing.router_logits(x, gw, quantize=True)
        out[f"route/logits/M{M}"] = lg
        if xq is not None:
            out[f"route/logits/M{M}/q"], out[f"route/logits/M{M}/s"] = xq[0].view(torch.uint8), xq[1]
    # ---- layer
    for dtype in ("fp8", "bf16"):
        g = gen(300)
        w13 = torch.randn(E, 2 * I, H, generator=g) * 0.05
        w2 = torch.randn(E, H, I, generator=g) * 0.05
        p = densemoe.prepare_weights(w13.to(torch.bfloat16), w2.to(torch.bfloat16), dtype=dtype)
        for M in (1, 7, 33):
            x = torch.randn(M, H, generator=g).to(torch.bfloat16)
            alpha, ids = alpha_topk(M, 2, g)
            for skip in (None, True, False):
                out[f"experts/{dtype}/M{M}/skip{skip}"] = densemoe.experts_forward(x, p, alpha, skip=skip, top_k=2)
            gw = torch.randn(E, H, generator=g).to(torch.bfloat16)
            moe = densemoe.DenseMoE(p, gw, 2)
            out[f"moe/{dtype}/M{M}"] = moe(x)
            moe_ds = densemoe.DenseMoE(p, gw, 2, router="deepseek_v3", logits_fp32=True, n_group=4, topk_group=2,
                                       e_score_correction_bias=torch.randn(E, generator=g) * 0.1,
                                       routed_scaling_factor=2.0)
            out[f"moe_ds/{dtype}/M{M}"] = moe_ds(x)
            tw = torch.softmax(torch.randn(M, 2, generator=g), 1)
            out[f"fused/{dtype}/M{M}"] = densemoe.fused_experts(x, w13.to(torch.bfloat16), w2.to(torch.bfloat16), tw,
                                                                ids[:, :2], dtype=dtype)


def model_pass() -> None:
    """Model-shape calls with no kernel executed (launch specs only), 132 programs per 'wave'."""
    import torch

    import densemoe
    from densemoe import _runtime
    from densemoe.shapes import SHAPES

    _runtime.INTERPRETER_SMS = 132
    FP8 = torch.float8_e4m3fn
    for name in ("deepseek-v3-tp8", "qwen3-30b-a3b"):
        s = SHAPES[name]
        H, E, I = s.hidden, s.experts, s.inter
        for dt in (FP8, torch.bfloat16):
            w1 = torch.empty(E * 2 * I, H, dtype=dt)
            w2 = torch.empty(H, E * I, dtype=dt)
            a1 = torch.ones(E)
            for M in (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 1024, 4096):
                x = torch.empty(M, H, dtype=dt)
                xs = torch.ones(M) if dt == FP8 else None
                alpha = torch.zeros(M, E)
                y = torch.empty(M, E * I, dtype=dt)
                densemoe.fc1(x, w1, a1, x_scale=xs, routing=alpha)
                densemoe.fc1(x, w1, a1, x_scale=xs)
                densemoe.fc2(y, w2, alpha)
                densemoe.fc2(y, w2, alpha, skip=False)
                densemoe.fc2(y, w2, alpha, skip=True)
                if M == 1:
                    ids = torch.arange(8)
                    densemoe.fc2(y, w2, alpha, skip=True, expert_ids=ids)
                    densemoe.fc1(x, w1, a1, x_scale=xs, routing=alpha, skip=True, fill_unpicked=False,
                                 expert_ids=ids)


def choices() -> dict:
    """The decisions, with the API of the tree this runs on (adapted once after the refactor)."""
    import torch

    from densemoe.shapes import SHAPES
    from densemoe.tuning import cache

    FP8 = torch.float8_e4m3fn
    res = {}
    Ms = (1, 2, 3, 4, 5, 8, 12, 16, 24, 31, 32, 33, 48, 64, 65, 96, 128, 129, 160, 192, 256, 384, 512, 768, 1024, 2048, 4096)
    api = _api()
    # tuned lookups as an H100 with Triton 3.6 / CuTe DSL 4.8.1 sees them
    cache.versions.cache_clear()
    cache.versions = lambda: {"densemoe": "0.1.0", "triton": "3.6.0", "cutedsl": "4.8.1"}
    cache.reload()
    os.environ.pop("DENSEMOE_TUNED", None)
    for name, s in SHAPES.items():
        for dt in (FP8, torch.bfloat16):
            for M in Ms:
                key = f"{name}/{dt}/M{M}"
                res[key] = api(s, dt, M)
    return res


def _api():
    """Returns f(shape, dtype, M) -> dict of decisions, through the API of the tree at hand (the
    rules moved in issue 18: kernels/triton and ops/fc2 before, ops/*_configs and strategy after)."""
    import types

    import torch

    from densemoe.tuning import cache

    try:  # after the move
        from densemoe.kernels.common import Fc1Problem, Fc2Problem
        from densemoe.ops import fc1_configs, fc2_configs, strategy
        r1, r2 = fc1_configs, fc2_configs
        rules = types.SimpleNamespace(skip_by_default=strategy.skip_by_default, Fc1Problem=Fc1Problem,
                                      Fc2Problem=Fc2Problem)
    except ImportError:  # before
        from densemoe.kernels.triton import fc1 as k1
        from densemoe.ops import fc1 as o1
        from densemoe.ops import fc2 as o2
        r1 = types.SimpleNamespace(default_config=k1.default_config, default_skip_config=k1.default_skip_config,
                                   default_config_dynamic=k1.default_config_dynamic,
                                   default_cute_config=o1.default_cute_config, cute_preferred=o1.cute_preferred)
        r2 = o2
        rules = types.SimpleNamespace(skip_by_default=o2.skip_by_default, Fc1Problem=k1.Fc1Problem,
                                      Fc2Problem=o2.Fc2Problem)
    dev = "NVIDIA H100 80GB HBM3"

    def text(fn, p):
        try:
            return fn(p).to_str()
        except ValueError as e:
            return str(e)

    def f(s, dt, M):
        p2 = rules.Fc2Problem(M, s.hidden, s.experts, s.inter, dt, torch.bfloat16)
        p1 = rules.Fc1Problem(M, s.hidden, s.experts, s.inter, dt, torch.bfloat16)
        d = {"skip": rules.skip_by_default(M, s.experts), "skip_k": rules.skip_by_default(M, s.experts, s.topk),
             "fc2_default": r2.default_config(p2, 132).to_str(),
             "fc2_skip": r2.default_skip_config(p2, 132).to_str(),
             "fc2_cute_pref": r2.cute_preferred(p2),
             "fc1_default": r1.default_config(p1).to_str(),
             "fc1_skip": r1.default_skip_config(p1, 132).to_str(),
             "fc1_cute_pref": r1.cute_preferred(p1),
             "fc2_cute": text(r2.default_cute_config, p2), "fc1_cute": text(r1.default_cute_config, p1),
             "fc1_dyn": text(r1.default_config_dynamic, p1)}
        for op, prob in (("fc2", p2), ("fc1", p1)):  # the tuned tables as an H100 sees them
            entry, where = cache.lookup(cache.make_key(op, dev, prob))
            d[f"{op}_tuned"] = None if entry is None else [where, entry["best"]["config"],
                                                          (entry.get("triton") or {}).get("config")]
        return d
    return f


def strip_ptx(ptx: str) -> str:
    keep = []
    for line in ptx.splitlines():
        t = line.strip()
        if t.startswith((".loc", ".file", "//")) or not t:
            continue
        keep.append(line)
    text = "\n".join(keep)
    # the DWARF sections carry paths and line numbers
    text = re.sub(r"\.section\s+\.debug_\w+\s*\{.*?\n\s*\}", "", text, flags=re.S)
    return text


TRITON_PTX = r'''
import hashlib, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, sys.argv[1])
from house_fingerprint import strip_ptx
from densemoe.kernels.triton.fc1 import _fc1_kernel, _fc1_persistent_kernel
from densemoe.kernels.triton.fc2 import _fc2_kernel
from densemoe.kernels.triton.gate import _gate_kernel
from densemoe.kernels.triton.quant import _quant_rows_kernel, _quant_y_kernel
from densemoe.kernels.triton.routing import _softmax_topk_kernel, _deepseek_v3_topk_kernel
from densemoe.kernels.triton.skip import _active_lists_kernel
FP8 = "fp8e4nv"
res = {}
def compile_(tag, kernel, ptrs, descs, const, warps=4, stages=4):
    const = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}, **const}
    sig = {}
    for name in kernel.arg_names:
        sig[name] = ptrs.get(name) or descs.get(name) or ("constexpr" if name in const else "i32")
    k = triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    res[tag] = hashlib.sha256(strip_ptx(k.asm["ptx"]).encode()).hexdigest()[:16]
fc1_ptrs = dict(x_ptr="*" + FP8, w_ptr="*" + FP8, alpha1_ptr="*fp32", xs_ptr="*fp32", post_ptr="*fp32",
                route_ptr="*fp32", y_ptr="*bf16", oscale_ptr="*fp32", ys_ptr="*fp32", sel_ptr="*fp32",
                lists_ptr="*i32", counts_ptr="*i32", ws_ptr="*fp32", cnt_ptr="*i32")
flags = dict(HAS_XS=True, HAS_POST=False, HAS_ROUTE=True, OUT_FP8=False, DYN_SCALE=False, USE_TMA=True)
for bm, bi, swap in ((16, 64, True), (128, 64, True), (128, 128, False)):
    descs = dict(x_desc=f"tensordesc<{FP8}[{bm}, 256]>", w_desc=f"tensordesc<{FP8}[{bi}, 256]>")
    c = dict(flags, BLOCK_M=bm, BLOCK_I=bi, BLOCK_K=256, SWAP_AB=swap, NUM_STAGES=3)
    compile_(f"fc1/{bm}/{bi}/{swap}", _fc1_kernel, fc1_ptrs, descs, c, warps=8 if bi == 128 else 4, stages=3)
for bm, bi, swap, skip, one, sk, stk, ids, pdl in ((16, 64, True, True, True, 1, False, False, False),
                                                   (16, 32, False, True, True, 1, True, False, True),
                                                   (32, 64, True, True, False, 1, False, False, False),
                                                   (128, 128, False, False, False, 1, False, False, False),
                                                   (16, 64, True, True, True, 4, False, True, True)):
    descs = dict(x_desc=f"tensordesc<{FP8}[{bm}, 256]>", w_desc=f"tensordesc<{FP8}[{bi}, 256]>")
    c = dict(flags, BLOCK_M=bm, BLOCK_I=bi, BLOCK_K=256, SWAP_AB=swap, SKIP=skip, NUM_STAGES=3,
             BLOCK_E=256, LIST_ROWS=16, FILL=not ids, ONE_TILE=one, LISTS_GIVEN=False, SPREAD=skip, SPLIT_K=sk,
             STREAM_K=stk, IDS=ids, PDL=pdl)
    compile_(f"fc1p/{bm}/{bi}/{swap}/{skip}/{one}/{sk}/{stk}/{ids}/{pdl}", _fc1_persistent_kernel, fc1_ptrs, descs, c,
             warps=8 if bi == 128 else 4, stages=3)
fc2_ptrs = dict(a_ptr="*" + FP8, w_ptr="*" + FP8, alpha_ptr="*fp32", out_ptr="*bf16", ws_ptr="*fp32",
                cnt_ptr="*i32", lists_ptr="*i32", counts_ptr="*i32", wscale_ptr="*fp32")
for bm, bn, swap, skip, ids, ws, pdl in ((16, 64, True, True, False, False, True), (64, 128, False, True, False, True, False),
                                         (16, 64, True, False, False, False, False), (16, 128, True, True, True, True, True),
                                         (128, 128, False, False, False, False, True)):
    descs = dict(a_desc=f"tensordesc<{FP8}[{bm}, 256]>", w_desc=f"tensordesc<{FP8}[{bn}, 256]>")
    c = dict(I=256, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=256, SWAP_AB=swap, USE_TMA=True, NUM_STAGES=4, SKIP=skip,
             BLOCK_E=256, LIST_ROWS=16, IDS=ids, HAS_WSCALE=ws, PDL=pdl)
    compile_(f"fc2/{bm}/{bn}/{swap}/{skip}/{ids}/{ws}/{pdl}", _fc2_kernel, fc2_ptrs, descs, c, warps=8 if bm * bn >= 16384 else 4)
for bm, bk, quant, one in ((1, 8192, True, True), (16, 8192, True, True), (4, 1024, True, False)):
    gate_ptrs = dict(x_ptr="*bf16", g_ptr="*bf16", out_ptr="*bf16", q_ptr="*" + FP8, s_ptr="*fp32")
    compile_(f"gate/{bm}/{bk}/{quant}/{one}", _gate_kernel, gate_ptrs, {}, dict(BLOCK_M=bm, BLOCK_K=bk, QUANT=quant, ONE_PASS=one, PDL=True), warps=8)
compile_("quant_rows", _quant_rows_kernel, dict(x_ptr="*bf16", q_ptr="*" + FP8, s_ptr="*fp32"), {},
         dict(BLOCK=4096, ONE_PASS=False, PDL=True))
compile_("quant_y", _quant_y_kernel, dict(y_ptr="*bf16", alpha_ptr="*fp32", ws_ptr="*fp32", q_ptr="*" + FP8, a2_ptr="*fp32"), {},
         dict(BLOCK_E=16, BLOCK_I=256, ONE_PASS=True, HAS_WS=True, PDL=True))
compile_("softmax_topk", _softmax_topk_kernel, dict(x_ptr="*fp32", alpha_ptr="*fp32", ids_ptr="*i64", w_ptr="*fp32"), {},
         dict(TOP_K=8, BLOCK_E=256, BLOCK_K=8, RENORMALIZE=True, PDL=True))
compile_("ds_topk", _deepseek_v3_topk_kernel, dict(x_ptr="*fp32", bias_ptr="*fp32", alpha_ptr="*fp32", ids_ptr="*i64", w_ptr="*fp32"), {},
         dict(TOP_K=8, TOPK_GROUP=4, BLOCK_NG=8, BLOCK_G=32, BLOCK_K=8, HAS_BIAS=True, NORM=True, PDL=True))
compile_("active_lists", _active_lists_kernel, dict(r_ptr="*fp32", lists_ptr="*i32", counts_ptr="*i32"), {},
         dict(BLOCK_M=16, ROWS=16, BLOCK_E=256))
print(json.dumps(res))
'''

CUTE_PTX = r'''
import glob, hashlib, json, os, sys, torch
sys.path.insert(0, sys.argv[1])
from house_fingerprint import strip_ptx
from densemoe.kernels.cute.fc2_sm90 import Fc2CuteConfig, compile_fc2
from densemoe.kernels.cute.fc1_sm90 import Fc1CuteConfig, compile_fc1
FP8, BF16 = torch.float8_e4m3fn, torch.bfloat16
res = {}
dump = os.environ["CUTE_DSL_DUMP_DIR"]
def one(tag, fn):
    for f in glob.glob(os.path.join(dump, "**", "*"), recursive=True):
        if os.path.isfile(f):
            os.remove(f)
    fn()
    ptx = sorted(glob.glob(os.path.join(dump, "**", "*.ptx"), recursive=True))
    assert ptx, os.listdir(dump)
    res[tag] = hashlib.sha256("".join(strip_ptx(open(p).read()) for p in ptx).encode()).hexdigest()[:16]
for cfg, dt in ((Fc2CuteConfig(tile_n=128, tile_m=16, tile_k=256, consumers=1, acc_buffers=2, cluster_n=2), FP8),
                (Fc2CuteConfig(tile_n=192, tile_m=128, tile_k=128, consumers=2, acc_buffers=1, cluster_m=2, swap_ab=0, lockstep=1), FP8),
                (Fc2CuteConfig(tile_n=64, tile_m=64, tile_k=128, consumers=1, acc_buffers=1), BF16)):
    one("fc2/" + cfg.to_str() + str(dt), lambda: compile_fc2(cfg, dt, BF16, 7168, 256, 256))
for cfg, dt, od in ((Fc1CuteConfig(tile_i=128, tile_m=16, tile_k=128, consumers=2, swap_ab=1), FP8, BF16),
                    (Fc1CuteConfig(tile_i=64, tile_m=128, tile_k=128, consumers=2, swap_ab=0, cluster_n=2, cluster_m=2), FP8, FP8),
                    (Fc1CuteConfig(tile_i=64, tile_m=32, tile_k=64, consumers=1, swap_ab=1, cluster_n=2), BF16, BF16)):
    one("fc1/" + cfg.to_str() + str(dt) + str(od), lambda: compile_fc1(cfg, dt, od, 7168, 256, 256))
print(json.dumps(res))
'''


def compare(a: str, b: str) -> int:
    """Every part found in both directories: identical or not (outputs bit for bit, NaNs alike)."""
    import torch

    ok = True
    for name in ("ptx.json", "cute.json", "choices.json", "launches.json"):
        if not (os.path.exists(f"{a}/{name}") and os.path.exists(f"{b}/{name}")):
            print("missing", name)
            continue
        x, y = json.load(open(f"{a}/{name}")), json.load(open(f"{b}/{name}"))
        if x == y:
            print(name, "identical", len(x))
            continue
        ok = False
        diff = [k for k in set(x) | set(y) if x.get(k) != y.get(k)] if isinstance(x, dict) else ["(list)"]
        print(name, "DIFFERS", len(diff), diff[:5])
    if os.path.exists(f"{a}/outputs.pt") and os.path.exists(f"{b}/outputs.pt"):
        o1, o2 = torch.load(f"{a}/outputs.pt"), torch.load(f"{b}/outputs.pt")

        def same(u, v):
            if u.shape != v.shape or u.dtype != v.dtype:
                return False
            if u.dtype == torch.float8_e4m3fn:
                u, v = u.view(torch.uint8), v.view(torch.uint8)
            if u.is_floating_point():
                return torch.equal(torch.isnan(u), torch.isnan(v)) and torch.equal(u.nan_to_num(), v.nan_to_num())
            return torch.equal(u, v)
        bad = [k for k in set(o1) | set(o2) if k not in o1 or k not in o2 or not same(o1[k], o2[k])]
        print("outputs", "identical" if not bad else f"DIFFER {bad[:10]}", len(o1))
        ok = ok and not bad
    print("ALL IDENTICAL" if ok else "DIFFERENCES")
    return 0 if ok else 1


def main() -> int:
    if sys.argv[1] == "--compare":
        return compare(sys.argv[2], sys.argv[3])
    out_dir = sys.argv[1]
    parts = PART_ALL
    if "--part" in sys.argv:
        parts = sys.argv[sys.argv.index("--part") + 1].split(",")
    os.makedirs(out_dir, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    if "ptx" in parts:
        env = dict(os.environ, TRITON_INTERPRET="0")
        r = subprocess.run([sys.executable, "-c", TRITON_PTX, here], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        json.dump(json.loads(r.stdout.strip().splitlines()[-1]), open(os.path.join(out_dir, "ptx.json"), "w"), indent=1)
    if "cute" in parts:
        env = dict(os.environ, TRITON_INTERPRET="0", CUTE_DSL_ARCH="sm_90a", CUTE_DSL_KEEP="ptx",
                   CUTE_DSL_DUMP_DIR=tempfile.mkdtemp())
        r = subprocess.run([sys.executable, "-c", CUTE_PTX, here], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        json.dump(json.loads(r.stdout.strip().splitlines()[-1]), open(os.path.join(out_dir, "cute.json"), "w"), indent=1)
    if {"outputs", "launches", "choices"} & set(parts):
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["DENSEMOE_CACHE_DIR"] = tempfile.mkdtemp()
        os.environ["DENSEMOE_NO_HF_REGISTER"] = "1"
        import torch

        torch.manual_seed(0)
        patch_interpreter()
        if "choices" in parts:
            json.dump(choices(), open(os.path.join(out_dir, "choices.json"), "w"), indent=1, sort_keys=True)
        if "outputs" in parts or "launches" in parts:
            log: list = []
            install_recorder(log, execute=True)
            outs: dict = {}
            battery(outs)
            torch.save(outs, os.path.join(out_dir, "outputs.pt"))
            log2: list = []
            install_recorder(log2, execute=False)
            model_pass()
            json.dump({"battery": log, "model": log2}, open(os.path.join(out_dir, "launches.json"), "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
