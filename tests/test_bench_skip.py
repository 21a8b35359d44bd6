"""The expert-skipping benchmark's plumbing on the CPU (interpreter, a tiny shape, fake timers):
skip and dense are checked, records carry the keys, active experts are counted from the routing
the ops really got, the floors and targets follow, interleaved timings land on the right keys,
the report renders; and the routing recipes give what they promise. The real run is
`python -m densemoe.bench skip` on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

import densemoe
from densemoe.bench import skip
from densemoe.layer import DenseMoE
from densemoe.shapes import MoEShape
from _helpers import OrderTimer, fake_timer

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TINY = MoEShape("tiny", 64, 8, 32, 2)
CEILING, PEAKS = {"tb_s": 3.0}, {"fp8": 1000.0, "bf16": 500.0}
KEYS = {"device", "op", "shape", "dtype", "M", "N", "K", "E", "us", "tb_s", "tflops", "floor_us", "pct_floor",
        "bytes", "rel_err", "commit", "us_min", "routing", "skip", "dense_us", "dense_floor_us", "active_experts",
        "target_us", "meets_target", "vs_dense", "floor_target_us", "picks_per_expert", "hot_fraction",
        "rel_err_dense", "rel_diff_skip_dense"}




def _spy(monkeypatch):
    """Per M, the number of experts picked in the routing each op was really given: densemoe.fc1's
    ``routing``, densemoe.fc2's alpha, and DenseMoE's router output."""
    seen = {"fc1": {}, "fc2": {}, "layer": {}}
    fc1, fc2, route = densemoe.fc1, densemoe.fc2, DenseMoE.route

    def note(op, r):
        seen[op].setdefault(r.shape[0], set()).add(int((r != 0).any(dim=0).sum()))

    def fc1_spy(x, *a, **kw):
        if kw.get("routing") is not None:
            note("fc1", kw["routing"])
        return fc1(x, *a, **kw)

    def fc2_spy(a, w, alpha, **kw):
        note("fc2", alpha)
        return fc2(a, w, alpha, **kw)

    def route_spy(self, x):
        r = route(self, x)
        note("layer", r.alpha)
        return r
    monkeypatch.setattr(densemoe, "fc1", fc1_spy)
    monkeypatch.setattr(densemoe, "fc2", fc2_spy)
    monkeypatch.setattr(DenseMoE, "route", route_spy)
    return seen


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
@pytest.mark.parametrize("routing", skip.ROUTINGS)
def test_skip_benchmark_runs_checks_and_reports(monkeypatch, routing):
    seen = _spy(monkeypatch)
    logs = []
    ms = [1, 3]
    recs = skip.run_skip([TINY], ["fp8"], ms, fake_timer, CEILING, PEAKS, "cpu", "abc", log=logs.append, dev="cpu",
                         routings=(routing,))
    assert [(r["op"], r["M"]) for r in recs] == [(op, M) for M in ms for op in skip.OPS], logs
    for r in recs:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["routing"] == routing and r["skip"] is True and r["us"] == 10.0 and r["dense_us"] == 10.0
        assert "us_in_graph" not in r  # (a timer without in_graph)
        if r["op"] == "fc1":  # FC1 as the layer calls it, checked and timed too
            assert r["layer_call_us"] == 10.0 and "layer_call_error" not in r
        assert r["vs_dense"] == 1.0
        assert r["rel_diff_skip_dense"] <= 2 * r["rel_err_dense"] + 1e-6
        # the active experts are those of the routing the op was given (counted by the spies)
        assert seen[r["op"]][r["M"]] == {r["active_experts"]}, (r["op"], r["M"], seen[r["op"]])
        assert sum(r["picks_per_expert"]) == r["M"] * TINY.topk
        assert r["active_experts"] == sum(p > 0 for p in r["picks_per_expert"])
        if r["active_experts"] < TINY.experts:
            assert r["floor_us"] < r["dense_floor_us"] and r["bytes"] < r["dense_bytes"]
        else:
            assert r["floor_us"] == r["dense_floor_us"]
        assert r["floor_target_us"] == pytest.approx(1.15 * r["floor_us"] + 5)
        if r["op"] in ("fc1", "fc2"):
            assert r["target_us"] == pytest.approx(1.15 * r["floor_us"] + 5) and r["meets_target"] is False
            assert r["config"] and r["dense_config"] and r["tile_pairs"] >= r["active_experts"]
            assert r["cublas_fp8_us"] == 10.0 and r["cublas_bf16_us"] == 10.0 and r["speedup_vs_cublas_fp8"] == 1.0
        else:
            assert r["cublas_fp8_pipeline_us"] == 10.0 and r["hf_grouped_mm_bf16_us"] == 10.0
            assert r["speedup_vs_cublas_fp8_pipeline"] == 1.0
            assert (r["target_us"], r["meets_target"]) == ((35.0, True) if r["M"] == 1 else (None, None))
        if routing == "skewed":
            assert r["hot_scale"] > 1
    assert sum(len(s) for s in seen.values()) > 0 and len(logs) == len(recs)
    meta = dict(device="cpu", commit="abc", date="today", torch="t", triton="t", read_ceiling_tb_s=3.0,
                peak_tflops=PEAKS, command="python -m densemoe.bench skip")
    md = skip.markdown_skip(meta, recs)
    assert "## fc1" in md and "## fc2" in md and "## layer" in md and "x cublas_fp8_pipeline" in md
    assert f"| tiny | fp8 | {routing} | 1 |" in md and "| active experts |" in md


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_interleaved_timings_land_on_the_right_keys():
    recs = skip.run_skip([TINY], ["fp8", "bf16"], [3], OrderTimer(), CEILING, PEAKS, "cpu", "abc", log=lambda s: None,
                         dev="cpu", routings=("skewed",))
    # per op one comparison: skip fp8, dense fp8, skip bf16, dense bf16 (, then the layer's baselines)
    assert [(r["op"], r["dtype"], r["us"], r["dense_us"], r["vs_dense"]) for r in recs] == [
        ("fc1", "fp8", 10.0, 20.0, 2.0), ("fc1", "bf16", 30.0, 40.0, 40 / 30),
        ("fc2", "fp8", 10.0, 20.0, 2.0), ("fc2", "bf16", 30.0, 40.0, 40 / 30),
        ("layer", "fp8", 10.0, 20.0, 2.0), ("layer", "bf16", 30.0, 40.0, 40 / 30)]
    for r in recs:
        assert r["us_rounds"] == [r["us"]] * 3 and r["dense_us_rounds"] == [r["dense_us"]] * 3
        # the skipping op inside one graph (Timer.in_graph), judged against the same absolute target
        assert r["us_in_graph"] == 7.0 and r["graph_launch_us"] == r["us"] - 7.0
        if r["op"] == "fc1":
            assert (r["layer_call_us"], r["layer_call_us_in_graph"]) == (1.0, 7.0)
        if r["op"] == "layer":  # M = 3: no layer target
            assert "meets_target_in_graph" not in r
        else:
            assert r["meets_target_in_graph"] == (7.0 <= r["target_us"])
    for r in recs[:4]:  # then cuBLAS's bare GEMMs
        assert (r["cublas_fp8_us"], r["cublas_bf16_us"]) == (50.0, 60.0)
    for r in recs[4:]:
        assert (r["cublas_fp8_pipeline_us"], r["hf_grouped_mm_bf16_us"]) == (50.0, 60.0)
        assert r["speedup_vs_hf_grouped_mm_bf16"] == 60.0 / r["us"]
    meta = dict(device="cpu", commit="abc", date="today", torch="t", triton="t", read_ceiling_tb_s=3.0,
                peak_tflops=PEAKS, command="python -m densemoe.bench skip")
    md = skip.markdown_skip(meta, recs)
    assert "| tiny | bf16 | skewed | 3 |" in md and "x cublas_fp8 |" in md
    assert "## fc1 as the layer calls it" in md and "| tiny | fp8 | skewed | 3 | 1.0 | 7.0 |" in md
    assert "| in graph us | meets in graph |" in md and " 7.0 | " in md and "meet their target in graph" in md


def test_targets():
    assert skip.target("fc1", 1, 100.0, 300.0) == (pytest.approx(120.0), "1.15x floor + 5 us")
    assert skip.target("fc2", 64, 100.0, 300.0)[0] == pytest.approx(120.0)
    assert skip.target("layer", 1, 100.0, 300.0)[0] == 35.0 and skip.target("layer", 8, 1.0, 2.0)[0] == 90.0
    assert skip.target("layer", 4, 1.0, 2.0) == (None, None)
    for op in skip.OPS:  # every expert active: no more than 2% slower than the dense path
        assert skip.target(op, 128, 100.0, 300.0)[0] == pytest.approx(306.0)


def test_routing_recipes():
    """uniform: every expert equally likely; skewed: ~70% of picks on 16 hot experts, through
    the alpha recipe and through a gate with the hot rows scaled alike."""
    E, k, M = 256, 8, 4096
    gen = torch.Generator().manual_seed(3)
    hot = skip.hot_experts(E)
    assert len(hot) == 16 and torch.equal(hot, skip.hot_experts(E))
    uni = skip.routing_alpha(M, E, k, "uniform", gen, "cpu")
    assert torch.equal((uni != 0).sum(dim=1), torch.full((M,), k))
    assert torch.allclose(uni.sum(dim=1), torch.ones(M))
    st = skip.routing_stats(uni, k)
    assert st["active_experts"] == E and abs(st["hot_fraction"] - 16 / E) < 0.02
    per = torch.tensor(st["picks_per_expert"], dtype=torch.float)
    assert per.min() > 0.6 * per.mean() and per.max() < 1.4 * per.mean()
    sk = skip.routing_alpha(M, E, k, "skewed", gen, "cpu")
    assert torch.equal((sk != 0).sum(dim=1), torch.full((M,), k))
    assert abs(skip.routing_stats(sk, k)["hot_fraction"] - 0.7) < 0.03
    small = skip.routing_stats(skip.routing_alpha(8, E, k, "skewed", gen, "cpu"), k)
    assert small["active_experts"] < skip.routing_stats(skip.routing_alpha(8, E, k, "uniform", gen, "cpu"),
                                                        k)["active_experts"]
    # the layer's gate: N(0, 1/H) entries -> ~N(0, 1) logits on random x; hot rows scaled
    H = 512
    gate = (torch.randn(E, H, generator=gen) * H ** -0.5).to(torch.bfloat16)
    x = torch.randn(M, H, generator=gen).to(torch.bfloat16)
    for g, share in ((gate, 16 / E), (skip.skewed_gate(gate, k), 0.7)):
        ids = (x.float() @ g.float().T).topk(k, dim=1).indices
        alpha = torch.zeros(M, E).scatter_(1, ids, 1.0)
        assert abs(skip.routing_stats(alpha, k)["hot_fraction"] - share) < 0.05
