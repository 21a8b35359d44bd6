"""Expert skipping (issue 6): the active-expert lists, FC1 and FC2 walking only picked experts.

CPU (CI): the real Triton kernels through the interpreter on small shapes, with routing
patterns that exercise every path: one expert, a token tile with no expert at all, every
expert, random top-k; outputs poisoned before each run, against float64 references.
GPU: the model shapes with real routing, skipping on and off, graph capture with routing that
changes between replays."""

from __future__ import annotations

import os

import pytest
import torch

import densemoe
from densemoe.timing import capture
from densemoe.kernels.triton.fc1 import Fc1TritonConfig, fc1_triton
from densemoe.kernels.triton.fc2 import Fc2TritonConfig, fc2_triton
from densemoe.kernels.triton.skip import active_experts
from densemoe.reference import active_experts_ref
from densemoe.reference import fc1_ref, fc2_ref
from _helpers import FP8, gpu_big_test as gpu_test, seed_of

BF16 = torch.bfloat16
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = "cpu" if INTERPRET else "cuda"
needs_kernel = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                  reason="needs TRITON_INTERPRET=1 or a CUDA GPU")

PATTERNS = ("one_expert", "empty_tile", "all_experts", "topk")


def routing(pattern: str, M: int, E: int, gen: torch.Generator, k: int = 2) -> torch.Tensor:
    """[M, E] float32 routing weights (0 = not picked)."""
    r = torch.zeros(M, E)
    if pattern == "one_expert":  # every token picks expert E-2
        r[:, E - 2] = torch.rand(M, generator=gen) + 0.1
    elif pattern == "empty_tile":  # tokens 16.. pick nothing (a whole 16-token tile without experts)
        top = torch.rand(M, E, generator=gen).topk(k, dim=1).indices
        r.scatter_(1, top, torch.rand(M, k, generator=gen) + 0.1)
        r[16:] = 0
    elif pattern == "all_experts":
        r = torch.rand(M, E, generator=gen) + 0.1
    else:
        top = torch.rand(M, E, generator=gen).topk(k, dim=1).indices
        r.scatter_(1, top, torch.rand(M, k, generator=gen) + 0.1)
    return r.to(DEV)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("block_m", [16, 32])
def test_active_lists_match_their_twin(pattern, block_m, request):
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    r = routing(pattern, 37, 12, g)
    lists, counts = active_experts(r, block_m)
    want_l, want_c = active_experts_ref(r, block_m)
    assert torch.equal(lists.cpu(), want_l.cpu()) and torch.equal(counts.cpu(), want_c.cpu())
    for t in range(counts.numel()):  # a permutation: picked ascending, then the rest ascending
        row = lists[t].tolist()
        assert sorted(row) == list(range(12))
    if pattern == "empty_tile" and block_m == 16:
        assert counts[1].item() == 0 and counts[2].item() == 0
    # bool masks give the same lists
    lb, cb = active_experts(r != 0, block_m)
    assert torch.equal(lb, lists) and torch.equal(cb, counts)


