"""Bad input at the public entry points (issue 21): each case is one row of docs/trust.md's table
of checks. Every row asserts the exception type and that the message names the entry point and
the argument; none may pass silently or fail inside a kernel."""

from __future__ import annotations

import pytest
import torch

import densemoe
from densemoe import DenseMoE, experts_forward, fc1, fc2, fused_experts, prepare_weights
from densemoe.ops.routed import moe_schedule, routed_experts
from densemoe.parallel import Shard, shard_weights, sharded_experts
from densemoe.quant import FP8, quantize_per_token
from densemoe.routing import alpha_from_topk, router_logits, softmax_topk

BF16 = torch.bfloat16
E, I, H, K, M = 8, 32, 64, 2, 5


def _inputs():
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.1
    w2 = torch.randn(E, H, I, generator=g) * 0.1
    x = torch.randn(M, H, generator=g).to(BF16)
    ids = torch.rand(M, E, generator=g).topk(K, dim=1).indices
    wts = torch.softmax(torch.randn(M, K, generator=g), dim=1)
    return w13, w2, x, ids, wts


W13, W2, X, IDS, WTS = _inputs()
PW = prepare_weights(W13, W2, dtype="fp8")
PB = prepare_weights(W13, W2, dtype="bf16")
ALPHA = torch.zeros(M, E).scatter_(1, IDS, WTS)
GATE = torch.randn(E, H)

