"""The FC1 / layer benchmark's plumbing on the CPU (interpreter, a tiny shape, a fake timer):
results are checked, records carry the FC2 keys, baselines run, the report renders. The real
run is `python -m densemoe.bench fc1|layer` on a GPU.

The experts path (issue 19) is tested for the final API, ``experts_forward(..., strategy=
"dense"|"skip"|"routed"|None, expert_ids=[M, k], topk_weights=[M, k])``: where the tree has it,
every strategy must run, be right and be timed; where it does not yet (before the routed path
lands) the benchmark runs dense / skip / chosen through ``skip=`` and must record ``routed_us``
None with ``routed_note``: the assertions take the branch ``layer.strategy_api()`` says, nothing
is skipped. ``test_experts_call_uses_the_strategy_api`` checks the final API's call with a stand-in."""

from __future__ import annotations

import math
import os

import pytest
import torch

import densemoe
from densemoe.bench import layer
from densemoe.bench.torch_grouped import TorchGrouped
from densemoe.ops.strategy import expected_picked
from densemoe.reference import experts_ref
from densemoe.routing import alpha_from_topk
from densemoe.shapes import MoEShape
from _helpers import OrderTimer, fake_timer

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TINY = MoEShape("tiny", 64, 8, 32, 2)
KEYS = {"device", "op", "shape", "dtype", "M", "N", "K", "E", "us", "tb_s", "tflops", "floor_us", "pct_floor",
        "bytes", "rel_err", "commit"}
# the experts path's records (issue 19): every line's time, rate and share of the routed floor
LINES = ("dense", "skip", "routed", "chosen", "cublas_fp8_pipeline", "hf_eager_bf16", "torch_grouped")
EXPERTS_KEYS = KEYS | {"I", "top_k", "chosen", "routed_floor_us", "dense_floor_us", "flops", "active_experts",
                       "baselines", "best", "chosen_over_best", "strategy_api"} | {
    f"{name}_{suffix}" for name in LINES for suffix in ("us", "tb_s", "pct_floor")} | {
    f"speedup_vs_{b}" for b in ("cublas_fp8_pipeline", "hf_eager_bf16", "torch_grouped")}



@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_fc1_and_layer_benchmarks_run_and_report():
    ceiling, peaks = {"tb_s": 3.0}, {"fp8": 1000.0, "bf16": 500.0}
    logs = []
    fc1 = layer.run_fc1([TINY], ["fp8", "bf16"], [1, 7], fake_timer, ceiling, peaks, "cpu", "abc", log=logs.append, dev="cpu")
    out = layer.run_layer([TINY], ["fp8", "bf16"], [1, 7], fake_timer, ceiling, peaks, "cpu", "abc", log=logs.append,
                          dev="cpu", hf_implementations=("eager",))
    lay = [r for r in out if r["op"] == "layer"]
    exp = [r for r in out if r["op"] == "experts"]
    assert len(fc1) == 4 and len(lay) == 4 and len(exp) == 4 and len(out) == 8
    for r in fc1 + lay:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["us"] == 10.0 and r["rel_err"] < (0.1 if r["dtype"] == "fp8" else 2e-2)
    assert all(r["cublas_fp8_us"] == 10.0 and r["speedup_vs_cublas_fp8"] == 1.0 for r in fc1)
    assert all(r["config"].startswith("fc1-") and r["config_source"] == "heuristic" for r in fc1)
    for r in lay:
        assert r["cublas_fp8_pipeline_us"] == 10.0 and r["hf_eager_bf16_us"] == 10.0
        assert r["rel_err_torch_fp8"] > 0 and r["err_ratio_vs_torch_fp8"] > 0
        assert r["experts_only_us"] == 10.0 and r["router_us"] == 10.0 and r["torch_router_us"] == 10.0
        # the floor is the routed problem's (each token's top-k experts), not the dense path's
        routed_flops = 2 * r["M"] * TINY.topk * 3 * TINY.inter * TINY.hidden
        peak = peaks["fp8" if r["dtype"] == "fp8" else "bf16"]
        assert math.isclose(r["floor_us"], max(r["bytes"] / ceiling["tb_s"] / 1e6, routed_flops / peak / 1e6))
        assert math.isclose(r["tflops"], routed_flops / 10.0 / 1e6)
    fp8 = [r for r in lay if r["dtype"] == "fp8"]
    assert all(r["err_ratio_vs_torch_fp8"] < 1.5 for r in fp8), [r["err_ratio_vs_torch_fp8"] for r in fp8]
    meta = dict(device="cpu", commit="abc", date="today", torch="t", triton="t", read_ceiling_tb_s=3.0,
                peak_tflops=peaks, command="python -m densemoe.bench layer")
    md = layer.markdown(meta, fc1 + out)
    assert "## fc1" in md and "## layer" in md and "x cublas_fp8_pipeline" in md and "hf_eager_bf16 us" in md
    _check_experts_records(exp, ceiling, peaks)
    assert "## experts path" in md and "### tiny fp8" in md and "### tiny bf16" in md and "torch_grouped us" in md
    assert "routed floor us" in md and "x hf_eager_bf16" in md