FC1_SKIP_CONFIGS = [Fc1TritonConfig(16, 16, 16, 1, 1, persistent=1),
                    Fc1TritonConfig(16, 64, 16, 4, 2, swap_ab=1, persistent=2),
                    Fc1TritonConfig(32, 32, 32, 4, 2, use_tma=0, persistent=1),
                    Fc1TritonConfig(16, 64, 16, 4, 2, swap_ab=1, persistent=1, split_k=3),
                    Fc1TritonConfig(32, 32, 16, 4, 2, use_tma=0, persistent=1, split_k=2),
                    Fc1TritonConfig(16, 64, 16, 4, 2, swap_ab=1, persistent=1, stream_k=1),
                    Fc1TritonConfig(16, 32, 16, 4, 2, persistent=2, stream_k=1)]


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("cfg", FC1_SKIP_CONFIGS, ids=lambda c: c.to_str().split(":")[1])
@pytest.mark.parametrize("dtype", [BF16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("M", [40, 5])  # 5: one token tile (the list stays in registers)
def test_fc1_skipping_kernel(pattern, cfg, dtype, M, request):
    """y = FC1 where the token picked the expert, 0 elsewhere; skipped segments are zero-filled
    (the output starts as NaN)."""
    E, I, H = 6, 40, 64
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    x = torch.randn(M, H, generator=g).to(dtype).to(DEV)
    w1 = (torch.randn(2 * E * I, H, generator=g) * H ** -0.5).to(dtype).to(DEV)
    a1 = (torch.rand(E, generator=g) + 0.5).to(DEV)
    r = routing(pattern, M, E, g)
    y = torch.full((M, E * I), float("nan"), device=DEV)
    fc1_triton(x, w1, a1, y, cfg, routing=r, skip=True, num_programs=3,
               active=active_experts(r, cfg.block_m) if pattern == "topk" else None)  # given lists too
    mask = (r != 0).double().repeat_interleave(I, dim=1)
    ref = fc1_ref(x, w1, a1, out_dtype=torch.float64) * mask
    assert not torch.isnan(y).any()
    assert (y[mask == 0] == 0).all()
    assert rel(y, ref) <= 1e-5  # fp32 output: only the accumulation order differs


FC2_SKIP_CONFIGS = [Fc2TritonConfig(16, 64, 32, 4, 2, True, True, 0, 1),
                    Fc2TritonConfig(16, 32, 64, 4, 2, False, False, 1, 1),
                    Fc2TritonConfig(32, 64, 32, 4, 2, True, True, 2, 1)]


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("cfg", FC2_SKIP_CONFIGS, ids=lambda c: c.to_str())
@pytest.mark.parametrize("dtype", [BF16, FP8], ids=["bf16", "fp8"])
def test_fc2_skipping_kernel(pattern, cfg, dtype, request):
    """FC2 over the picked experts only: NaN in the segments nobody picked must not leak (they
    are never read, or weighted by alpha = 0), tiles with no expert come out as zeros."""
    M, E, I, N = 40, 6, 64, 64
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    r = routing(pattern, M, E, g)
    a = torch.randn(M, E * I, generator=g).to(dtype).to(DEV)
    w = (torch.randn(N, E * I, generator=g) * 0.1).to(dtype).to(DEV)
    a_nan = a.clone()
    unpicked = (r == 0).repeat_interleave(I, dim=1)
    if dtype == FP8:  # 0x7F is NaN in e4m3fn
        a_nan.view(torch.uint8)[unpicked] = 0x7F
    else:
        a_nan[unpicked] = float("nan")
    out = torch.full((M, N), float("nan"), dtype=torch.float32, device=DEV)
    fc2_triton(a_nan, w, r, out, cfg, skip=True, num_programs=5)
    ref = fc2_ref(a, w, r, out_dtype=torch.float64)
    assert not torch.isnan(out).any()
    if pattern == "empty_tile":
        assert (out[16:] == 0).all()
    assert rel(out, ref) <= 1e-5


# --------------------------------------------------------------------------------------------
# The public ops and the layer (CPU interpreter): skipping on and off give the same result.
# --------------------------------------------------------------------------------------------

def _one_token_case(request, dtype, E=6, I=32, H=64, k=3, order="topk"):
    """One token picking k of E experts; its ids in top-k order (descending weight), or reversed,
    or with an extra expert whose weight is 0."""
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    x = torch.randn(1, H, generator=g).to(dtype).to(DEV)
    w1 = (torch.randn(2 * E * I, H, generator=g) * H ** -0.5).to(dtype).to(DEV)
    a1 = (torch.rand(E, generator=g) + 0.5).to(DEV)
    xs = (torch.rand(1, generator=g) + 0.5).to(DEV) if dtype == FP8 else None
    w = torch.rand(k, generator=g) + 0.1
    ids = torch.randperm(E, generator=g)[:k]
    r = torch.zeros(1, E)
    r[0, ids] = w
    ids = ids[w.argsort(descending=True)]
    if order == "reversed":
        ids = ids.flip(0)
    elif order == "zero_weight":  # an id the routing gives weight 0: adds nothing, changes nothing
        rest = [e for e in range(E) if e not in ids.tolist()]
        ids = torch.cat([ids, torch.tensor(rest[:1])])
    return x, w1, a1, xs, r.to(DEV), ids.to(DEV)


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("order", ["topk", "reversed", "zero_weight"])
@pytest.mark.parametrize("cfg", FC1_SKIP_CONFIGS, ids=lambda c: c.to_str().split(":")[1])
@pytest.mark.parametrize("dtype", [BF16, FP8], ids=["bf16", "fp8"])
def test_fc1_with_expert_ids(order, cfg, dtype, request):
    """One token: FC1 walking the given ids writes the picked segments as the list built from
    the routing does (NaN-poisoned outputs), and against float64."""
    x, w1, a1, xs, r, ids = _one_token_case(request, dtype, order=order)
    E, I = a1.shape[0], w1.shape[0] // (2 * a1.shape[0])
    ys = []
    for given in (None, ids, ids.to(torch.int32)[None, :]):
        y = torch.full((1, E * I), float("nan"), device=DEV)
        densemoe.fc1(x, w1, a1, x_scale=xs, routing=r, skip=True, fill_unpicked=False, config=cfg, out=y,
                     expert_ids=given)
        ys.append(y)
    live = (r != 0).repeat_interleave(I, 1)
    ref = fc1_ref(x, w1, a1, x_scale=xs, out_dtype=torch.float64)
    written = live.clone()
    if order == "zero_weight":  # its segment is computed, and zeroed by the routing
        e = int(ids[-1])
        written[0, e * I:(e + 1) * I] = True
    for y in ys[1:]:
        assert torch.isnan(y[~written]).all() and not torch.isnan(y[written]).any()
        assert (y[written & ~live] == 0).all()
        if cfg.split_k == 1 and not cfg.stream_k:  # the same units, the same sums
            assert torch.equal(y[live], ys[0][live])
        assert rel(y[live], ref[live]) <= 2e-5


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("order", ["topk", "reversed", "zero_weight"])
@pytest.mark.parametrize("cfg", FC2_SKIP_CONFIGS, ids=lambda c: c.to_str())
@pytest.mark.parametrize("dtype", [BF16, FP8], ids=["bf16", "fp8"])
def test_fc2_with_expert_ids(order, cfg, dtype, request):
    """One token: FC2 over the given ids against the list built from alpha (NaN in the segments
    of unpicked experts: never read) and against float64."""
    E, I, N = 6, 64, 96
    _, _, _, _, r, ids = _one_token_case(request, BF16, E=E, I=I, order=order)
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid, "a"))
    a = torch.randn(1, E * I, generator=g)
    a[(r == 0).repeat_interleave(I, 1).cpu()] = float("nan")  # (NaN in fp8 too)
    a = a.to(dtype).to(DEV)
    w = (torch.randn(N, E * I, generator=g) * I ** -0.5).to(dtype).to(DEV)
    outs = []
    for given in (None, ids):
        o = torch.full((1, N), float("nan"), dtype=torch.float32, device=DEV)
        densemoe.fc2(a, w, r, skip=True, config=cfg, out=o, expert_ids=given)
        outs.append(o)
    ref = fc2_ref(torch.nan_to_num(a.float(), nan=0.0), w, r, out_dtype=torch.float64)
    assert not torch.isnan(outs[1]).any()
    assert rel(outs[1], outs[0]) <= 1e-6 and rel(outs[1], ref) <= 1e-5


