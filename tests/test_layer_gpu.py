"""The layer on the GPU: real MISSION shapes, CUDA-graph capture with routing that changes
between replays (run on the H100 by bench/run_h100.sh)."""

from __future__ import annotations

import os

import pytest
import torch

import densemoe
from densemoe.timing import capture
from densemoe.reference import experts_ref
from densemoe.routing import softmax_topk
from densemoe.shapes import SHAPES
from densemoe.weights import prepare_weights

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# model-shape weights take GBs: these tests share one pytest-xdist worker (--dist loadgroup)
pytestmark = [pytest.mark.gpu, pytest.mark.xdist_group("gpu_big"),
              pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and TRITON_INTERPRET unset")]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _case(shape, M, seed):
    s = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(seed)
    E, I, H = s.experts, s.inter, s.hidden
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g, dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=g, dtype=torch.bfloat16) * I ** -0.5
    x = torch.randn(M, H, device="cuda", generator=g, dtype=torch.bfloat16)
    logits = torch.randn(M, E, device="cuda", generator=g)
    return w13, w2, x, logits, s.topk


def _ref(x, w13, w2, alpha):
    return experts_ref(x, w13, w2, alpha, compute_dtype=torch.float32, experts_per_chunk=16)


@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("M", [1, 7, 100])
def test_layer_fp8_and_bf16_on_model_shapes(shape, M):
    w13, w2, x, logits, k = _case(shape, M, M)
    alpha = softmax_topk(logits, k, renormalize=True).alpha
    ref = _ref(x, w13, w2, alpha)
    out16 = densemoe.experts_forward(x, prepare_weights(w13, w2, dtype="bf16"), alpha)
    out8 = densemoe.experts_forward(x, prepare_weights(w13, w2, dtype="fp8"), alpha)
    assert rel(out16, ref) < 1e-2 and rel(out8, ref) < 0.1, (rel(out16, ref), rel(out8, ref))


def test_layer_graph_capture_with_changing_routing():
    w13, w2, x, logits, k = _case("deepseek-v3-tp8", 16, 3)
    prepared = prepare_weights(w13, w2, dtype="fp8")
    static_x, static_logits = x.clone(), logits.clone()

    def step():
        return densemoe.experts_forward(static_x, prepared, softmax_topk(static_logits, k, renormalize=True).alpha)
    g, out = capture(step)  # warm-up on a side stream, then the capture
    for seed in (5, 6):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        static_x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
        static_logits.copy_(torch.randn(logits.shape, device="cuda", generator=gen))
        g.replay()
        alpha = softmax_topk(static_logits, k, renormalize=True).alpha
        assert rel(out, _ref(static_x, w13, w2, alpha)) < 0.1


@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_dense_moe_forward_never_syncs(dtype):
    w13, w2, x, logits, k = _case("qwen3-30b-a3b", 8, 4)
    gate = torch.randn(w13.shape[0], w13.shape[2], device="cuda", dtype=torch.bfloat16) * 0.05
    moe = densemoe.DenseMoE(prepare_weights(w13, w2, dtype=dtype), gate, k, renormalize=True)
    moe(x)  # first call: compiles, looks up configs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("strategy", ["skip", "dense", "routed"])
def test_fc2_in_column_pieces_on_model_shapes(shape, dtype, strategy):
    """experts_stages (what the sharded layer's pieces run): FC2 of 4 column pieces of H, on w2's
    row slices (views with an offset base: TMA descriptors, the CuTe backend where it runs), side
    by side equal to the whole FC2 up to its order of sums, at ragged M."""
    from densemoe.parallel import cuts

    for M in (1, 100, 1000):
        w13, w2, x, logits, k = _case(shape, M, M + 11)
        r = softmax_topk(logits, k, renormalize=True)
        pw = prepare_weights(w13, w2, dtype=dtype)
        kw = dict(expert_ids=r.topk_ids, topk_weights=r.topk_weights, strategy=strategy)
        whole = densemoe.experts_forward(x, pw, r.alpha, **kw)
        cols = densemoe.experts_stages(x, pw, r.alpha, **kw)
        out = torch.full_like(whole, float("nan"))  # poisoned: every column must be written
        for h0, h1 in cuts(pw.hidden, 4):
            out[:, h0:h1] = cols(h0, h1)
        assert torch.isfinite(out).all()
        ref = _ref(x, w13, w2, r.alpha)
        bound = 1e-2 if dtype == "bf16" else 0.1
        assert rel(out, whole) < bound / 4 and rel(out, ref) < bound, (M, rel(out, whole), rel(out, ref))
