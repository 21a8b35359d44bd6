"""FC1 with fused SwiGLU: the op against its float64 reference twin.

CPU (CI): the real Triton kernel through the interpreter, small shapes, every config variant
pinned, ragged M, fp8 and bf16 inputs, bf16/fp32/fp8 outputs, optional x_scale / alpha_post.
GPU: the MISSION shapes (run on the H100 by bench/run_h100.sh)."""

from __future__ import annotations

import os

import pytest
import torch

import densemoe
from densemoe.kernels.common import Fc1Problem
from densemoe.kernels.triton.fc1 import Fc1TritonConfig, can_implement
from densemoe.ops.fc1_configs import default_config
from densemoe.reference import fc1_ref
from _helpers import FP8, seed_of

BF16 = torch.bfloat16
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = "cpu" if INTERPRET else "cuda"
needs_kernel = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                  reason="needs TRITON_INTERPRET=1 or a CUDA GPU")


def inputs(M, H, E, I, dtype, seed, device=DEV):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=g)
    w1 = torch.randn(2 * E * I, H, generator=g) * H ** -0.5
    if dtype == FP8:
        x = x * 4  # use fp8's range
    alpha1 = torch.rand(E, generator=g) + 0.5
    x_scale = torch.rand(M, generator=g) + 0.5
    post = torch.rand(M, E, generator=g) * (torch.rand(M, E, generator=g) < 0.5)
    return [t.to(device) for t in (x.to(dtype), w1.to(dtype), alpha1, x_scale, post)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def torch_error(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """What PyTorch itself loses storing the exact result in ``dtype`` (round to nearest)."""
    return rel(ref64.to(dtype), ref64)


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("M", [1, 7, 100])
@pytest.mark.parametrize("dtype", [FP8, BF16], ids=["fp8", "bf16"])
@pytest.mark.parametrize("extras", ["none", "x_scale", "post", "both"])
def test_fc1_matches_reference(M, dtype, extras, request):
    E, I, H = 3, 80, 80  # I not a multiple of the 64-wide tile, H not of the k-tile: masks
    x, w1, a1, xs, post = inputs(M, H, E, I, dtype, seed_of(request.node.nodeid))
    kw = dict(x_scale=xs if extras in ("x_scale", "both") else None,
              alpha_post=post if extras in ("post", "both") else None)
    out = torch.full((M, E * I), float("nan"), dtype=BF16, device=DEV)
    y = densemoe.fc1(x, w1, a1, out=out, **kw)
    assert y is out
    ref = fc1_ref(x, w1, a1, out_dtype=torch.float64, **kw)
    # bf16 output: fp32 accumulation then one rounding; allow 2x torch's own rounding error
    assert rel(y, ref) <= 2 * torch_error(ref, BF16) + 1e-6, (rel(y, ref), torch_error(ref, BF16))


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("M", [1, 33])
def test_fc1_fp8_output_with_static_scale(M, request):
    E, I, H = 2, 64, 64
    x, w1, a1, xs, post = inputs(M, H, E, I, FP8, seed_of(request.node.nodeid))
    ref = fc1_ref(x, w1, a1, x_scale=xs, out_dtype=torch.float64)
    scale = (ref.abs().amax() / 448).float().reshape(1)
    y8 = densemoe.fc1(x, w1, a1, x_scale=xs, out_dtype=FP8, out_scale=scale)
    assert y8.dtype == FP8 and tuple(y8.shape) == (M, E * I)
    deq = y8.double() * scale.double()
    torch_err = rel((ref / scale.double()).to(FP8).double() * scale.double(), ref)
    # one rounding to nearest of an fp32-accumulated value: within 1.5x torch's own rounding error
    assert rel(deq, ref) <= 1.5 * torch_err, (rel(deq, ref), torch_err)
    # values beyond the scale's range saturate at +-448, never inf/nan
    small = scale / 16
    y_sat = densemoe.fc1(x, w1, a1, x_scale=xs, out_dtype=FP8, out_scale=small)
    assert torch.isfinite(y_sat.float()).all() and y_sat.float().abs().max().item() == 448.0


CONFIGS = [Fc1TritonConfig(16, 16, 16, 1, 1), Fc1TritonConfig(32, 64, 32, 4, 2), Fc1TritonConfig(64, 32, 128, 8, 3),
           Fc1TritonConfig(16, 64, 32, 4, 3, swap_ab=1), Fc1TritonConfig(32, 128, 64, 8, 2, swap_ab=1, use_tma=0),
           # persistent programs (4 "SMs" in the interpreter: 12 tiles, 3 or more per program)
           Fc1TritonConfig(16, 16, 16, 1, 1, persistent=1),
           Fc1TritonConfig(16, 64, 32, 4, 3, swap_ab=1, persistent=2),
           Fc1TritonConfig(32, 32, 32, 4, 2, use_tma=0, persistent=1),
           Fc1TritonConfig(16, 64, 32, 4, 3, swap_ab=1, persistent=1, split_k=2),
           Fc1TritonConfig(32, 32, 16, 4, 2, persistent=2, split_k=3),
           # stream-K: equal shares of all k-steps, units cut across programs
           Fc1TritonConfig(16, 64, 16, 4, 3, swap_ab=1, persistent=1, stream_k=1),
           Fc1TritonConfig(32, 32, 16, 4, 2, use_tma=0, persistent=2, stream_k=1)]


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.to_str().split(":")[1])
def test_every_pinned_config(cfg, request):
    M, E, I, H = 20, 2, 40, 48
    x, w1, a1, xs, post = inputs(M, H, E, I, BF16, seed_of(request.node.nodeid))
    assert can_implement(Fc1Problem(M, H, E, I, BF16, BF16), cfg)[0]
    y = densemoe.fc1(x, w1, a1, alpha_post=post, config=cfg, out_dtype=torch.float32)
    ref = fc1_ref(x, w1, a1, alpha_post=post, out_dtype=torch.float64)
    assert rel(y, ref) <= 1e-5  # fp32 output: only accumulation order differs


def test_config_validity_and_default():
    p = Fc1Problem(5, 7168, 256, 256, FP8, BF16)
    assert not can_implement(p, Fc1TritonConfig(block_m=24))[0]
    assert "swap_ab needs block_i >= 64" in can_implement(p, Fc1TritonConfig(block_i=32, swap_ab=1))[1]
    assert default_config(p).swap_ab == 1 and default_config(Fc1Problem(512, 7168, 256, 256, FP8, BF16)).swap_ab == 0
    assert "registers" in can_implement(p, Fc1TritonConfig(256, 256, 64, 4, 3))[1]
    # the H100 refused this one at compile time (294936 B needed): rejected up front now
    assert "shared memory" in can_implement(p, Fc1TritonConfig(128, 128, 256, 8, 3))[1]
    assert can_implement(p, Fc1TritonConfig(128, 128, 128, 8, 4))[0]
    assert "must be in [0, 4]" in can_implement(p, Fc1TritonConfig(persistent=5))[1]
    assert "needs persistent >= 1" in can_implement(p, Fc1TritonConfig(split_k=2))[1]
    assert "stream_k=1 must be" in can_implement(p, Fc1TritonConfig(stream_k=1))[1]
    assert "stream_k=1 must be" in can_implement(p, Fc1TritonConfig(persistent=1, split_k=2, stream_k=1))[1]
    assert can_implement(p, Fc1TritonConfig(persistent=1, stream_k=1))[0]
    assert "exceeds the 2 k-tiles" in can_implement(Fc1Problem(5, 256, 8, 64, FP8, BF16),
                                                    Fc1TritonConfig(block_k=128, persistent=1, split_k=4))[1]
    # two persistent programs per SM must both fit in shared memory
    assert "2 persistent programs per SM" in can_implement(p, Fc1TritonConfig(64, 64, 256, 4, 3, 1, persistent=2))[1]
    assert can_implement(p, Fc1TritonConfig(64, 64, 128, 4, 3, 1, persistent=2))[0]
    for m in (1, 16, 17, 64, 512):
        for i in (16, 48, 256, 768, 7168):
            q = Fc1Problem(m, 2048, 8, i, BF16, BF16)
            c = default_config(q)
            assert can_implement(q, c)[0] and default_config(q) == c
    # skipping: split_k where four times the expected units fit the programs (M = 1 at top-8 of 256),
    # stream-K where they exceed them with 16-token tiles (M = 8-16)
    from densemoe.ops.fc1_configs import default_skip_config
    sk = {m: default_skip_config(Fc1Problem(m, 7168, 256, 256, FP8, BF16), 132) for m in (1, 2, 4, 8, 16, 17, 64, 128)}
    assert sk[1].split_k == 4 and not sk[1].stream_k
    assert [sk[m].stream_k for m in (2, 4, 8, 16, 17, 64, 128)] == [0, 0, 1, 1, 0, 0, 0]
    assert all(can_implement(Fc1Problem(m, 7168, 256, 256, FP8, BF16), c)[0] for m, c in sk.items())
    for c in (Fc1TritonConfig(32, 64, 128, 4, 2), Fc1TritonConfig(64, 64, 128, 4, 3, 1, persistent=2)):
        assert Fc1TritonConfig.from_str(c.to_str()) == c


@pytest.mark.skipif(not INTERPRET, reason="CPU validation path")
def test_validation_names_the_argument():
    x, w1, a1, xs, post = inputs(4, 32, 2, 16, BF16, 0)
    with pytest.raises(TypeError, match="w1 must have x's dtype"):
        densemoe.fc1(x, w1.float(), a1)
    with pytest.raises(TypeError, match="alpha1 must be float32"):
        densemoe.fc1(x, w1, a1.double())
    with pytest.raises(ValueError, match="w1 has 64 rows, expected a positive multiple of 2\\*E = 6"):
        densemoe.fc1(x, w1, torch.ones(3))
    with pytest.raises(ValueError, match="w1 has 31 columns"):
        densemoe.fc1(x, w1[:, :31], a1)
    with pytest.raises(ValueError, match="x_scale has 3 entries"):
        densemoe.fc1(x, w1, a1, x_scale=xs[:3])
    with pytest.raises(ValueError, match="alpha_post has shape"):
        densemoe.fc1(x, w1, a1, alpha_post=post[:, :1])
    with pytest.raises(ValueError, match="needs out_scale"):
        densemoe.fc1(x, w1, a1, out_dtype=FP8)
    with pytest.raises(ValueError, match="out_scale is only for an fp8 output"):
        densemoe.fc1(x, w1, a1, out_scale=torch.ones(1))
    with pytest.raises(ValueError, match="out has shape"):
        densemoe.fc1(x, w1, a1, out=torch.empty(4, 3, dtype=BF16))
    with pytest.raises(ValueError, match="cannot run"):
        densemoe.fc1(x, w1, a1, config=Fc1TritonConfig(block_m=24))
    with pytest.raises(ValueError, match="inference-only"):
        densemoe.fc1(x, w1, a1.clone().requires_grad_())
    assert densemoe.fc1(x[:0], w1, a1).shape == (0, 32)


@pytest.mark.skipif(not INTERPRET, reason="CPU compile path")
def test_fc1_under_torch_compile_fullgraph():
    x, w1, a1, xs, post = inputs(3, 32, 2, 16, BF16, 1)
    f = torch.compile(lambda x, w, a, p: densemoe.fc1(x, w, a, alpha_post=p), fullgraph=True, backend="aot_eager")
    y = f(x, w1, a1, post)
    ref = fc1_ref(x, w1, a1, alpha_post=post, out_dtype=torch.float64)
    assert rel(y, ref) <= 2 * torch_error(ref, BF16) + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU and TRITON_INTERPRET unset")
@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("M", [1, 7, 100, 1000])
@pytest.mark.parametrize("dtype", [FP8, BF16], ids=["fp8", "bf16"])
def test_fc1_model_shapes_on_gpu(shape, M, dtype, request):
    from densemoe.shapes import SHAPES

    s = SHAPES[shape]
    x, w1, a1, xs, post = inputs(M, s.hidden, s.experts, s.inter, dtype, seed_of(request.node.nodeid), "cuda")
    out = torch.full((M, s.experts * s.inter), float("nan"), dtype=BF16, device="cuda")
    densemoe.fc1(x, w1, a1, x_scale=xs, alpha_post=post, out=out)
    ref = fc1_ref(x, w1, a1, x_scale=xs, alpha_post=post, out_dtype=torch.float32, compute_dtype=torch.float32)
    assert rel(out, ref) <= 2 * torch_error(ref, BF16) + 1e-5


DYN_CONFIGS = [None, Fc1TritonConfig(16, 64, 32, 4, 2, swap_ab=1), Fc1TritonConfig(32, 64, 64, 8, 2, swap_ab=0),
               Fc1TritonConfig(16, 128, 32, 4, 2, swap_ab=1, use_tma=0),
               Fc1TritonConfig(16, 64, 32, 4, 2, swap_ab=1, persistent=1)]


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("M", [1, 7, 40])
@pytest.mark.parametrize("dtype", [FP8, BF16], ids=["fp8", "bf16"])
@pytest.mark.parametrize("cfg", DYN_CONFIGS, ids=lambda c: "default" if c is None else c.to_str().split(":")[1])
def test_fc1_fp8_dynamic_scale_per_token_expert(M, dtype, cfg, request):
    """The epilogue quantises per (token, expert): against the float64 reference quantised the
    same way in torch (from the exact values), the scales agree to fp32 accumulation error and
    the dequantised output is within 1.5x torch's own fp8 rounding error."""
    E, I, H = 3, 56, 80  # I below the 64-row tile: masked rows must not enter the amax
    x, w1, a1, xs, post = inputs(M, H, E, I, dtype, seed_of(request.node.nodeid))
    post[0, 1] = 0.0  # an all-zero (token, expert) segment: scale 1, zeros
    y8, ys = densemoe.ops.fc1.fc1_fp8_dynamic(x, w1, a1, x_scale=xs, alpha_post=post, config=cfg)
    assert y8.dtype == FP8 and tuple(y8.shape) == (M, E * I) and tuple(ys.shape) == (M, E)
    ref = fc1_ref(x, w1, a1, x_scale=xs, alpha_post=post, out_dtype=torch.float64)
    amax = ref.reshape(M, E, I).abs().amax(dim=2)
    want = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    assert ((ys.double().cpu() - want.cpu()).abs() <= 1e-5 * want.cpu()).all()
    assert ys[0, 1].item() == 1.0 and not y8.float()[0, I:2 * I].any()
    deq = (y8.double().reshape(M, E, I) * ys.double()[:, :, None]).reshape(M, E * I)
    torch_q = ((ref.reshape(M, E, I) / want[:, :, None]).clamp(-448, 448).to(FP8).double()
               * want[:, :, None]).reshape(M, E * I)
    assert rel(deq, ref) <= 1.5 * rel(torch_q, ref) + 1e-12, (rel(deq, ref), rel(torch_q, ref))


def test_fc1_fp8_dynamic_rejects_what_it_cannot_run():
    x, w1, a1, xs, post = inputs(2, 32, 2, 512, BF16, 0, device="cpu")
    with pytest.raises(ValueError, match=r"I=512"):  # one tile cannot hold I = 512
        densemoe.ops.fc1.fc1_fp8_dynamic(x, w1, a1)
    x, w1, a1, xs, post = inputs(2, 32, 2, 64, BF16, 0, device="cpu")
    with pytest.raises(ValueError, match=r"block_i >= I=64"):
        densemoe.ops.fc1.fc1_fp8_dynamic(x, w1, a1, config=Fc1TritonConfig(16, 32, 32, 4, 2))
    with pytest.raises(TypeError, match="Fc1TritonConfig"):
        densemoe.ops.fc1.fc1_fp8_dynamic(x, w1, a1, config=densemoe.Fc1CuteConfig())
    with pytest.raises(TypeError, match="alpha1"):  # fc1's shared checks name the argument
        densemoe.ops.fc1.fc1_fp8_dynamic(x, w1, a1.double())
    with pytest.raises(ValueError, match="x_scale has 3 entries, expected M=2"):
        densemoe.ops.fc1.fc1_fp8_dynamic(x, w1, a1, x_scale=torch.ones(3))


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("skip", [False, True], ids=["dense", "skip"])
@pytest.mark.parametrize("mode", ["split_k", "stream_k"])
def test_split_k_leaves_workspace_zeroed(skip, mode, request, monkeypatch):
    """split_k > 1 / stream_k: the k-ranges of a tile meet in the stream's reused workspace
    (``kernels/common.py``), which every launch leaves at zero; back-to-back calls
    of other shapes and program counts stay right. Stream-K (every last wave cut by k-steps here):
    the cases include last waves cut mid-unit, one unit cut several times, and none at all."""
    import densemoe.kernels.triton.fc1 as k1
    from densemoe.kernels.triton.fc1 import fc1_triton
    from densemoe.kernels.common import stream_buffer

    monkeypatch.setattr(k1, "STREAM_K_TAIL", 1.0)
    cfg = Fc1TritonConfig(16, 32, 16, 4, 2, persistent=1, **({"split_k": 3} if mode == "split_k" else {"stream_k": 1}))
    waves = set()
    for M, H, E, I, progs in ((3, 64, 4, 32, 5), (20, 48, 3, 64, 5), (3, 64, 4, 32, 3), (40, 64, 6, 32, 7),
                              (1, 64, 4, 32, 7)):
        x, w1, a1, xs, post = inputs(M, H, E, I, BF16, seed_of(request.node.nodeid, M))
        route = (torch.rand(M, E, generator=torch.Generator().manual_seed(M)) < 0.5).float().to(x.device)
        route[0, 1] = 1.0  # never an all-zero routing
        y = torch.full((M, E * I), float("nan"), dtype=torch.float32, device=x.device)
        fc1_triton(x, w1, a1, y, cfg, alpha_post=post, routing=route, skip=skip, num_programs=progs)
        tiles = [route[t:t + 16] for t in range(0, M, 16)]
        units = sum(int((r != 0).any(0).sum()) if skip else E for r in tiles) * -(-I // 32)
        waves.add((units // progs > 0, units % progs > 0))
        ref = fc1_ref(x, w1, a1, alpha_post=post, out_dtype=torch.float64) * route.repeat_interleave(I, dim=1)
        assert rel(y, ref) <= 1e-5
        assert (stream_buffer(x.device) == 0).all()
    assert (True, True) in waves and (False, True) in waves  # a cut last wave; all units in one wave