@needs_kernel
@pytest.mark.interpreter
def test_expert_ids_errors():
    E, I, H = 4, 32, 64
    g = torch.Generator().manual_seed(5)
    w1 = (torch.randn(2 * E * I, H, generator=g) * H ** -0.5).to(BF16).to(DEV)
    a1 = torch.ones(E, device=DEV)
    x1, x2 = (torch.randn(m, H, generator=g).to(BF16).to(DEV) for m in (1, 2))
    r1, r2 = routing("topk", 1, E, g), routing("topk", 2, E, g)
    ids = torch.tensor([2, 0], device=DEV)
    ok = dict(skip=True, fill_unpicked=False)
    with pytest.raises(ValueError, match="M = 1"):
        densemoe.fc1(x2, w1, a1, routing=r2, expert_ids=ids, **ok)
    with pytest.raises(ValueError, match="fill_unpicked=False"):
        densemoe.fc1(x1, w1, a1, routing=r1, skip=True, expert_ids=ids)
    with pytest.raises(ValueError, match="skipping is off"):
        densemoe.fc1(x1, w1, a1, routing=r1, skip=False, fill_unpicked=False, expert_ids=ids)
    with pytest.raises(TypeError, match="integer"):
        densemoe.fc1(x1, w1, a1, routing=r1, expert_ids=ids.float(), **ok)
    with pytest.raises(ValueError, match=r"\[k\] or \[1, k\]"):
        densemoe.fc1(x1, w1, a1, routing=r1, expert_ids=ids.view(2, 1), **ok)
    with pytest.raises(ValueError, match=r"1 <= k <= E=4"):
        densemoe.fc1(x1, w1, a1, routing=r1, expert_ids=torch.arange(5, device=DEV), **ok)
    with pytest.raises(TypeError, match="torch.Tensor"):
        densemoe.fc1(x1, w1, a1, routing=r1, expert_ids=[2, 0], **ok)
    a = torch.randn(1, E * I, generator=g).to(BF16).to(DEV)
    w = torch.randn(48, E * I, generator=g).to(BF16).to(DEV)
    with pytest.raises(ValueError, match="skipping is off"):
        densemoe.fc2(a, w, r1, skip=False, expert_ids=ids)
    with pytest.raises(ValueError, match="M = 1"):
        densemoe.fc2(torch.cat([a, a]), w, r2, skip=True, expert_ids=ids)


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_dense_moe_one_token_hands_its_topk_ids_to_fc1_and_fc2(dtype, monkeypatch, request):
    """DenseMoE at M = 1 passes the router's top-k ids to FC1 and FC2 (and not at M = 2); its
    output matches experts_forward on the same alpha with lists built from the routing."""
    import densemoe.experts as layer  # the module whose fc1 / fc2 the layer calls
    from densemoe.weights import prepare_weights

    E, I, H, k = 8, 32, 64, 2
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(BF16).to(DEV)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(BF16).to(DEV)
    gate = (torch.randn(E, H, generator=g) * H ** -0.5).to(BF16).to(DEV)
    moe = densemoe.DenseMoE(prepare_weights(w13, w2, dtype=dtype), gate, k, skip=True)
    seen = []
    for name in ("fc1", "fc2"):
        real = getattr(layer, name)

        def spy(*a, _real=real, _name=name, **kw):
            seen.append((_name, a[0].shape[0], kw.get("expert_ids")))
            return _real(*a, **kw)
        monkeypatch.setattr(layer, name, spy)
    for M in (1, 2):
        x = torch.randn(M, H, generator=g).to(BF16).to(DEV)
        seen.clear()
        out = moe(x)
        route = moe.route(x)
        for name, m, given in seen:
            if M == 1:
                assert given is not None and torch.equal(given.reshape(-1).cpu(), route.topk_ids.reshape(-1).cpu())
            else:
                assert given is None
        assert [s[0] for s in seen] == ["fc1", "fc2"]
        lists = densemoe.experts_forward(x, moe.prepared, route.alpha, skip=True)
        assert rel(out, lists) <= 1e-2


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [FP8, BF16], ids=["fp8", "bf16"])
@pytest.mark.parametrize("M", [1, 7, 40])
def test_layer_with_and_without_skipping(dtype, M, request):
    from densemoe.reference import experts_ref
    from densemoe.weights import prepare_weights

    E, I, H, k = 8, 32, 64, 2
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(BF16).to(DEV)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(BF16).to(DEV)
    x = torch.randn(M, H, generator=g).to(BF16).to(DEV)
    alpha = routing("topk", M, E, g, k)
    prepared = prepare_weights(w13, w2, dtype="fp8" if dtype == FP8 else "bf16")
    ref = experts_ref(x, w13, w2, alpha, compute_dtype=torch.float64)
    on = densemoe.experts_forward(x, prepared, alpha, skip=True)
    off = densemoe.experts_forward(x, prepared, alpha, skip=False)
    err_on, err_off = rel(on, ref), rel(off, ref)
    # same quantisation, same products: only fp32 summation order may differ
    assert err_on <= 1.02 * err_off + 1e-6, (err_on, err_off)
    assert rel(on, off) <= (2e-2 if dtype == FP8 else 1e-2)


