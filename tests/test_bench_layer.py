"""The FC1 / layer benchmark's plumbing on the CPU (interpreter, a tiny shape, a fake timer):
results are checked, records carry the FC2 keys, baselines run, the report renders. The real
run is `python -m densemoe.bench fc1|layer` on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

from densemoe.bench import layer
from densemoe.bench.torch_grouped import TorchGrouped
from densemoe.reference import experts_ref
from densemoe.routing import alpha_from_topk
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