def _check_experts_records(exp, ceiling, peaks):
    """The experts path's records at the fake timer's 10 us: keys, checks, floors, ratios."""
    api = layer.strategy_api()
    for r in exp:
        assert EXPERTS_KEYS <= set(r), EXPERTS_KEYS - set(r)
        bound = layer.BOUNDS[r["dtype"]]
        where = (r["dtype"], r["M"])
        # our strategies: checked against the fp32 reference, then timed
        for s in ("dense", "skip") + (("routed",) if api else ()):
            assert r[f"{s}_us"] == 10.0 and r[f"rel_err_{s}"] < bound, (where, s, r.get(f"{s}_error"))
        if not api:  # the tree before issue 19's API: no routed path, and the record says so
            assert r["routed_us"] is None and "strategy=" in r["routed_note"], where
        assert r["chosen_us"] == r["us"] == 10.0 and r["rel_err"] < bound, (where, r.get("error"))
        assert r["chosen"] in layer.STRATEGIES, (where, r["chosen"], r.get("chosen_note"))
        assert r["best"] in layer.STRATEGIES and r["chosen_over_best"] == 1.0
        # baselines without the router, each checked first
        assert r["cublas_fp8_pipeline_us"] == 10.0 and r["rel_err_cublas_fp8_pipeline"] < 0.1
        assert r["hf_eager_bf16_us"] == 10.0 and r["rel_err_hf_eager_bf16"] < 2e-2
        assert r["baselines"] == ["cublas_fp8_pipeline", "hf_eager_bf16", "torch_grouped"]
        if r["torch_grouped_us"] is None:  # fp8 on this CPU build: no _scaled_grouped_mm kernel
            assert r["torch_grouped_note"], where
        else:
            assert r["torch_grouped_us"] == 10.0 and r["rel_err_torch_grouped"] < bound, where
        if r["dtype"] == "bf16" and hasattr(torch, "_grouped_mm"):  # runs on the CPU since torch 2.8 or so
            assert r["torch_grouped_us"] == 10.0, r.get("torch_grouped_note")
        # floors: the picked experts' weights and the routed FLOPs
        es = 1 if r["dtype"] == "fp8" else 2
        assert 1 <= r["active_experts"] <= min(TINY.experts, r["M"] * TINY.topk)
        # a typical draw: as many experts as uniform top-k picks on average, within one
        assert r["expected_active"] == expected_picked(r["M"], TINY.experts, TINY.topk)
        assert abs(r["active_experts"] - r["expected_active"]) <= 1 and 1 <= r["routing_draws"] <= 32
        assert r["bytes"] == 3 * r["active_experts"] * TINY.inter * TINY.hidden * es
        assert r["flops"] == 2 * r["M"] * TINY.topk * 3 * TINY.hidden * TINY.inter
        floor = max(r["bytes"] / ceiling["tb_s"] / 1e6, r["flops"] / peaks[r["dtype"]] / 1e6)
        assert math.isclose(r["routed_floor_us"], floor) and r["floor_us"] == r["routed_floor_us"]
        assert math.isclose(r["pct_floor"], 100 * floor / 10.0) and math.isclose(r["tb_s"], r["bytes"] / 10.0 / 1e6)
        for name in LINES:
            if r[f"{name}_us"]:
                assert math.isclose(r[f"{name}_pct_floor"], 100 * floor / r[f"{name}_us"])
        assert r["speedup_vs_cublas_fp8_pipeline"] == 1.0 and r["speedup_vs_hf_eager_bf16"] == 1.0