@needs_kernel
@pytest.mark.interpreter
def test_ops_skip_flags_and_errors():
    M, E, I, H = 5, 4, 32, 64
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, H, generator=g).to(BF16).to(DEV)
    w1 = (torch.randn(2 * E * I, H, generator=g) * H ** -0.5).to(BF16).to(DEV)
    a1 = torch.ones(E, device=DEV)
    r = routing("topk", M, E, g)
    y_on = densemoe.fc1(x, w1, a1, routing=r, skip=True, out_dtype=torch.float32)
    y_off = densemoe.fc1(x, w1, a1, routing=r, skip=False, out_dtype=torch.float32)
    assert rel(y_on, y_off) <= 1e-6 and (y_off[(r == 0).repeat_interleave(I, 1)] == 0).all()
    with pytest.raises(ValueError, match="needs routing"):
        densemoe.fc1(x, w1, a1, skip=True)
    with pytest.raises(ValueError, match="persistent"):
        densemoe.fc1(x, w1, a1, routing=r, skip=True, config=Fc1TritonConfig(16, 16, 32, 4, 2))
    with pytest.raises(ValueError, match="routing has shape"):
        densemoe.fc1(x, w1, a1, routing=r[:, :2])
    with pytest.raises(TypeError, match="routing"):
        densemoe.fc1(x, w1, a1, routing=r.to(torch.int32))
    with pytest.raises(TypeError, match="skip must be"):
        densemoe.fc1(x, w1, a1, routing=r, skip="yes")
    with pytest.raises(ValueError, match="Triton"):
        densemoe.fc1(x, w1, a1, routing=r, skip=True, backend="cute")
    a = torch.randn(M, E * I, generator=g).to(BF16).to(DEV)
    w = torch.randn(48, E * I, generator=g).to(BF16).to(DEV)
    o_on = densemoe.fc2(a, w, r, skip=True, out_dtype=torch.float32)
    o_off = densemoe.fc2(a, w, r, skip=False, out_dtype=torch.float32)
    assert rel(o_on, o_off) <= 1e-6
    with pytest.raises(ValueError, match="Triton"):
        densemoe.fc2(a, w, r, skip=True, backend="cute")
    with pytest.raises(TypeError, match="skip must be"):
        densemoe.fc2(a, w, r, skip=1.5)
    # the rule behind skip=None
    from densemoe.ops.strategy import skip_by_default
    assert skip_by_default(1, 256) and skip_by_default(64, 256) and not skip_by_default(65, 256)
    assert skip_by_default(31, 128) and not skip_by_default(32, 128)  # Qwen3-30B-A3B: 128 experts
    assert skip_by_default(4, 8, top_k=2) and not skip_by_default(4, 8)  # Mixtral's top-2 vs the top-8 default


