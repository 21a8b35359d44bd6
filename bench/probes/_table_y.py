"""What the FC2 probes share (``routed_fc2_variants.py``, ``routed_combine_atomic.py``): for a
model shape's case at M, uniform top-k routing, the table's routed config, and the y its grouped
FC1 gives (x quantised per token for fp8), on x's device. Not a probe itself."""

from types import SimpleNamespace

import torch

from densemoe.kernels.common import RoutedProblem
from densemoe.ops import routed_configs
from densemoe.ops.routed import _fc1_stage
from densemoe.quant import FP8, quantize_per_token
from densemoe.tuning.ops import routed_topk


def table_y(case, dt: str, M: int) -> SimpleNamespace:
    """p (the prepared weights), k, ids, wts (float32), prob, cfg, sp, offs (the schedule), y, ys,
    and out (bf16 [M, H], uninitialised)."""
    p = case.prepared[dt]
    E, H, I, k = p.num_experts, p.hidden, p.inter, case.k
    x = case.x(M)
    dev = x.device
    ids, wts = routed_topk(M, E, k, dev, torch.Generator(device=dev).manual_seed(M))
    wts = wts.float().contiguous()
    prob = RoutedProblem(M, H, E, I, k, p.dtype, torch.bfloat16)
    cfg = routed_configs.choose(prob, dev).config
    xq, sx = quantize_per_token(x) if p.dtype == FP8 else (x, None)
    sp, offs, y, ys = _fc1_stage(xq, sx, p.w1, p.alpha1, ids, cfg)
    out = torch.empty(M, H, dtype=torch.bfloat16, device=dev)
    return SimpleNamespace(p=p, k=k, ids=ids, wts=wts, prob=prob, cfg=cfg, sp=sp, offs=offs, y=y, ys=ys, out=out)


def cases(default_ms: str):
    """(shape, M, dt, ``table_y``) over the command line's ``[shapes] [M,...] [fp8|bf16]`` (both
    model shapes, ``default_ms``, fp8 if left out), on the GPU."""
    import sys

    from densemoe.bench.layer import ExpertsCase

    shapes = (sys.argv[1] if len(sys.argv) > 1 else "deepseek-v3-tp8,qwen3-30b-a3b").split(",")
    ms = [int(m) for m in (sys.argv[2] if len(sys.argv) > 2 else default_ms).split(",")]
    dt = sys.argv[3] if len(sys.argv) > 3 else "fp8"
    for shape in shapes:
        case = ExpertsCase(shape, "cuda")
        for M in ms:
            yield shape, M, dt, table_y(case, dt, M)