@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_interleaved_timings_land_on_the_right_records():
    ceiling, peaks = {"tb_s": 3.0}, {"fp8": 1000.0, "bf16": 500.0}
    fc1 = layer.run_fc1([TINY], ["fp8", "bf16"], [7], OrderTimer(), ceiling, peaks, "cpu", "abc", log=lambda s: None,
                        dev="cpu")
    assert [(r["dtype"], r["us"], r["cublas_fp8_us"], r["cublas_bf16_us"]) for r in fc1] == [
        ("fp8", 30.0, 10.0, 20.0), ("bf16", 40.0, 10.0, 20.0)]
    # then FC1 with its fp8 output quantisation: fused in the epilogue, and bf16 + the separate kernel
    assert (fc1[0]["fused_quant_us"], fc1[0]["separate_quant_us"]) == (50.0, 60.0)
    assert "fused_quant_us" not in fc1[1]
    assert fc1[0]["us_rounds"] == [30.0] * 3
    out = layer.run_layer([TINY], ["fp8", "bf16"], [7], OrderTimer(), ceiling, peaks, "cpu", "abc", log=lambda s: None,
                          dev="cpu", hf_implementations=("grouped_mm", "batched_mm"))
    lay = [r for r in out if r["op"] == "layer"]
    # interleaved: cuBLAS pipeline, grouped_mm, ours fp8, ours bf16, experts-only fp8, bf16;
    # batched_mm timed once (1 us)
    assert [(r["dtype"], r["us"], r["cublas_fp8_pipeline_us"], r["hf_grouped_mm_bf16_us"], r["hf_batched_mm_bf16_us"],
             r["experts_only_us"]) for r in lay] == [("fp8", 30.0, 10.0, 20.0, 1.0, 50.0), ("bf16", 40.0, 10.0, 20.0, 1.0, 60.0)]
    # then, in the same rounds, the experts path: its baselines without the router (cuBLAS
    # pipeline, grouped_mm; batched_mm not on this path), then per dtype torch's grouped
    # pipeline, dense, skip, routed, and chosen where it is not the forced line it picked (same
    # bits: timed once, as that line)
    exp = [r for r in out if r["op"] == "experts"]
    assert [r["dtype"] for r in exp] == ["fp8", "bf16"]
    assert (exp[0]["cublas_fp8_pipeline_us"], exp[0]["hf_grouped_mm_bf16_us"]) == (70.0, 80.0)
    assert "hf_batched_mm_bf16_us" not in exp[0] and exp[1]["cublas_fp8_pipeline_us"] == 70.0
    t = 90.0
    for r in exp:
        for name in ("torch_grouped",) + layer.STRATEGIES + ("chosen",):
            if name == "chosen" and r.get("chosen_timed_as"):
                assert r["chosen_us"] == r[f"{r['chosen_timed_as']}_us"] and r["chosen_timed_as"] == r["chosen"]
                continue
            if r[f"{name}_us"] is None:  # not run here, and the record says why
                assert r.get(f"{name}_note") or r.get(f"{name}_error"), (r["dtype"], name)
                continue
            assert r[f"{name}_us"] == t and r[f"{name}_rounds"] == [t] * 3, (r["dtype"], name, r[f"{name}_us"], t)
            t += 10.0
        assert r["us"] == r["chosen_us"] and r["speedup_vs_cublas_fp8_pipeline"] == 70.0 / r["us"]
        assert r["chosen_over_best"] == r["us"] / r[f"{r['best']}_us"]
    assert all(r[f"{s}_us"] for r in exp for s in ("dense", "skip", "chosen"))
    # the rule picks a forced strategy and gives its bits here: timed once (chosen_timed_as)
    assert all(r.get("chosen_timed_as") == r["chosen"] for r in exp if layer.strategy_api())
    assert all((r["routed_us"] is not None) == layer.strategy_api() for r in exp)