@needs_kernel
@pytest.mark.interpreter
def test_fc1_custom_op_opcheck_with_routing():
    M, E, I, H = 3, 2, 32, 64
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, H, generator=g).to(BF16).to(DEV)
    w1 = (torch.randn(2 * E * I, H, generator=g) * H ** -0.5).to(BF16).to(DEV)
    a1 = torch.ones(E, device=DEV)
    r = routing("topk", M, E, g, 1)
    out = torch.empty(M, E * I, dtype=torch.float32, device=DEV)
    for skip in (False, True):
        torch.library.opcheck(torch.ops.densemoe.fc1.default, (x, w1, a1, None, None, None, r, out, "", "auto", skip))
    ids = r[0].nonzero().reshape(-1)  # one token with its top-1 id
    out1 = torch.empty(1, E * I, dtype=torch.float32, device=DEV)
    torch.library.opcheck(torch.ops.densemoe.fc1.default,
                          (x[:1], w1, a1, None, None, None, r[:1], out1, "", "auto", True, False, ids))
    a = torch.randn(1, E * I, generator=g).to(BF16).to(DEV)
    w = torch.randn(48, E * I, generator=g).to(BF16).to(DEV)
    o = torch.empty(1, 48, dtype=torch.float32, device=DEV)
    torch.library.opcheck(torch.ops.densemoe.fc2.default, (a, w, r[:1], o, "", "auto", True, None, ids))


