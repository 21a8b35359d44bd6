"""MoE layers straight from a Hugging Face checkpoint directory (safetensors), weights as they are.

    layer = load_moe_layer("/models/DeepSeek-V3", layer=3, device="cuda")

reads ``config.json`` and the layer's tensors (through ``model.safetensors.index.json`` when the
checkpoint is sharded), stacks each expert's ``gate_proj`` / ``up_proj`` / ``down_proj`` into the
[E, 2I, H] and [E, H, I] checkpoint layouts on ``device``, and builds a ``DenseMoE`` with the
model's router. Block-scaled fp8 checkpoints (``quantization_config.weight_block_size`` [128, 128]:
DeepSeek-V3/R1, Qwen3-*-FP8) keep their fp8 weights and ``weight_scale_inv`` block scales: nothing
is dequantised (``prepare_weights`` keeps them; the routed path applies them). bf16 checkpoints
load as bf16 and are prepared for ``dtype`` ("fp8": quantised per expert; "bf16").

Model types: ``deepseek_v3`` (sigmoid grouped top-k router with its correction bias) and
``qwen3_moe`` (softmax top-k). The shared experts of DeepSeek-V3 are not loaded: they are a dense
MLP that stays outside the MoE layer (``DenseMoE(shared_experts=...)`` takes one).

``layer.checkpoint_stats``: the bytes of expert weights and scales held, and on CUDA the peak of
memory allocated while loading, above what was allocated before.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from densemoe.layer import DenseMoE
from densemoe.weights import BLOCK, prepare_weights

MODEL_TYPES = ("deepseek_v3", "qwen3_moe")
OP = "load_moe_layer"


class _Tensors:
    """The checkpoint's tensors by name, opened lazily per shard."""

    def __init__(self, root: Path, device: str):
        try:
            from safetensors import safe_open
        except ImportError as exc:  # pragma: no cover - transformers brings it
            raise ImportError(f"{OP}: reading checkpoints needs the safetensors package (pip install safetensors)") from exc
        self._open, self.device, self.root = safe_open, device, root
        index = root / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: root / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(root.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{OP}: no *.safetensors files in {root}")
            self.where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    self.where.update({k: f for k in h.keys()})
        self._handles: dict = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise KeyError(f"{OP}: the checkpoint in {self.root} has no tensor {name!r}")
        f = self.where[name]
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = self._open(str(f), framework="pt", device=self.device)
        return h.get_tensor(name)


def _config(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{OP}: {root} has no config.json (a Hugging Face checkpoint directory is expected)")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{OP}: model_type {cfg.get('model_type')!r} is not supported; supported: {MODEL_TYPES}")
    return cfg


def _block_fp8(cfg: dict) -> bool:
    """Whether the checkpoint holds block-scaled fp8 weights (and that its blocks are 128 x 128)."""
    q = cfg.get("quantization_config")
    if not q:
        return False
    if q.get("quant_method") != "fp8":
        raise ValueError(f"{OP}: quantization_config.quant_method {q.get('quant_method')!r} is not supported "
                         "(fp8 with 128 x 128 blocks, or an unquantised checkpoint)")
    block = list(q.get("weight_block_size") or [])
    if block != [BLOCK, BLOCK]:
        raise ValueError(f"{OP}: weight_block_size {block} is not supported; 128 x 128 blocks are "
                         "(DeepSeek-V3/R1, Qwen3-FP8)")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"{OP}: activation_scheme {q.get('activation_scheme')!r} is not supported (dynamic only)")
    return True


def load_moe_layer(path, layer: int, *, dtype: str = "fp8", device="cuda") -> DenseMoE:
    """The MoE block of decoder layer ``layer`` of the checkpoint at ``path`` as a ``DenseMoE``
    on ``device`` (module docstring). ``dtype``: the kernels, "fp8" or "bf16" (a block-scaled
    checkpoint with "fp8" keeps its weights and block scales as they are)."""
    root = Path(path)
    cfg = _config(root)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < cfg.get("num_hidden_layers", 1 << 30):
        raise ValueError(f"{OP}: layer must be an int in [0, num_hidden_layers={cfg.get('num_hidden_layers')}), "
                         f"got {layer!r}")
    device = str(torch.device(device))
    block = _block_fp8(cfg)
    t = _Tensors(root, device)
    prefix = f"model.layers.{layer}.mlp"
    if f"{prefix}.experts.0.gate_proj.weight" not in t:
        raise ValueError(f"{OP}: layer {layer} has no routed experts ({prefix}.experts.*): a dense layer? "
                         "(DeepSeek-V3's first_k_dense_replace layers are dense MLPs)")
    deepseek = cfg["model_type"] == "deepseek_v3"
    E = cfg["n_routed_experts"] if deepseek else cfg["num_experts"]
    top_k = cfg["num_experts_per_tok"]
    dev = torch.device(device)
    before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    g0 = t.get(f"{prefix}.experts.0.gate_proj.weight")
    I, H = g0.shape
    w13 = torch.empty((E, 2 * I, H), dtype=g0.dtype, device=dev)
    w2 = torch.empty((E, H, I), dtype=g0.dtype, device=dev)
    s13 = torch.empty((E, 2 * I // BLOCK, H // BLOCK), dtype=torch.float32, device=dev) if block else None
    s2 = torch.empty((E, H // BLOCK, I // BLOCK), dtype=torch.float32, device=dev) if block else None
    for e in range(E):  # one expert's tensors at a time: the peak stays one expert above the stacks
        name = f"{prefix}.experts.{e}"
        for part, rows in (("gate_proj", slice(0, I)), ("up_proj", slice(I, 2 * I))):
            w13[e, rows] = t.get(f"{name}.{part}.weight")
            if block:
                s13[e, rows.start // BLOCK:rows.stop // BLOCK] = t.get(f"{name}.{part}.weight_scale_inv")
        w2[e] = t.get(f"{name}.down_proj.weight")
        if block:
            s2[e] = t.get(f"{name}.down_proj.weight_scale_inv")
    prepared = prepare_weights(w13, w2, dtype=dtype, w13_scale=s13, w2_scale=s2)
    del w13, w2, s13, s2
    gate = t.get(f"{prefix}.gate.weight")
    if deepseek:
        bias_name = f"{prefix}.gate.e_score_correction_bias"
        kwargs = dict(router="deepseek_v3", logits_fp32=True, n_group=cfg["n_group"], topk_group=cfg["topk_group"],
                      e_score_correction_bias=t.get(bias_name) if bias_name in t else None,
                      routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
                      norm_topk_prob=bool(cfg.get("norm_topk_prob", True)))
    else:
        kwargs = dict(renormalize=bool(cfg.get("norm_topk_prob", False)))
    moe = DenseMoE(prepared, gate, top_k, **kwargs)
    held = sum(x.numel() * x.element_size() for x in (prepared.w1, prepared.w2, prepared.alpha1, prepared.w2_scale,
                                                       prepared.w1_block_scale, prepared.w2_block_scale)
               if x is not None)
    moe.checkpoint_stats = dict(
        expert_bytes=held, weights_dtype=str(prepared.dtype).replace("torch.", ""), block=prepared.block,
        peak_bytes_above_start=(torch.cuda.max_memory_allocated(dev) - before) if dev.type == "cuda" else None)
    return moe
