"""The FC1 / layer benchmark's plumbing on the CPU (interpreter, a tiny shape, a fake timer):
results are checked, records carry the FC2 keys, baselines run, the report renders. The real
run is `python -m densemoe.bench fc1|layer` on a GPU."""

from __future__ import annotations

import os

import pytest

from densemoe.bench import layer
from densemoe.shapes import MoEShape
from _helpers import OrderTimer, fake_timer

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TINY = MoEShape("tiny", 64, 8, 32, 2)
KEYS = {"device", "op", "shape", "dtype", "M", "N", "K", "E", "us", "tb_s", "tflops", "floor_us", "pct_floor",
        "bytes", "rel_err", "commit"}



@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
def test_fc1_and_layer_benchmarks_run_and_report():
    ceiling, peaks = {"tb_s": 3.0}, {"fp8": 1000.0, "bf16": 500.0}
    logs = []
    fc1 = layer.run_fc1([TINY], ["fp8", "bf16"], [1, 7], fake_timer, ceiling, peaks, "cpu", "abc", log=logs.append, dev="cpu")
    lay = layer.run_layer([TINY], ["fp8", "bf16"], [1, 7], fake_timer, ceiling, peaks, "cpu", "abc", log=logs.append,
                          dev="cpu", hf_implementations=("eager",))
    assert len(fc1) == 4 and len(lay) == 4
    for r in fc1 + lay:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["us"] == 10.0 and r["rel_err"] < (0.1 if r["dtype"] == "fp8" else 2e-2)
    assert all(r["cublas_fp8_us"] == 10.0 and r["speedup_vs_cublas_fp8"] == 1.0 for r in fc1)
    assert all(r["config"].startswith("fc1-") and r["config_source"] == "heuristic" for r in fc1)
    for r in lay:
        assert r["cublas_fp8_pipeline_us"] == 10.0 and r["hf_eager_bf16_us"] == 10.0
        assert r["rel_err_torch_fp8"] > 0 and r["err_ratio_vs_torch_fp8"] > 0
        assert r["experts_only_us"] == 10.0 and r["router_us"] == 10.0 and r["torch_router_us"] == 10.0
    fp8 = [r for r in lay if r["dtype"] == "fp8"]
    assert all(r["err_ratio_vs_torch_fp8"] < 1.5 for r in fp8), [r["err_ratio_vs_torch_fp8"] for r in fp8]
    meta = dict(device="cpu", commit="abc", date="today", torch="t", triton="t", read_ceiling_tb_s=3.0,
                peak_tflops=peaks, command="python -m densemoe.bench layer")
    md = layer.markdown(meta, fc1 + lay)
    assert "## fc1" in md and "## layer" in md and "x cublas_fp8_pipeline" in md and "hf_eager_bf16 us" in md



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
    lay = layer.run_layer([TINY], ["fp8", "bf16"], [7], OrderTimer(), ceiling, peaks, "cpu", "abc", log=lambda s: None,
                          dev="cpu", hf_implementations=("grouped_mm", "batched_mm"))
    # interleaved: cuBLAS pipeline, grouped_mm, ours fp8, ours bf16, experts-only fp8, bf16;
    # batched_mm timed once (1 us)
    assert [(r["dtype"], r["us"], r["cublas_fp8_pipeline_us"], r["hf_grouped_mm_bf16_us"], r["hf_batched_mm_bf16_us"],
             r["experts_only_us"]) for r in lay] == [("fp8", 30.0, 10.0, 20.0, 1.0, 50.0), ("bf16", 40.0, 10.0, 20.0, 1.0, 60.0)]