@needs_kernel
@pytest.mark.interpreter
def test_layer_compiles_fullgraph_with_skipping():
    from densemoe.weights import prepare_weights

    E, I, H, M = 4, 32, 64, 3
    g = torch.Generator().manual_seed(11)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(BF16).to(DEV)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(BF16).to(DEV)
    prepared = prepare_weights(w13, w2, dtype="bf16")
    x = torch.randn(M, H, generator=g).to(BF16).to(DEV)
    alpha = routing("topk", M, E, g, 1)
    torch._dynamo.reset()
    f = torch.compile(lambda x, a: densemoe.experts_forward(x, prepared, a, skip=True), fullgraph=True,
                      backend="aot_eager")
    assert rel(f(x, alpha), densemoe.experts_forward(x, prepared, alpha, skip=True)) == 0
    # one token with its top-k ids (DenseMoE's M = 1 path)
    ids = alpha[:1].nonzero()[:, 1]
    f1 = torch.compile(lambda x, a, i: densemoe.experts_forward(x, prepared, a, skip=True, expert_ids=i),
                       fullgraph=True, backend="aot_eager")
    assert rel(f1(x[:1], alpha[:1], ids), densemoe.experts_forward(x[:1], prepared, alpha[:1], skip=True,
                                                                 expert_ids=ids)) == 0


# --------------------------------------------------------------------------------------------
# GPU: model shapes with real routing, graph capture with routing that changes.
# --------------------------------------------------------------------------------------------


def _model_case(shape, M, seed, hot=False):
    from densemoe.shapes import SHAPES

    s = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(seed)
    E, I, H = s.experts, s.inter, s.hidden
    w13 = torch.randn(E, 2 * I, H, device="cuda", generator=g, dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E, H, I, device="cuda", generator=g, dtype=torch.bfloat16) * I ** -0.5
    x = torch.randn(M, H, device="cuda", generator=g, dtype=torch.bfloat16)
    logits = torch.randn(M, E, device="cuda", generator=g)
    if hot:  # skewed: 16 hot experts take most picks
        logits[:, :16] += 3.0
    return w13, w2, x, logits, s.topk


@gpu_test
@pytest.mark.parametrize("shape", ["deepseek-v3-tp8", "qwen3-30b-a3b"])
@pytest.mark.parametrize("M", [1, 4, 64, 100])
@pytest.mark.parametrize("hot", [False, True], ids=["uniform", "skewed"])
def test_layer_skip_on_model_shapes(shape, M, hot):
    from densemoe.reference import experts_ref
    from densemoe.routing import softmax_topk
    from densemoe.weights import prepare_weights

    w13, w2, x, logits, k = _model_case(shape, M, M + 17 * hot, hot)
    alpha = softmax_topk(logits, k, renormalize=True).alpha
    ref = experts_ref(x, w13, w2, alpha, compute_dtype=torch.float32, experts_per_chunk=16)
    for dt, bound in (("fp8", 0.1), ("bf16", 1e-2)):
        p = prepare_weights(w13, w2, dtype=dt)
        on = densemoe.experts_forward(x, p, alpha, skip=True)
        off = densemoe.experts_forward(x, p, alpha, skip=False)
        assert rel(on, ref) <= 1.02 * rel(off, ref) + 1e-5 and rel(on, ref) < bound, (dt, rel(on, ref), rel(off, ref))
        del p