def _tiny_weights(seed: int = 0, M: int = 7):
    E, I, H, k = TINY.experts, TINY.inter, TINY.hidden, TINY.topk
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(torch.bfloat16)
    x = torch.randn(M, H, generator=g).to(torch.bfloat16)
    top = torch.randn(M, E, generator=g).topk(k, dim=1)
    ids, weights = top.indices, top.values.softmax(dim=1)
    ids[0] = torch.tensor([E - 1, 0])  # the last expert picked too; some experts have no token
    ref = experts_ref(x, w13, w2, alpha_from_topk(ids, weights, E), compute_dtype=torch.float32)
    return w13, w2, x, ids, weights, ref


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_torch_grouped_bf16_matches_the_reference():
    w13, w2, x, ids, weights, ref = _tiny_weights()
    out = TorchGrouped(w13, w2, "bf16")(x, ids, weights)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert layer.rel_err(out, ref) < 1e-2


def _scaled_grouped_mm_emulated(a, b, scale_a, scale_b, offs=None, bias=None, scale_result=None, out_dtype=None,
                                use_fast_accum=False):
    """torch._scaled_grouped_mm's 2d x 3d semantics (row-wise scales) in fp32 on the CPU: rows
    [offs[g-1], offs[g]) of a times b[g]; a's row r scaled by scale_a[r], b[g]'s column n by
    scale_b[g, n]. Checks the layouts the CUDA kernel insists on."""
    assert a.dtype == b.dtype == torch.float8_e4m3fn and offs.dtype == torch.int32
    assert a.stride(-1) == 1 and b.stride(-2) == 1, "mat_a row-major, mat_b column-major"
    assert scale_a.shape == (a.shape[0],) and scale_b.shape == (b.shape[0], b.shape[2])
    out, start = torch.zeros(a.shape[0], b.shape[2]), 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = (a[start:end].float() * scale_a[start:end, None]) @ (b[g].float() * scale_b[g][None, :])
        start = end
    return out.to(out_dtype)


def test_torch_grouped_fp8_pipeline_math(monkeypatch):
    """The fp8 baseline's layouts and scales, with torch._scaled_grouped_mm emulated (it has no
    CPU kernel): within fp8's error (the benchmark's bound) of the fp32 reference."""
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _scaled_grouped_mm_emulated, raising=False)
    w13, w2, x, ids, weights, ref = _tiny_weights(seed=1)
    out = TorchGrouped(w13, w2, "fp8")(x, ids, weights)
    assert out.dtype == torch.bfloat16 and layer.rel_err(out, ref) < 0.1


def test_experts_call_uses_the_strategy_api(monkeypatch):
    """Issue 19's API, with stand-ins where the tree lacks it: each strategy goes to
    experts_forward(..., strategy=S, expert_ids=topk_ids, topk_weights=topk_weights), and the
    chosen name comes from strategy.pick(M, E, top_k, hidden=, inter=, dtype=)."""
    calls = []

    def experts_forward(x, prepared, alpha, *, strategy=None, expert_ids=None, topk_weights=None):
        calls.append((strategy, expert_ids, topk_weights))
        return x

    def pick(m, e, top_k=8, *, problem=None, device=None, routed_ok=True):
        calls.append(("pick", m, e, top_k, problem.h, problem.i, problem.dtype, device))
        return "routed"

    monkeypatch.setattr(densemoe, "experts_forward", experts_forward)
    monkeypatch.setattr(layer.strategy_rule, "pick", pick)
    assert layer.strategy_api()
    x, alpha = torch.zeros(3, 4), torch.zeros(3, 8)
    route = densemoe.routing.RouterOutput(alpha, torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2))
    for s in layer.STRATEGIES + (None,):
        fn, why = layer.experts_call(x, "prepared", route, s, 2)
        assert why is None
        fn()
        assert calls[-1] == (s, route.topk_ids, route.topk_weights)
    assert layer.picked_strategy(3, 8, 2, 4, 16, torch.bfloat16) == ("routed", None)
    assert calls[-1] == ("pick", 3, 8, 2, 4, 16, torch.bfloat16, "cpu")
    monkeypatch.delattr(layer.strategy_rule, "pick")
    name, note = layer.picked_strategy(3, 8, 2, 4, 16, torch.bfloat16)
    assert name is None and "pick" in note