# (entry point, what is wrong, call, exception, regex the message must match)
CASES = [
    ("prepare_weights", "w13 not floating", lambda: prepare_weights(W13.int(), W2), TypeError,
     r"prepare_weights: w13 must have a floating dtype"),
    ("prepare_weights", "w13 not 3-D", lambda: prepare_weights(W13[0], W2), ValueError, r"prepare_weights: w13 must be a 3-D"),
    ("prepare_weights", "E differs between w13 and w2", lambda: prepare_weights(W13, W2[:-1]), ValueError,
     r"prepare_weights: w2 has shape \(7, 64, 32\), expected \(E, H, I\)"),
    ("prepare_weights", "I not a multiple of 32", lambda: prepare_weights(torch.randn(E, 32, H), torch.randn(E, H, 16)),
     ValueError, r"prepare_weights: each expert's intermediate size I must be a multiple of 32"),
    ("prepare_weights", "unknown dtype", lambda: prepare_weights(W13, W2, dtype="int8"), ValueError,
     r"prepare_weights: dtype must be one of"),
    ("prepare_weights", "fp8 weights without scales", lambda: prepare_weights(W13.to(FP8), W2.to(FP8)), ValueError,
     r"fp8 w13 needs its dequantisation scale"),
    ("experts_forward", "prepared not PreparedWeights", lambda: experts_forward(X, (W13, W2), ALPHA), TypeError,
     r"experts_forward: prepared must be the PreparedWeights"),
    ("experts_forward", "x not floating", lambda: experts_forward(X.int(), PW, ALPHA), TypeError,
     r"experts_forward: x must have a floating dtype"),
    ("experts_forward", "x 1-D", lambda: experts_forward(X[0], PW, ALPHA), ValueError, r"experts_forward: x must be a \[M, H=64\]"),
    ("experts_forward", "x's H differs from the weights'", lambda: experts_forward(torch.randn(M, H + 8), PW, ALPHA),
     ValueError, r"experts_forward: x must be a \[M, H=64\] tensor, got \(5, 72\)"),
    ("experts_forward", "alpha [M, E+1] (E differs from the weights')", lambda: experts_forward(X, PW, torch.zeros(M, E + 1)),
     ValueError, r"experts_forward: alpha must be a \[M, E\] = \[5, 8\]"),
    ("experts_forward", "alpha not floating", lambda: experts_forward(X, PW, ALPHA.int()), TypeError,
     r"experts_forward: alpha must have a floating dtype"),
    ("experts_forward", "alpha None without ids", lambda: experts_forward(X, PW, None), ValueError,
     r"experts_forward: alpha=None needs expert_ids \[M=5, k\] and topk_weights"),
    ("experts_forward", "ids not integer", lambda: experts_forward(X, PW, None, expert_ids=IDS.float(), topk_weights=WTS,
                                                                   strategy="routed"), TypeError, r"topk_ids must have an integer dtype"),
    ("experts_forward", "k > E", lambda: experts_forward(X, PW, None, expert_ids=torch.zeros(M, E + 1, dtype=torch.long),
                                                       topk_weights=torch.ones(M, E + 1)), ValueError, r"k must be in \[1, E=8\]"),
    ("experts_forward", "top_k disagrees with the ids", lambda: experts_forward(X, PW, ALPHA, expert_ids=IDS, top_k=3),
     ValueError, r"experts_forward: top_k=3 but expert_ids has k=2"),
    ("experts_forward", "unknown strategy", lambda: experts_forward(X, PW, ALPHA, strategy="fast"), ValueError,
     r"experts_forward: strategy must be None or one of"),
    ("experts_forward", "routed forced without ids", lambda: experts_forward(X, PW, ALPHA, strategy="routed"), ValueError,
     r"strategy='routed' cannot run here"),
    ("experts_forward", "x_quant with bf16 weights", lambda: experts_forward(X, PB, ALPHA, x_quant=quantize_per_token(X)),
     ValueError, r"x_quant is for fp8 weights"),
    ("experts_forward", "x requires grad (grad mode on)", lambda: experts_forward(X.float().requires_grad_(), PW, ALPHA),
     ValueError, r"experts_forward is inference-only \(no backward\): x require"),
    ("experts_forward", "topk_weights require grad", lambda: experts_forward(X, PW, None, expert_ids=IDS,
                                                                            topk_weights=WTS.clone().requires_grad_()),
     ValueError, r"inference-only \(no backward\): topk_weights"),
    ("routed_experts", "x requires grad", lambda: routed_experts(X.float().requires_grad_(), PW, IDS, WTS), ValueError,
     r"densemoe.routed_experts is inference-only"),
    ("routed_experts", "weights [M, k+1]", lambda: routed_experts(X, PW, IDS, torch.ones(M, K + 1)), ValueError,
     r"topk_weights must have topk_ids' shape"),
    ("moe_schedule", "ids 1-D", lambda: moe_schedule(IDS[0], E), ValueError, r"densemoe.moe_schedule: topk_ids must be 2-D"),
    ("moe_schedule", "E = 0", lambda: moe_schedule(IDS, 0), ValueError, r"num_experts must be a positive int"),
    ("fused_experts", "ids not integer", lambda: fused_experts(X, W13, W2, WTS, IDS.float()), TypeError,
     r"topk_ids must have an integer dtype"),
    ("fused_experts", "w1 transposed", lambda: fused_experts(X, torch.randn(E, H, 2 * 48), torch.randn(E, H, 48), WTS, IDS),
     ValueError, r"fused_experts: w1 must be \[E, 2I, H=64\].*transposed"),
    ("fused_experts", "ids and weights of other shapes", lambda: fused_experts(X, W13, W2, WTS[:, :1], IDS), ValueError,
     r"fused_experts: topk_weights and topk_ids must both be \[M, k\]"),
    ("fused_experts", "static activation scales", lambda: fused_experts(X, W13, W2, WTS, IDS, a1_scale=torch.ones(1)),
     ValueError, r"fused_experts: static activation scales"),
    ("fused_experts", "expert parallelism", lambda: fused_experts(X, W13, W2, WTS, IDS, expert_map=torch.arange(E)),
     ValueError, r"fused_experts: expert parallelism"),
    ("fused_experts", "activation other than silu", lambda: fused_experts(X, W13, W2, WTS, IDS, activation="gelu"),
     ValueError, r"fused_experts: activation='gelu' is not supported"),
    ("DenseMoE", "gate of another E", lambda: DenseMoE(PW, torch.randn(E + 1, H), K), ValueError,
     r"DenseMoE: gate_weight must be \[E, H\] = \[8, 64\]"),
    ("DenseMoE", "top_k > E", lambda: DenseMoE(PW, GATE, E + 1), ValueError, r"DenseMoE: top_k must be an int in \[1, E=8\]"),
    ("DenseMoE", "x not floating", lambda: DenseMoE(PW, GATE, K)(X.int()), TypeError, r"x must have a floating dtype"),
    ("router_logits", "weight of another H", lambda: router_logits(X, torch.randn(E, H + 1)), ValueError,
     r"router_logits: weight must be \[E, H=64\]"),
    ("softmax_topk", "top_k > E", lambda: softmax_topk(torch.randn(M, E), E + 1, renormalize=True), ValueError,
     r"softmax_topk: top_k"),
    ("softmax_topk", "logits not floating", lambda: softmax_topk(torch.zeros(M, E, dtype=torch.int32), 2, renormalize=True),
     TypeError, r"softmax_topk: router_logits must have a floating dtype"),
    ("alpha_from_topk", "weights of another shape", lambda: alpha_from_topk(IDS, WTS[:, :1], E), ValueError,
     r"alpha_from_topk: topk_weights must have the shape of topk_ids"),
    ("fc2", "a requires grad", lambda: fc2(torch.randn(M, E * I).to(BF16).requires_grad_(), PB.w2, ALPHA), ValueError,
     r"densemoe.fc2 is inference-only"),
    ("shard_weights", "E not a multiple of the expert-parallel size",
     lambda: shard_weights(W13, W2, shard=Shard(ep_rank=0, ep_size=3)), ValueError, r"shard_weights: E = 8 experts cannot be cut"),
    ("shard_weights", "I / tp not a multiple of 32", lambda: shard_weights(W13, W2, shard=Shard(tp_rank=0, tp_size=2)),
     ValueError, r"shard_weights: I / tp = 32 / 2 = 16 per rank is not a multiple of 32"),
    ("sharded_experts", "num_experts other than the shards' total",
     lambda: sharded_experts(X, PW, IDS, WTS, num_experts=E + 8), ValueError, r"sharded_experts: num_experts=16 but"),
    ("sharded_experts", "unknown reduce", lambda: sharded_experts(X, PW, IDS, WTS, num_experts=E, reduce="sum"), ValueError,
     r"sharded_experts: reduce must be one of"),
    ("sharded_experts", "prepared not PreparedWeights", lambda: sharded_experts(X, (W13, W2), IDS, WTS, num_experts=E),
     TypeError, r"sharded_experts: prepared must be the PreparedWeights"),
    ("sharded_experts", "x of another H", lambda: sharded_experts(torch.randn(M, H + 8), PW, IDS, WTS, num_experts=E),
     ValueError, r"sharded_experts: x must be a \[M, H=64\] tensor, got \(5, 72\)"),
    ("sharded_experts", "pieces 0", lambda: sharded_experts(X, PW, IDS, WTS, num_experts=E, pieces=0), ValueError,
     r"sharded_experts: pieces must be a positive int, got 0"),
    ("sharded_experts", "simulate_reduce without shard",
     lambda: sharded_experts(X, PW, IDS, WTS, num_experts=E, simulate_reduce=lambda b: None), ValueError,
     r"sharded_experts: simulate_reduce stands in for the collective of a simulated rank"),
    ("DenseMoE", "reduce_pieces past H", lambda: DenseMoE(PW, GATE, K, reduce_pieces=H + 1), ValueError,
     r"DenseMoE: reduce_pieces=65 is more than the 64 column pieces that H = 64 holds"),
    ("experts_stages", "columns past H", lambda: densemoe.experts_stages(X, PW, ALPHA)(0, H + 1), ValueError,
     r"experts_stages: output columns \[h0, h1\) = \[0, 65\) must satisfy 0 <= h0 <= h1 <= H = 64"),
    ("fc1", "x of another H", lambda: fc1(torch.randn(M, H + 8).to(BF16), PB.w1, PB.alpha1), ValueError, r"densemoe.fc1"),
]


