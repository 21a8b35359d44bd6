"""Concurrency (issue 21): the layer on two CUDA streams and from two threads at once, and a
graph captured while another stream runs. The split reductions' reused workspace is per device
and stream (``kernels.common.reused_zeros``): two launches on two streams must not share it."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import densemoe
from densemoe.kernels.common import reused_zeros
from densemoe.kernels.triton.fc1 import Fc1TritonConfig
from densemoe.kernels.triton.fc2 import Fc2TritonConfig
from densemoe.shapes import SHAPES

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.xdist_group("gpu_big"),
              pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and TRITON_INTERPRET unset")]

FP8, BF16 = torch.float8_e4m3fn, torch.bfloat16
S = SHAPES["qwen3-30b-a3b"]
ROUNDS = 20


def test_the_reused_workspace_is_per_stream():
    dev = torch.device("cuda")
    a = reused_zeros(4096, dev)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        b = reused_zeros(4096, dev)
    assert a.data_ptr() != b.data_ptr()  # shared, the two streams' split sums would mix
    assert reused_zeros(1024, dev).data_ptr() == a.data_ptr()  # one stream: the same buffer, reused


def _fc2_case(m, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    K = S.experts * S.inter
    a = torch.randn(m, K, device="cuda", generator=g).to(FP8)
    w = (torch.randn(S.hidden, K, device="cuda", generator=g) * 0.5).to(FP8)
    ids = torch.rand(m, S.experts, device="cuda", generator=g).topk(S.topk, dim=1).indices
    alpha = torch.zeros(m, S.experts, device="cuda").scatter_(1, ids, 1.0 / S.topk)
    return a, w, alpha


@pytest.mark.parametrize("split", [0, 2])  # stream-K and split 2: both reduce in the reused workspace
def test_two_streams_split_fc2_at_once(split):
    """FC2 with skipping and cut tiles (the reused workspace) on two streams at once, many rounds:
    every result equals the same call run alone."""
    cfg = Fc2TritonConfig(block_m=16, block_n=128, block_k=128, swap_ab=True, split=split)
    cases = [_fc2_case(4, seed) for seed in (1, 2)]
    alone = [densemoe.fc2(*c, config=cfg, skip=True) for c in cases]
    streams = [torch.cuda.Stream() for _ in cases]
    torch.cuda.synchronize()
    for _ in range(ROUNDS):
        outs = []
        for c, s in zip(cases, streams):
            with torch.cuda.stream(s):
                outs.append(densemoe.fc2(*c, config=cfg, skip=True))
        torch.cuda.synchronize()
        for o, r in zip(outs, alone):
            torch.testing.assert_close(o.float(), r.float(), rtol=1e-2, atol=1e-2)


def test_two_streams_split_k_fc1_at_once():
    """FC1 persistent with split-k (its partial sums in the reused workspace) on two streams."""
    cfg = Fc1TritonConfig(block_m=16, block_i=64, block_k=128, swap_ab=1, persistent=1, split_k=2)
    cases = []
    for seed in (3, 4):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x8, sx = densemoe.quant.quantize_per_token(torch.randn(4, S.hidden, device="cuda", generator=g))
        w1 = torch.randn(S.experts * 2 * S.inter, S.hidden, device="cuda", generator=g).to(FP8)
        cases.append((x8, w1, torch.full((S.experts,), 1e-3, device="cuda"), sx))
    alone = [densemoe.fc1(x, w, a1, x_scale=sx, config=cfg, out_dtype=BF16, skip=False) for x, w, a1, sx in cases]
    streams = [torch.cuda.Stream() for _ in cases]
    torch.cuda.synchronize()
    for _ in range(ROUNDS):
        outs = []
        for (x, w, a1, sx), s in zip(cases, streams):
            with torch.cuda.stream(s):
                outs.append(densemoe.fc1(x, w, a1, x_scale=sx, config=cfg, out_dtype=BF16, skip=False))
        torch.cuda.synchronize()
        for o, r in zip(outs, alone):
            torch.testing.assert_close(o.float(), r.float(), rtol=1e-2, atol=1e-2)


def _layer(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = torch.randn(S.experts, 2 * S.inter, S.hidden, device="cuda", generator=g) * S.hidden ** -0.5
    w2 = torch.randn(S.experts, S.hidden, S.inter, device="cuda", generator=g) * S.inter ** -0.5
    gate = torch.randn(S.experts, S.hidden, device="cuda", generator=g) * S.hidden ** -0.5
    return densemoe.DenseMoE(densemoe.prepare_weights(w13, w2, dtype="fp8"), gate, S.topk)


@pytest.mark.parametrize("strategy", ["skip", "dense", "routed"])
def test_the_layer_from_two_threads_on_their_own_streams(strategy):
    moe = _layer()
    moe.strategy = strategy
    xs = [torch.randn(m, S.hidden, device="cuda").to(BF16) for m in (3, 100)]
    alone = [moe(x) for x in xs]
    torch.cuda.synchronize()
    results, errors = [None, None], []

    def work(i):
        try:
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                outs = [moe(xs[i]) for _ in range(ROUNDS)]
            s.synchronize()
            results[i] = outs
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for outs, r in zip(results, alone):
        for o in outs:
            torch.testing.assert_close(o.float(), r.float(), rtol=1e-2, atol=1e-2)


def test_graph_capture_while_another_stream_runs_the_layer():
    moe = _layer(1)
    x_graph = torch.randn(8, S.hidden, device="cuda").to(BF16)
    x_busy = torch.randn(100, S.hidden, device="cuda").to(BF16)
    want_graph, want_busy = moe(x_graph), moe(x_busy)
    busy = torch.cuda.Stream()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # warm the capturing stream (its workspace, the compiled kernels)
        moe(x_graph)
    torch.cuda.synchronize()
    with torch.cuda.stream(busy):
        busy_outs = [moe(x_busy) for _ in range(5)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        out_graph = moe(x_graph)
    with torch.cuda.stream(busy):
        busy_outs += [moe(x_busy) for _ in range(5)]
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out_graph.float(), want_graph.float(), rtol=1e-2, atol=1e-2)
    for o in busy_outs:
        torch.testing.assert_close(o.float(), want_busy.float(), rtol=1e-2, atol=1e-2)
