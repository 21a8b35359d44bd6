"""Loading a MoE layer from a Hugging Face checkpoint directory (issue 20): tiny DeepSeek-V3- and
Qwen3-style checkpoints written here with the real tensor names and config.json fields, block-
scaled fp8 and bf16, sharded with an index; the layer keeps the fp8 weights and block scales as
they are and matches the same layer built from the tensors by hand, and the float64 reference."""

from __future__ import annotations

import json
import os

import pytest
import torch

from densemoe import DenseMoE, prepare_weights
from densemoe.integrations.checkpoint import load_moe_layer
from densemoe.quant import FP8
from densemoe.reference import experts_ref
from densemoe.routing import deepseek_v3_topk, softmax_topk

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU path: Triton's interpreter")
safetensors = pytest.importorskip("safetensors.torch")
BF16 = torch.bfloat16
E, H, I, K = 8, 256, 128, 2
FP8_CFG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _expert_tensors(prefix, fp8, g):
    """One layer's experts under their checkpoint names, with the float32 weights they stand for."""
    out, full = {}, {}
    for e in range(E):
        for part, (rows, cols) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            name = f"{prefix}.experts.{e}.{part}"
            if fp8:
                s = torch.rand(rows // 128, cols // 128, generator=g) * 0.004 + 0.0005
                q = (torch.randn(rows, cols, generator=g) * 100).clamp(-448, 448).to(FP8)
                out[f"{name}.weight"], out[f"{name}.weight_scale_inv"] = q, s
                full[name] = (q.float().reshape(rows // 128, 128, cols // 128, 128) * s[:, None, :, None]).reshape(rows, cols)
            else:
                w = (torch.randn(rows, cols, generator=g) * cols ** -0.5).to(BF16)
                out[f"{name}.weight"], full[name] = w, w.float()
    return out, full


def write_checkpoint(root, model_type, fp8, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = 1
    prefix = f"model.layers.{layer}.mlp"
    tensors, full = _expert_tensors(prefix, fp8, g)
    tensors[f"{prefix}.gate.weight"] = (torch.randn(E, H, generator=g) * H ** -0.5).to(BF16)
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.randn(512, H, generator=g).to(BF16)  # a dense layer
    cfg = dict(model_type=model_type, hidden_size=H, moe_intermediate_size=I, num_experts_per_tok=K,
               num_hidden_layers=2, norm_topk_prob=True)
    if model_type == "deepseek_v3":
        tensors[f"{prefix}.gate.e_score_correction_bias"] = torch.rand(E, generator=g) * 0.1
        cfg.update(n_routed_experts=E, n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
                   n_shared_experts=1)
    else:
        cfg.update(num_experts=E)
    if fp8:
        cfg["quantization_config"] = FP8_CFG
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, keys in shards.items():
        safetensors.save_file({k: tensors[k].contiguous() for k in keys}, str(root / f))
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (root / "config.json").write_text(json.dumps(cfg))
    return tensors, full, cfg, prefix


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen3_moe"])
@pytest.mark.parametrize("fp8", [True, False])
def test_a_layer_loads_as_it_is_and_matches(tmp_path, model_type, fp8):
    tensors, full, cfg, prefix = write_checkpoint(tmp_path, model_type, fp8)
    moe = load_moe_layer(tmp_path, 1, device="cpu")
    pw = moe.prepared
    if fp8:  # not dequantised, not requantised: the checkpoint's bytes and scales
        assert pw.dtype == FP8 and pw.block == 128
        g0 = tensors[f"{prefix}.experts.0.gate_proj.weight"]
        assert torch.equal(pw.w1[:I].view(torch.uint8), g0.view(torch.uint8))
        assert torch.equal(pw.w1_block_scale[2 * I // 128 + 1], tensors[f"{prefix}.experts.1.up_proj.weight_scale_inv"][0])
        assert moe.checkpoint_stats["block"] == 128 and moe.checkpoint_stats["weights_dtype"] == "float8_e4m3fn"
    # the same layer by hand, from the tensors
    stack = lambda part: torch.stack([tensors[f"{prefix}.experts.{e}.{part}.weight"] for e in range(E)])  # noqa: E731
    w13, w2 = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1), stack("down_proj")
    if fp8:
        sc = lambda part: torch.stack([tensors[f"{prefix}.experts.{e}.{part}.weight_scale_inv"] for e in range(E)])  # noqa: E731
        hand = prepare_weights(w13, w2, w13_scale=torch.cat([sc("gate_proj"), sc("up_proj")], dim=1), w2_scale=sc("down_proj"))
    else:
        hand = prepare_weights(w13, w2, dtype="fp8")
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(3)).to(BF16)
    assert torch.equal(pw.w1.view(torch.uint8), hand.w1.view(torch.uint8))
    out = moe(x)
    if model_type == "deepseek_v3":
        kw = dict(router="deepseek_v3", logits_fp32=True, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                  norm_topk_prob=True, e_score_correction_bias=tensors[f"{prefix}.gate.e_score_correction_bias"])
    else:
        kw = dict(renormalize=True)
    assert torch.equal(out, DenseMoE(hand, tensors[f"{prefix}.gate.weight"], K, **kw)(x))  # the same layer
    # against float64 on the weights the checkpoint stands for, with the model's router
    logits = x.float() @ tensors[f"{prefix}.gate.weight"].float().T
    if model_type == "deepseek_v3":
        route = deepseek_v3_topk(logits, K, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                 e_score_correction_bias=tensors[f"{prefix}.gate.e_score_correction_bias"], impl="torch")
    else:
        route = softmax_topk(logits.to(BF16), K, renormalize=True, impl="torch")
    f = lambda part: torch.stack([full[f"{prefix}.experts.{e}.{part}"] for e in range(E)])  # noqa: E731
    ref = experts_ref(x, torch.cat([f("gate_proj"), f("up_proj")], dim=1), f("down_proj"), route.alpha)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < 0.08, rel  # a sanity bound (fp8 activations; the numerics are held tightly in test_block_fp8)


def test_what_is_refused_says_why(tmp_path):
    write_checkpoint(tmp_path, "deepseek_v3", True)
    with pytest.raises(ValueError, match="no routed experts"):
        load_moe_layer(tmp_path, 0, device="cpu")
    with pytest.raises(ValueError, match="layer must be"):
        load_moe_layer(tmp_path, 7, device="cpu")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 64]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="weight_block_size"):
        load_moe_layer(tmp_path, 1, device="cpu")
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not supported"):
        load_moe_layer(tmp_path, 1, device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_moe_layer(tmp_path / "nowhere", 1, device="cpu")
