"""densemoe.routing: the routers against their loop twins, against Hugging Face transformers' own
router modules (tiny configs, CPU), alpha's layout, the argument checks and torch.compile.

The loop-twin comparisons here pin impl="torch"; tests/test_routing_kernels.py holds the fused
kernels (impl="triton") to the same twins and to the torch path. The transformers comparisons
run both impl="torch" and impl="auto" (the kernel, through Triton's interpreter on the CPU)."""

import pytest
import torch

from _helpers import seed_of
from densemoe import routing
from densemoe.reference import alpha_from_topk_ref, deepseek_v3_topk_ref, softmax_topk_ref
from densemoe.routing import RouterOutput, alpha_from_topk, deepseek_v3_topk, softmax_topk


def gen_for(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(*parts))


def rand_logits(M: int, E: int, g: torch.Generator, scale: float = 2.0) -> torch.Tensor:
    """[M, E] float32 logits with no two equal entries in a row (so the top-k is unambiguous)."""
    for _ in range(10):
        x = torch.randn(M, E, generator=g) * scale
        s = x.sort(dim=1).values
        if (s[:, 1:] > s[:, :-1]).all():
            return x
    raise AssertionError("ties in random logits")


def by_id(ids: torch.Tensor, w: torch.Tensor):
    """Sort each row's slots by expert id: (ids, weights) comparable whatever the slot order."""
    order = ids.argsort(dim=1)
    return ids.gather(1, order), w.gather(1, order)