@gpu_test
@pytest.mark.parametrize("M", [1, 7, 64])
@pytest.mark.parametrize("dtype", [FP8, BF16], ids=["fp8", "bf16"])
def test_fc1_fc2_skip_on_model_shape(M, dtype):
    """FC1 and FC2 alone with skipping, on DeepSeek-V3 TP8 with real routing: NaN-poisoned
    outputs, NaN in FC2's unrouted segments, against fp32 references."""
    from densemoe.routing import softmax_topk
    from densemoe.shapes import SHAPES

    s = SHAPES["deepseek-v3-tp8"]
    E, I, H = s.experts, s.inter, s.hidden
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, H, device="cuda", generator=g).to(dtype)
    w1 = (torch.randn(2 * E * I, H, device="cuda", generator=g) * H ** -0.5).to(dtype)
    a1 = torch.rand(E, device="cuda", generator=g) + 0.5
    r = softmax_topk(torch.randn(M, E, device="cuda", generator=g), s.topk, renormalize=True).alpha
    y = torch.full((M, E * I), float("nan"), dtype=BF16, device="cuda")
    densemoe.fc1(x, w1, a1, routing=r, skip=True, out=y)
    mask = (r != 0).float().repeat_interleave(I, dim=1)
    ref = fc1_ref(x, w1, a1, out_dtype=torch.float32, compute_dtype=torch.float32) * mask
    assert not torch.isnan(y).any() and (y[mask == 0] == 0).all()
    assert rel(y, ref) <= 2 * rel(ref.to(BF16), ref) + 1e-5
    del w1, ref
    a = torch.randn(M, E * I, device="cuda", generator=g).to(dtype)
    w = (torch.randn(H, E * I, device="cuda", generator=g) * (E * I) ** -0.5).to(dtype)
    a_nan = a.clone()
    if dtype == FP8:  # 0x7F is NaN in e4m3fn (which has no masked_fill)
        a_nan.view(torch.uint8)[mask == 0] = 0x7F
    else:
        a_nan[mask == 0] = float("nan")
    assert torch.isnan(a_nan.float()[mask == 0]).all()
    out = torch.full((M, H), float("nan"), dtype=torch.float32, device="cuda")
    densemoe.fc2(a_nan, w, r, skip=True, out=out)
    ref2 = fc2_ref(a, w, r, out_dtype=torch.float32, compute_dtype=torch.float32)
    assert not torch.isnan(out).any() and rel(out, ref2) <= 1e-4