def test_experts_plot_and_markdown_without_a_gpu(tmp_path):
    """The report of a saved run: markdown always; the plot where matplotlib is installed."""
    recs = []
    for M, chosen in ((1, "skip"), (64, "dense"), (4096, "routed")):
        r = dict(op="experts", shape="tiny", dtype="fp8", M=M, active_experts=8, routed_floor_us=5.0 * M ** 0.5,
                 chosen=chosen, baselines=["torch_grouped"], rel_err=0.03, torch_grouped_us=None,
                 torch_grouped_note="not built: AttributeError: no torch._scaled_grouped_mm")
        for i, s in enumerate(layer.STRATEGIES):
            r[f"{s}_us"] = 10.0 * M ** 0.5 * (1 + i)
            r[f"{s}_pct_floor"] = 100 * r["routed_floor_us"] / r[f"{s}_us"]
        r.update(chosen_us=r[f"{chosen}_us"], chosen_pct_floor=r[f"{chosen}_pct_floor"], us=r[f"{chosen}_us"],
                 tb_s=1.0, chosen_over_best=r[f"{chosen}_us"] / r["dense_us"])
        recs.append(r)
    md = "\n".join(layer.markdown_experts(recs))
    assert "### tiny fp8" in md and md.count("\n| 4096 |") == 1 and "no torch._scaled_grouped_mm" in md
    pytest.importorskip("matplotlib")
    from densemoe.bench.layer_plot import plot_experts

    assert plot_experts({"device": "cpu", "commit": "abc"}, recs, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert not plot_experts({}, [r for r in recs if r["op"] != "experts"], str(tmp_path / "q.png"))


# ------------------------------------------------------------------ dtype fp8block (issue 20)

TINYBLOCK = MoEShape("tinyblock", 256, 4, 128, 2)  # H and I multiples of 128: one 128 x 128 block and more
BLOCK_LINES = ("routed", "chosen", layer.PER_EXPERT, "cublas_fp8_pipeline", "hf_eager_bf16", "torch_grouped")
BLOCK_KEYS = KEYS | {"I", "top_k", "chosen", "routed_floor_us", "dense_floor_us", "flops", "active_experts",
                     "baselines", "block", "rel_err_routed", f"rel_err_{layer.PER_EXPERT}", "block_over_per_expert",
                     "err_block_over_per_expert", "dense_us", "skip_us"} | {
    f"{name}_{suffix}" for name in BLOCK_LINES for suffix in ("us", "tb_s", "pct_floor")}


def test_quantize_per_block_round_trip():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 256, 384, generator=g) * torch.rand(2, 2, 1, 3, 1, generator=g).expand(2, 2, 128, 3, 128).reshape(2, 256, 384)
    w[1, :128, :128] = 0  # an all-zero block: scale 1, zeros
    q, s = layer.quantize_per_block(w.to(torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.shape == (2, 2, 3) and s.dtype == torch.float32
    blocks = w.to(torch.bfloat16).float().reshape(2, 2, 128, 3, 128)
    amax = blocks.abs().amax(dim=(2, 4))
    assert torch.equal(s[amax > 0], amax[amax > 0] / 448) and s[1, 0, 0] == 1.0
    assert q.float().reshape(2, 2, 128, 3, 128).abs().amax(dim=(2, 4))[amax > 0].eq(448).all()  # each block's amax -> 448
    deq = layer.dequantize_per_block(q, s)
    assert layer.rel_err(deq, w) < 0.04 and deq[1, :128, :128].eq(0).all()
    with pytest.raises(ValueError, match="128 x 128"):
        layer.quantize_per_block(torch.zeros(1, 100, 128))
    assert layer.weight_bytes("fp8block", 2, 128, 256) == 3 * 2 * 128 * 256 + 3 * 2 * 1 * 2 * 4
    assert layer.weight_bytes("fp8", 2, 128, 256) * 2 == layer.weight_bytes("bf16", 2, 128, 256)


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_fp8block_records_and_report(tmp_path):
    """dtype fp8block: block-scaled weights on the routed path (dense / skip None with a note), the
    per-expert requantisation beside it, both errors against fp32 on the dequantised weights, the
    floor with the scales' bytes; layer records too; the report and plot render."""
    ceiling, peaks = {"tb_s": 3.0}, {"fp8": 1000.0, "bf16": 500.0}
    logs = []
    out = layer.run_layer([TINYBLOCK], ["fp8block"], [1, 7], fake_timer, ceiling, peaks, "cpu", "abc",
                          log=logs.append, dev="cpu", hf_implementations=("eager",))
    lay = [r for r in out if r["op"] == "layer"]
    exp = [r for r in out if r["op"] == "experts"]
    assert [(r["dtype"], r["M"]) for r in lay] == [("fp8block", 1), ("fp8block", 7)] and len(exp) == 2
    E, I, H = TINYBLOCK.experts, TINYBLOCK.inter, TINYBLOCK.hidden
    for r in lay:
        assert KEYS <= set(r) and r["us"] == 10.0 and r["rel_err"] < 0.1 and "err_ratio_vs_torch_fp8" not in r
        assert r["bytes"] == layer.weight_bytes("fp8block", r["active_experts"], I, H) + 2 * r["M"] * H * 2
    for r in exp:
        assert BLOCK_KEYS <= set(r), BLOCK_KEYS - set(r)
        assert r["dtype"] == "fp8block" and r["block"] == 128
        # every strategy runs block-scaled weights; the rule's choice is timed once, as its forced line
        assert r["dense_us"] == r["skip_us"] == r["routed_us"] == 10.0
        want = "skip" if r["M"] == 1 else "routed"  # top-2 of 4 experts: skip while M = 1 (share 0.5)
        assert r["chosen"] == want and r["chosen_timed_as"] == want and r["chosen_us"] == r["us"] == 10.0
        assert r[f"{layer.PER_EXPERT}_us"] == 10.0 and r["block_over_per_expert"] == 1.0
        # both errors against the fp32 reference on the dequantised weights; block scales the more accurate
        e, e_pe = r["rel_err_routed"], r[f"rel_err_{layer.PER_EXPERT}"]
        assert 0 < e < 0.1 and 0 < e_pe < 0.1 and r["rel_err"] == r[f"rel_err_{want}"]
        assert math.isclose(r["err_block_over_per_expert"], e / e_pe) and r["err_block_over_per_expert"] < 1.0
        # torch's bf16 grouped pipeline on the dequantised weights (where this torch has _grouped_mm)
        if hasattr(torch, "_grouped_mm"):
            assert r["torch_grouped_us"] == 10.0 and r["rel_err_torch_grouped"] < 2e-2, r.get("torch_grouped_note")
        assert r["cublas_fp8_pipeline_us"] == 10.0 and r["hf_eager_bf16_us"] == 10.0  # shared, as for fp8 / bf16
        assert r["bytes"] == 3 * r["active_experts"] * I * H * (1 + 4 / 16384)  # fp8 bytes + the scales'
        floor = max(r["bytes"] / ceiling["tb_s"] / 1e6, r["flops"] / peaks["fp8"] / 1e6)
        assert math.isclose(r["routed_floor_us"], floor) and math.isclose(r["routed_pct_floor"], 100 * floor / 10.0)
        assert r["best"] in layer.STRATEGIES and r["chosen_over_best"] == 1.0  # (every line 10 us)
    assert any("fp8block" in line and "block/per-expert 1.000" in line for line in logs)
    meta = dict(device="cpu", commit="abc", date="today", torch="t", triton="t", read_ceiling_tb_s=3.0,
                peak_tflops=peaks, command="python -m densemoe.bench layer --dtypes fp8block")
    md = layer.markdown(meta, out)
    assert "### tinyblock fp8block" in md and "| tinyblock | fp8block | 7 |" in md
    assert "block / per-expert" in md and "rel err per-expert fp8" in md and "every strategy runs them" in md
    row = next(line for line in md.splitlines() if line.startswith("| 7 |"))
    assert row.count("|") == next(line for line in md.splitlines() if line.startswith("| M | picked")).count("|")
    pytest.importorskip("matplotlib")
    from densemoe.bench.layer_plot import plot_experts

    assert plot_experts(meta, out, str(tmp_path / "b.png")) and (tmp_path / "b.png").stat().st_size > 1000


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_fp8block_timings_and_errors_land_on_the_right_keys(monkeypatch):
    """In the interleaved rounds: fp8block's torch_grouped, dense, skip, routed (chosen, routed at
    M = 7: timed once as the routed line, same bits), per-expert fp8; a line that is wrong is
    recorded (None, ``*_error``), not timed."""
    add_block = layer.ExpertsCase.add_block

    def broken(case):  # the per-expert weights with FC2's sign flipped: a wrong result
        add_block(case)
        pe = case.per_expert_from_block
        case.per_expert_from_block = type(pe)(pe.w1, pe.alpha1, pe.w2, -pe.w2_scale)

    ceiling, peaks = {"tb_s": 3.0}, {"fp8": 1000.0, "bf16": 500.0}
    out = layer.run_layer([TINYBLOCK], ["fp8block"], [7], OrderTimer(), ceiling, peaks, "cpu", "abc",
                          log=lambda s: None, dev="cpu", hf_implementations=("eager",))
    (r,) = [r for r in out if r["op"] == "experts"]
    # rounds: cuBLAS, eager (layer baselines), ours, experts-only, cuBLAS, eager (experts path), then fp8block's:
    # torch_grouped, dense, skip, routed, per-expert
    t = 80.0 if r["torch_grouped_us"] is not None else 70.0
    assert (r["dense_us"], r["skip_us"], r["routed_us"], r[f"{layer.PER_EXPERT}_us"]) == (t, t + 10, t + 20, t + 30)
    assert r["chosen"] == "routed" and r["chosen_us"] == r["routed_us"] and r["chosen_rounds"] == [t + 20] * 3
    assert r["block_over_per_expert"] == (t + 20) / (t + 30)
    monkeypatch.setattr(layer.ExpertsCase, "add_block", broken)
    out = layer.run_layer([TINYBLOCK], ["fp8block"], [7], fake_timer, ceiling, peaks, "cpu", "abc",
                          log=lambda s: None, dev="cpu", hf_implementations=("eager",))
    (r,) = [r for r in out if r["op"] == "experts"]
    assert r[f"{layer.PER_EXPERT}_us"] is None and "wrong result" in r[f"{layer.PER_EXPERT}_error"]
    assert r[f"rel_err_{layer.PER_EXPERT}"] > 0.1 and r["block_over_per_expert"] is None
    assert r["routed_us"] == r["chosen_us"] == 10.0 and "error" not in r  # (fake_timer: 10 us each)
    md = "\n".join(layer.markdown_experts(out))
    assert f"{layer.PER_EXPERT}: wrong result" in md


def test_fp8block_is_a_layer_dtype_only():
    from densemoe.bench.__main__ import main

    assert main(["fc1", "--dtypes", "fp8block"]) == 2
    assert main(["fc2", "--dtypes", "fp8,fp8block"]) == 2


def test_typical_x_picks_a_draw_near_the_expected_experts():
    """One draw's picked experts vary by a few experts around the mean: typical_x keeps the first
    x within one of it (at Qwen3-30B-A3B's E = 128, top-8, M = 16 and 64), deterministically."""
    from densemoe.shapes import MoEShape

    def case():
        return layer.ExpertsCase(MoEShape("q", 64, 128, 32, 8), device="cpu", seed=3)

    c = case()

    def ids_of(x):
        return (x.float() @ c.gate.float().T).topk(8, dim=1).indices

    for M in (16, 64):
        x, draws = c.typical_x(M, ids_of)
        assert abs(ids_of(x).unique().numel() - expected_picked(M, 128, 8)) <= 1 and draws >= 1
    d = case()
    assert torch.equal(d.typical_x(16, ids_of)[0], case().typical_x(16, ids_of)[0])


def test_chosen_is_timed_as_its_forced_line_only_when_the_bits_agree():
    """``_chosen_line``: strategy=None giving the picked strategy's bits is that line (timed once,
    ``chosen_timed_as``); other bits, or no forced line, and it is checked and timed on its own."""
    a, b = torch.ones(3), torch.full((3,), 2.0)
    for chosen_out, fns, timed_alone in ((a, {"routed": lambda: a}, False),
                                         (b, {"routed": lambda: a}, True),
                                         (a, {"routed": None}, True)):
        rec, lines, warned = {"chosen": "routed", "rel_err_routed": 0.01}, [], []
        layer._chosen_line(rec, fns, (lambda o=chosen_out: o, None),
                           lambda target, name, fn, bound, err_key=None, against=None: lines.append((name, err_key)),
                           0.1, None, warned.append)
        assert (lines == [("chosen", "rel_err")]) == timed_alone and not warned
        assert ("chosen_timed_as" in rec) != timed_alone
        if not timed_alone:
            assert rec["chosen_timed_as"] == "routed" and rec["rel_err"] == 0.01
    rec = {"chosen": "routed"}
    layer._chosen_line(rec, {"routed": lambda: a}, (None, "no strategy= here"), None, 0.1, None, print)
    assert rec["chosen_us"] is None and rec["chosen_note"] == "no strategy= here"