def check_layout(out: RouterOutput, M: int, E: int, k: int) -> None:
    """Types, shapes, and alpha = the scatter of (ids, weights): 0 elsewhere, k picks per row."""
    assert isinstance(out, RouterOutput)
    assert out.alpha.shape == (M, E) and out.alpha.dtype == torch.float32
    assert out.topk_ids.shape == (M, k) and out.topk_ids.dtype == torch.int64
    assert out.topk_weights.shape == (M, k) and out.topk_weights.dtype == torch.float32
    assert ((out.topk_ids >= 0) & (out.topk_ids < E)).all()
    assert (out.topk_ids.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct within a row
    picked = torch.zeros(M, E, dtype=torch.bool).scatter(1, out.topk_ids, True)
    assert (out.alpha[~picked] == 0).all()
    assert torch.equal(out.alpha.gather(1, out.topk_ids), out.topk_weights)
    assert (out.topk_weights > 0).all()


def assert_same_routing(out: RouterOutput, ids: torch.Tensor, w: torch.Tensor, E: int,
                        rtol: float, atol: float) -> None:
    """Same expert set per row, same weight per expert, and alpha = scatter(ids, w)."""
    oi, ow = by_id(out.topk_ids, out.topk_weights)
    ri, rw = by_id(ids.long(), w.float())
    assert torch.equal(oi, ri)
    torch.testing.assert_close(ow, rw, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.alpha, alpha_from_topk_ref(ids, w, E), rtol=rtol, atol=atol)
    torch.testing.assert_close(out.alpha.sum(dim=1), w.float().sum(dim=1), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# against the loop twins

SOFTMAX_SHAPES = [  # (M, E, k)
    (1, 8, 2),
    (1, 4, 4),
    (7, 16, 4),
    (7, 5, 1),
    (7, 60, 4),
    (100, 64, 8),
    (100, 128, 8),
]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("M,E,k", SOFTMAX_SHAPES)
def test_softmax_topk_matches_ref(M, E, k, renormalize):
    x = rand_logits(M, E, gen_for("softmax", M, E, k, renormalize))
    out = softmax_topk(x, k, renormalize=renormalize, impl="torch")
    ref = softmax_topk_ref(x, k, renormalize=renormalize)
    check_layout(out, M, E, k)
    # both put the slots in descending weight
    assert torch.equal(out.topk_ids, ref.topk_ids)
    torch.testing.assert_close(out.topk_weights, ref.topk_weights, rtol=2e-6, atol=1e-8)
    torch.testing.assert_close(out.alpha, ref.alpha, rtol=2e-6, atol=1e-8)
    sums = out.alpha.sum(dim=1)
    if renormalize:
        torch.testing.assert_close(sums, torch.ones(M), rtol=2e-6, atol=0)
    else:
        top = torch.softmax(x.double(), dim=1).topk(k, dim=1).values.sum(dim=1).float()
        torch.testing.assert_close(sums, top, rtol=2e-6, atol=1e-8)
        if k == E:
            torch.testing.assert_close(sums, torch.ones(M), rtol=2e-6, atol=0)


def test_softmax_topk_low_precision_logits():
    """bf16/fp16/fp64 logits: softmax of their float32 values, weights float32."""
    x = rand_logits(7, 16, gen_for("softmax_lowp"))
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        xd = x.to(dt)
        out = softmax_topk(xd, 3, renormalize=False)
        check_layout(out, 7, 16, 3)
        ref = softmax_topk(xd.float(), 3, renormalize=False)
        assert torch.equal(out.topk_ids, ref.topk_ids)
        assert torch.equal(out.topk_weights, ref.topk_weights)


DEEPSEEK_SHAPES = [  # (M, E, n_group, topk_group, k)
    (1, 16, 4, 2, 4),
    (7, 16, 4, 2, 8),      # k = every expert of the kept groups
    (7, 8, 4, 1, 2),       # groups of 2: the group score is the whole group
    (7, 8, 1, 1, 3),       # one group: plain sigmoid top-k
    (100, 32, 8, 8, 6),    # every group kept
    (100, 64, 8, 4, 8),
    (100, 256, 8, 4, 8),   # DeepSeek-V3's own layout
]


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("M,E,n_group,topk_group,k", DEEPSEEK_SHAPES)
def test_deepseek_v3_topk_matches_ref(M, E, n_group, topk_group, k, with_bias, norm):
    g = gen_for("deepseek", M, E, n_group, topk_group, k, with_bias, norm)
    x = rand_logits(M, E, g)
    bias = torch.randn(E, generator=g) * 0.3 if with_bias else None
    scale = 2.5 if norm else 1.75
    kw = dict(n_group=n_group, topk_group=topk_group, e_score_correction_bias=bias,
              routed_scaling_factor=scale, norm_topk_prob=norm)
    out = deepseek_v3_topk(x, k, **kw, impl="torch")
    ref = deepseek_v3_topk_ref(x, k, **kw)
    check_layout(out, M, E, k)
    assert_same_routing(out, ref.topk_ids, ref.topk_weights, E, rtol=2e-6, atol=1e-8)
    # the picked experts lie in at most topk_group groups
    groups_hit = torch.zeros(M, n_group).scatter(1, out.topk_ids // (E // n_group), 1.0).sum(dim=1)
    assert (groups_hit <= topk_group).all()
    if M == 100 and topk_group < n_group:  # the group restriction changes some picks
        plain = (torch.sigmoid(x) + (0 if bias is None else bias)).topk(k, dim=1).indices
        assert not torch.equal(plain.sort(dim=1).values, out.topk_ids.sort(dim=1).values)
    # weights are the unbiased sigmoid scores (times the scale, after the optional normalisation)
    s = torch.sigmoid(x.double()).gather(1, out.topk_ids)
    expect = (s / s.sum(dim=1, keepdim=True) if norm else s) * scale
    torch.testing.assert_close(out.topk_weights.double(), expect, rtol=2e-6, atol=1e-8)
    sums = out.alpha.sum(dim=1)
    if norm:
        torch.testing.assert_close(sums, torch.full((M,), scale), rtol=2e-6, atol=0)


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_deepseek_bias_steers_choice_not_weight(impl):
    """A large bias on one expert makes every token pick it, with its unbiased score as weight
    (torch: bit for bit; the kernel's sigmoid: within a few ulps)."""
    g = gen_for("deepseek_bias")
    x = rand_logits(20, 16, g)
    bias = torch.zeros(16)
    bias[5] = 10.0
    out = deepseek_v3_topk(x, 4, n_group=4, topk_group=2, e_score_correction_bias=bias,
                           routed_scaling_factor=1.0, norm_topk_prob=False, impl=impl)
    assert (out.topk_ids == 5).any(dim=1).all()
    rtol = 0 if impl == "torch" else 1e-6
    torch.testing.assert_close(out.alpha[:, 5], torch.sigmoid(x)[:, 5], rtol=rtol, atol=0)


# ----------------------------------------------------------------------------------------------
# against Hugging Face transformers' router modules (tiny configs, CPU)


def assert_same_slots_up_to_ties(out: RouterOutput, hf_ids: torch.Tensor, hf_w: torch.Tensor,
                                 probs: torch.Tensor, rtol: float) -> None:
    """Slot for slot the same probability (so the same experts, save for exactly tied ones,
    which bf16 logits make common and torch.topk orders its own way) and the same weight."""
    assert torch.equal(probs.gather(1, out.topk_ids), probs.gather(1, hf_ids.long()))
    torch.testing.assert_close(out.topk_weights, hf_w.float(), rtol=rtol, atol=0)
    same = (out.topk_ids == hf_ids).all(dim=1)
    torch.testing.assert_close(out.alpha[same], alpha_from_topk_ref(hf_ids, hf_w, out.alpha.shape[1])[same],
                               rtol=rtol, atol=0)


def _init_router(router: torch.nn.Module, g: torch.Generator, dtype=torch.float32):
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 0.5)
    return router.to(dtype)


@pytest.mark.parametrize("impl", ["torch", "auto"])
@pytest.mark.parametrize("M", [1, 7, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_softmax_topk_matches_hf_mixtral(M, dtype, impl):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, vocab_size=64)
    g = gen_for("mixtral", M, dtype)
    router = _init_router(MixtralTopKRouter(cfg), g, dtype)
    hidden = torch.randn(M, 32, generator=g).to(dtype)
    with torch.no_grad():
        logits, hf_w, hf_ids = router(hidden)
    assert hf_w.dtype == torch.float32  # Mixtral keeps its weights in float32
    out = softmax_topk(logits, cfg.num_experts_per_tok, renormalize=True, impl=impl)
    check_layout(out, M, 8, 2)
    torch.testing.assert_close(out.alpha.sum(dim=1), torch.ones(M), rtol=1e-6, atol=0)
    if impl == "torch":
        assert torch.equal(out.topk_ids, hf_ids)  # both sorted by descending weight
        torch.testing.assert_close(out.topk_weights, hf_w, rtol=1e-6, atol=0)
        assert_same_routing(out, hf_ids, hf_w, 8, rtol=1e-6, atol=0)
    else:  # the kernel: ties (bf16 logits) go to the lowest index
        assert_same_slots_up_to_ties(out, hf_ids, hf_w, torch.softmax(logits.float(), dim=1), rtol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "auto"])
@pytest.mark.parametrize("M", [1, 7, 100])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_softmax_topk_matches_hf_qwen3_moe(M, norm, dtype, impl):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = Qwen3MoeConfig(hidden_size=32, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
                         intermediate_size=32, norm_topk_prob=norm, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=64)
    g = gen_for("qwen3_moe", M, norm, dtype)
    router = _init_router(Qwen3MoeTopKRouter(cfg), g, dtype)
    hidden = torch.randn(M, 32, generator=g).to(dtype)
    with torch.no_grad():
        logits, hf_w, hf_ids = router(hidden)
    # Qwen3-MoE casts the weights back to the logits' (hidden) dtype; we keep float32
    assert hf_w.dtype == dtype
    out = softmax_topk(logits, cfg.num_experts_per_tok, renormalize=cfg.norm_topk_prob, impl=impl)
    check_layout(out, M, 16, 4)
    if impl == "torch":
        assert torch.equal(out.topk_ids, hf_ids)
    else:  # the kernel: ties (bf16 logits) go to the lowest index; the same probabilities slot for slot
        probs = torch.softmax(logits.float(), dim=1)
        assert torch.equal(probs.gather(1, out.topk_ids), probs.gather(1, hf_ids))
    if dtype == torch.float32:
        torch.testing.assert_close(out.topk_weights, hf_w, rtol=1e-6, atol=0)
        assert_same_routing(out, hf_ids, hf_w, 16, rtol=1e-6, atol=0)
    else:
        # one rounding of our float32 weights gives HF's bf16 ones
        torch.testing.assert_close(out.topk_weights.to(dtype), hf_w, rtol=0, atol=0)
    probs = torch.softmax(logits.float(), dim=1)
    expect_sum = torch.ones(M) if norm else probs.topk(4, dim=1).values.sum(dim=1)
    torch.testing.assert_close(out.alpha.sum(dim=1), expect_sum, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", ["torch", "auto"])
@pytest.mark.parametrize("M", [1, 7, 100])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deepseek_v3_topk_matches_hf(M, norm, hidden_dtype, impl):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                           n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                           routed_scaling_factor=2.5, norm_topk_prob=norm, n_shared_experts=1,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                           vocab_size=64, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=8)
    g = gen_for("deepseek_hf", M, norm, hidden_dtype)
    router = _init_router(DeepseekV3TopkRouter(cfg), g)
    bias = torch.randn(16, generator=g) * 0.3
    with torch.no_grad():
        router.e_score_correction_bias.copy_(bias)
    hidden = torch.randn(M, 32, generator=g).to(hidden_dtype)
    with torch.no_grad():
        logits, hf_w, hf_ids = router(hidden)
    assert logits.dtype == torch.float32 and hf_w.dtype == torch.float32
    out = deepseek_v3_topk(logits, cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
                           e_score_correction_bias=bias, routed_scaling_factor=cfg.routed_scaling_factor,
                           norm_topk_prob=cfg.norm_topk_prob, impl=impl)
    check_layout(out, M, 16, 4)
    assert_same_routing(out, hf_ids, hf_w, 16, rtol=1e-6, atol=0)
    if M == 100:  # the bias changes some picks
        unbiased = deepseek_v3_topk(logits, 4, n_group=4, topk_group=2, e_score_correction_bias=None,
                                    routed_scaling_factor=2.5, norm_topk_prob=norm, impl="torch")
        assert not torch.equal(unbiased.topk_ids.sort(dim=1).values, out.topk_ids.sort(dim=1).values)
    if impl == "torch" or routing._kernel_blocker(logits, 16, 4, bias) is not None:  # auto = torch here
        # the same calls in the same order: the same slot order and bit-identical weights
        assert torch.equal(out.topk_ids, hf_ids)
        assert torch.equal(out.topk_weights, hf_w)
    else:
        # the kernel's slots: descending biased score
        choice = torch.sigmoid(logits.double()) + bias.double()
        assert (choice.gather(1, out.topk_ids).diff(dim=1) < 0).all()
    if norm:
        torch.testing.assert_close(out.alpha.sum(dim=1), torch.full((M,), 2.5), rtol=1e-6, atol=0)
    else:
        expect = torch.sigmoid(logits).gather(1, hf_ids.long()).sum(dim=1) * 2.5
        torch.testing.assert_close(out.alpha.sum(dim=1), expect, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# alpha_from_topk


@pytest.mark.parametrize("M,E,k", [(1, 8, 2), (7, 16, 16), (100, 64, 6), (0, 8, 2)])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_alpha_from_topk_round_trip(M, E, k, ids_dtype, w_dtype):
    g = gen_for("alpha", M, E, k, ids_dtype, w_dtype)
    ids = torch.rand(M, E, generator=g).argsort(dim=1)[:, :k].to(ids_dtype)
    w = (torch.rand(M, k, generator=g) + 0.1).to(w_dtype)
    alpha = alpha_from_topk(ids, w, E)
    assert alpha.shape == (M, E) and alpha.dtype == torch.float32
    assert torch.equal(alpha, alpha_from_topk_ref(ids, w, E))
    assert torch.equal(alpha.gather(1, ids.long()), w.float())
    picked = torch.zeros(M, E, dtype=torch.bool).scatter(1, ids.long(), True)
    assert (alpha[~picked] == 0).all() and (alpha[picked] > 0).all()
    assert ((alpha != 0).sum(dim=1) == k).all()
    # and back: the k largest entries of a row are the picked experts
    if M:
        back_w, back_ids = alpha.topk(k, dim=1)
        bi, bw = by_id(back_ids, back_w)
        ri, rw = by_id(ids.long(), w.float())
        assert torch.equal(bi, ri) and torch.equal(bw, rw)


def test_router_alpha_equals_alpha_from_topk():
    g = gen_for("router_alpha")
    x = rand_logits(9, 32, g)
    for out in (softmax_topk(x, 5, renormalize=True),
                deepseek_v3_topk(x, 5, n_group=4, topk_group=2, e_score_correction_bias=None,
                                 routed_scaling_factor=2.0, norm_topk_prob=True)):
        assert torch.equal(out.alpha, alpha_from_topk(out.topk_ids, out.topk_weights, 32))
        alpha, ids, w = out  # unpacks
        assert alpha is out.alpha and ids is out.topk_ids and w is out.topk_weights


# ----------------------------------------------------------------------------------------------
# argument checks: each error names the argument

_X = torch.randn(4, 16)
_DS = dict(n_group=4, topk_group=2, e_score_correction_bias=None, routed_scaling_factor=2.5,
           norm_topk_prob=True)


def _ds(x=_X, k=4, **over):
    return lambda: deepseek_v3_topk(x, k, **{**_DS, **over})


BAD_CALLS = [
    # (id, call, exception, argument named in the message)
    ("sm_logits_1d", lambda: softmax_topk(torch.randn(16), 2, renormalize=True), ValueError, "router_logits"),
    ("sm_logits_3d", lambda: softmax_topk(torch.randn(2, 3, 16), 2, renormalize=True), ValueError, "router_logits"),
    ("sm_logits_int", lambda: softmax_topk(torch.ones(4, 16, dtype=torch.int64), 2, renormalize=True),
     TypeError, "router_logits"),
    ("sm_logits_list", lambda: softmax_topk([[1.0, 2.0]], 1, renormalize=True), TypeError, "router_logits"),
    ("sm_logits_no_experts", lambda: softmax_topk(torch.randn(4, 0), 1, renormalize=True), ValueError,
     "router_logits"),
    ("sm_top_k_0", lambda: softmax_topk(_X, 0, renormalize=True), ValueError, "top_k"),
    ("sm_top_k_big", lambda: softmax_topk(_X, 17, renormalize=True), ValueError, "top_k"),
    ("sm_top_k_float", lambda: softmax_topk(_X, 2.0, renormalize=True), TypeError, "top_k"),
    ("sm_top_k_bool", lambda: softmax_topk(_X, True, renormalize=True), TypeError, "top_k"),
    ("sm_renormalize", lambda: softmax_topk(_X, 2, renormalize=1), TypeError, "renormalize"),
    ("ds_logits_1d", _ds(x=torch.randn(16)), ValueError, "router_logits"),
    ("ds_logits_int", _ds(x=torch.ones(4, 16, dtype=torch.int32)), TypeError, "router_logits"),
    ("ds_top_k_0", _ds(k=0), ValueError, "top_k"),
    ("ds_top_k_big", _ds(k=17), ValueError, "top_k"),
    ("ds_top_k_over_groups", _ds(k=9), ValueError, "top_k"),
    ("ds_n_group_not_divisor", _ds(n_group=3), ValueError, "n_group"),
    ("ds_n_group_0", _ds(n_group=0), ValueError, "n_group"),
    ("ds_n_group_groups_of_1", _ds(n_group=16, topk_group=4), ValueError, "n_group"),
    ("ds_n_group_float", _ds(n_group=4.0), TypeError, "n_group"),
    ("ds_topk_group_0", _ds(topk_group=0), ValueError, "topk_group"),
    ("ds_topk_group_big", _ds(topk_group=5), ValueError, "topk_group"),
    ("ds_bias_shape", _ds(e_score_correction_bias=torch.randn(8)), ValueError, "e_score_correction_bias"),
    ("ds_bias_2d", _ds(e_score_correction_bias=torch.randn(1, 16)), ValueError, "e_score_correction_bias"),
    ("ds_bias_int", _ds(e_score_correction_bias=torch.ones(16, dtype=torch.int64)), TypeError,
     "e_score_correction_bias"),
    ("ds_scale_tensor", _ds(routed_scaling_factor=torch.tensor(2.5)), TypeError, "routed_scaling_factor"),
    ("ds_norm", _ds(norm_topk_prob=None), TypeError, "norm_topk_prob"),
    ("alpha_ids_float", lambda: alpha_from_topk(torch.zeros(4, 2), torch.rand(4, 2), 8), TypeError, "topk_ids"),
    ("alpha_ids_1d", lambda: alpha_from_topk(torch.zeros(4, dtype=torch.int64), torch.rand(4), 8), ValueError,
     "topk_ids"),
    ("alpha_w_int", lambda: alpha_from_topk(torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, 2, dtype=torch.int64),
                                            8), TypeError, "topk_weights"),
    ("alpha_w_shape", lambda: alpha_from_topk(torch.zeros(4, 2, dtype=torch.int64), torch.rand(4, 3), 8), ValueError,
     "topk_weights"),
    ("alpha_num_experts_small", lambda: alpha_from_topk(torch.zeros(4, 3, dtype=torch.int64), torch.rand(4, 3), 2),
     ValueError, "num_experts"),
    ("alpha_num_experts_float", lambda: alpha_from_topk(torch.zeros(4, 2, dtype=torch.int64), torch.rand(4, 2), 8.0),
     TypeError, "num_experts"),
]


@pytest.mark.parametrize("call,exc,arg", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_validation_names_argument(call, exc, arg):
    with pytest.raises(exc, match=rf"\b{arg}\b"):
        call()


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph breaks, so no host sync (.item(), nonzero, ...)


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_routers_compile_fullgraph(impl):
    torch._dynamo.reset()
    g = gen_for("compile")
    x = rand_logits(7, 16, g)
    bias = torch.randn(16, generator=g) * 0.3

    @torch.compile(fullgraph=True)
    def route(x, bias):
        a = softmax_topk(x, 4, renormalize=True, impl=impl)
        b = deepseek_v3_topk(x, 4, n_group=4, topk_group=2, e_score_correction_bias=bias,
                             routed_scaling_factor=2.5, norm_topk_prob=True, impl=impl)
        return a, b, alpha_from_topk(a.topk_ids, a.topk_weights, 16)

    ca, cb, calpha = route(x, bias)
    ea = softmax_topk(x, 4, renormalize=True, impl=impl)
    eb = deepseek_v3_topk(x, 4, n_group=4, topk_group=2, e_score_correction_bias=bias,
                          routed_scaling_factor=2.5, norm_topk_prob=True, impl=impl)
    for c, e in ((ca, ea), (cb, eb)):
        assert isinstance(c, RouterOutput)
        check_layout(c, 7, 16, 4)
        assert_same_routing(c, e.topk_ids, e.topk_weights, 16, rtol=1e-6, atol=0)
    torch.testing.assert_close(calpha, ea.alpha, rtol=1e-6, atol=0)  # inductor's softmax: ulps
    torch._dynamo.reset()