@gpu_test
def test_fc2_split_tiles_bf16_out_interleaved():
    """FC2 with skipping at M = 4 (two programs per column tile meeting in the reused
    workspace), a bf16 output, with other launches in between: every call must match the
    unsplit schedule. (Before the barrier after the out store, the H100 wrote zeros into rows
    2-3 of a tile in about one call of six.)"""
    import dataclasses

    from densemoe.kernels.common import Fc2Problem
    from densemoe.ops.fc2_configs import default_skip_config
    from densemoe.routing import softmax_topk

    w13, w2, x, logits, k = _model_case("deepseek-v3-tp8", 4, 4)
    from densemoe.weights import prepare_weights
    p = prepare_weights(w13, w2, dtype="bf16")
    alpha = softmax_topk(logits, k, renormalize=True).alpha
    y = densemoe.fc1(x, p.w1, p.alpha1, routing=alpha, skip=True, fill_unpicked=False)
    cfg = default_skip_config(Fc2Problem(4, x.shape[1], alpha.shape[1], y.shape[1] // alpha.shape[1], BF16, BF16))
    assert cfg.split == 2
    ref = torch.empty(4, x.shape[1], dtype=torch.float32, device="cuda")
    fc2_triton(y, p.w2, alpha, ref, dataclasses.replace(cfg, split=1), skip=True, w_scale=p.w2_scale)
    for _ in range(24):
        out = torch.full((4, x.shape[1]), float("nan"), dtype=BF16, device="cuda")
        fc2_triton(y, p.w2, alpha, out, cfg, skip=True, w_scale=p.w2_scale)
        densemoe.experts_forward(x, p, alpha, skip=True)  # other launches, other buffers in between
        assert rel(out, ref) <= 2 * rel(ref.to(BF16), ref) + 1e-6


@gpu_test
@pytest.mark.parametrize("M,ids", [(1, False), (1, True), (4, False)],
                         ids=["M1", "M1-expert_ids", "M4"])  # M = 1: FC1 splits k (workspace zeroed in the graph)
def test_layer_graph_capture_with_skipping_and_changing_routing(M, ids):
    """One captured graph, replayed with routing that changes between replays, including a
    replay where no token picks anything (alpha = 0: the output must be exactly 0). ``ids``: FC1
    and FC2 walk the router's top-k ids (what DenseMoE does at M = 1)."""
    from densemoe.reference import experts_ref
    from densemoe.routing import softmax_topk
    from densemoe.weights import prepare_weights

    w13, w2, x, logits, k = _model_case("deepseek-v3-tp8", M, 3)
    prepared = prepare_weights(w13, w2, dtype="fp8")
    static_x, static_logits = x.clone(), logits.clone()
    scale = torch.ones((), device="cuda")

    def step():
        route = softmax_topk(static_logits, k, renormalize=True)
        return densemoe.experts_forward(static_x, prepared, route.alpha * scale, skip=True,
                                        expert_ids=route.topk_ids if ids else None)
    graph, out = capture(step)  # warm-up on a side stream, then the capture
    for seed in (5, 6, 7):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        static_x.copy_(torch.randn(x.shape, device="cuda", generator=gen))
        static_logits.copy_(torch.randn(logits.shape, device="cuda", generator=gen) + (3.0 if seed == 7 else 0.0)
                            * (torch.arange(logits.shape[1], device="cuda") < 16))
        graph.replay()
        route = softmax_topk(static_logits, k, renormalize=True)
        alpha = route.alpha
        assert rel(out, experts_ref(static_x, w13, w2, alpha, compute_dtype=torch.float32,
                                    experts_per_chunk=16)) < 0.1
        # the replay against the same call made eagerly (split sums may add in another order,
        # which can move a value of y across an fp8 rounding boundary: not bit for bit)
        assert rel(out, densemoe.experts_forward(static_x, prepared, alpha, skip=True,
                                                 expert_ids=route.topk_ids if ids else None)) < 1e-2
    scale.zero_()
    graph.replay()
    assert (out == 0).all()


@needs_kernel
@pytest.mark.interpreter
def test_fc1_without_zero_fill_leaves_unpicked_experts_unwritten(request):
    """fill_unpicked=False (what the layer asks for): the picked segments are right, the
    segments of experts no token of the tile picked keep what the buffer held."""
    M, E, I, H = 5, 6, 32, 48
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    x = torch.randn(M, H, generator=g).to(BF16).to(DEV)
    w1 = (torch.randn(2 * E * I, H, generator=g) * H ** -0.5).to(BF16).to(DEV)
    a1 = torch.ones(E, device=DEV)
    r = routing("one_expert", M, E, g)  # only expert E-2
    y = torch.full((M, E * I), float("nan"), device=DEV)
    densemoe.fc1(x, w1, a1, routing=r, skip=True, fill_unpicked=False, out=y)
    seg = slice((E - 2) * I, (E - 1) * I)
    ref = fc1_ref(x, w1, a1, out_dtype=torch.float64)
    assert rel(y[:, seg], ref[:, seg]) <= 1e-5
    assert torch.isnan(y[:, : (E - 2) * I]).all() and torch.isnan(y[:, (E - 1) * I:]).all()