@pytest.mark.parametrize("entry,what,call,exc,match", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_refused_by_name(entry, what, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_the_docs_table_lists_every_case():
    """docs/trust.md's table of checks has a row per case here (entry point and what is wrong),
    and the row's exception and message start are what the call raises here."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "trust.md").read_text().splitlines()
    missing, stale = [], []
    for entry, what, call, _, _ in CASES:
        row = next((line for line in doc if line.startswith(f"| `{entry}` | {what} |")), None)
        if row is None:
            missing.append(f"{entry}: {what}")
            continue
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - the row names whatever the call raises
            start = str(exc).replace("|", "\\|").replace("\n", " ")[:60]
            if f"| `{type(exc).__name__}` | {start}" not in row:
                stale.append((row, type(exc).__name__, start))
    assert not missing, missing
    assert not stale, stale


def test_no_grad_is_fine():
    with torch.no_grad():
        assert experts_forward(X.float().requires_grad_(), PW, ALPHA).shape == (M, H)


def test_weights_changed_in_place_after_prepare_weights():
    """The documented behaviour (usage.md, "prepare_weights"): w1 may be a view of w13 (same dtype,
    contiguous), w2 never is; fused_experts prepares again when either changes in place."""
    w13, w2 = W13.to(BF16), W2.to(BF16)
    pw = prepare_weights(w13, w2, dtype="bf16")
    assert pw.w1.data_ptr() == w13.data_ptr() and pw.w2.data_ptr() != w2.data_ptr()
    w2_before = pw.w2.clone()
    w13.mul_(2)
    w2.mul_(2)
    assert torch.equal(pw.w1, w13.reshape(E * 2 * I, H)) and torch.equal(pw.w2, w2_before)
    # fused_experts' cache: prepared on the first call, prepared again after an in-place change
    first = fused_experts(X, w13, w2, WTS, IDS, dtype="bf16", strategy="dense")
    w2.mul_(0.5)
    torch.testing.assert_close(fused_experts(X, w13, w2, WTS, IDS, dtype="bf16", strategy="dense"),
                               experts_forward(X, prepare_weights(w13, w2, dtype="bf16"), ALPHA, strategy="dense"),
                               rtol=0, atol=0)
    assert not torch.equal(first, fused_experts(X, w13, w2, WTS, IDS, dtype="bf16", strategy="dense"))


def test_public_names_exist():
    assert densemoe.experts_forward is experts_forward and densemoe.fused_experts is fused_experts
