"""The grouped baseline anyone can install: the routed MoE experts through torch's own grouped
GEMMs, no densemoe kernel and no Triton (``python -m densemoe.bench layer``, experts path,
``torch_grouped_us``). Per call, with k = top-k and P = M * k (token, slot) pairs:

    sort     the pairs by expert: ``torch.sort(topk_ids.flatten(), stable=True)`` -> (sorted ids,
             perm: sorted row r is pair perm[r], token perm[r] // k)
    offsets  offs[e] = the end of expert e's rows = #{pairs with id <= e}:
             ``torch.searchsorted(sorted ids, arange(E), right=True, out_int32=True)``, the int32
             cumulative ends ``torch._grouped_mm`` takes. (Not ``torch.bincount``: on CUDA it
             reads the largest id back to the host, a sync that a CUDA graph cannot capture.)
    FC1      bf16: ``torch._grouped_mm(x[tok], w13.transpose(-2, -1), offs=offs)``     [P, 2I]
             fp8:  ``torch._scaled_grouped_mm(x8[tok], w13_8.transpose(-2, -1), sx[tok], s13,
                   offs=offs, out_dtype=bf16)``: x quantised per token (x8, sx [M]), w13 per
                   (expert, output row) (w13_8, s13 [E, 2I]): the row-wise recipe
    SwiGLU   silu(gate) * up in fp32 (gate rows then up rows: the checkpoint's [E, 2I, H])
    FC2      the same with w2 [E, H, I]; fp8: y quantised per row first, w2 per (expert, row)
    combine  each row times its routing weight (fp32), put back in pair order (``index_copy_``),
             ``view(M, k, H).sum(1)``, cast to bf16

Everything is torch ops on the device with no host sync, so the Timer's CUDA graph captures it.
The quantisation is plain torch (amax / 448 per row), not densemoe's kernels.

The signatures were checked against torch 2.13.0 on a CPU build (the aten schemas
``_grouped_mm(self, mat2, offs=None, bias=None, out_dtype=None)`` and
``_scaled_grouped_mm(self, mat2, scale_a, scale_b, offs=None, bias=None, scale_result=None,
out_dtype=None, use_fast_accum=False)``, and ``torch/_meta_registrations.py``'s
``_meta_grouped_mm_common``: mat_a [rows, K], mat_b [G, K, N], offs 1D int32 cumulative ends;
scaled: mat_a row-major, mat_b column-major, float32 scales, scale_a [rows], scale_b [G, N], bf16
out) and against pytorch's ``aten/src/ATen/native/cuda/GroupedBlas.cpp`` (``_scaled_grouped_mm``
runs on compute capability 9.0 and 10.0 only, needs K and both dims of mat_b to be multiples of
16; ``_grouped_mm`` takes its no-sync CUTLASS path on 9.0 / 10.0 for bf16). Not checked on the
H200's torch 2.11: whatever raises there lands in the record's ``torch_grouped_note`` (so does the
CPU build's missing ``_scaled_grouped_mm`` kernel).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [..., R, K] -> (q fp8, scale [..., R] float32) with t ~= q * scale[..., None]: one scale
    per row, amax / 448 (an all-zero row gets a tiny scale and zeros)."""
    tf = t.float()
    s = (tf.abs().amax(dim=-1) / FP8_MAX).clamp_min(1e-12)
    return (tf / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), s


def _fp8_weights(w: torch.Tensor, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, K] bf16 -> (w8 [E, N, K] fp8, scale [E, N]), ``chunk`` experts at a time so the
    fp32 copy stays small (DeepSeek-V3 TP8's w13 in fp32 is 3.8 GB)."""
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    s = torch.empty(w.shape[:2], dtype=torch.float32, device=w.device)
    for e0 in range(0, w.shape[0], chunk):
        q[e0:e0 + chunk], s[e0:e0 + chunk] = fp8_rows(w[e0:e0 + chunk])
    return q, s


class TorchGrouped:
    """The pipeline above for one shape's checkpoint weights (w13 [E, 2I, H] gate then up, w2
    [E, H, I], bf16) in ``dtype`` ("bf16" or "fp8"); ``__call__(x, topk_ids, topk_weights)``
    -> [M, H] bf16. Building it raises (RuntimeError / NotImplementedError / AttributeError)
    where the torch build lacks the grouped GEMM it needs; the caller records why."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, dtype: str):
        if dtype not in ("bf16", "fp8"):
            raise ValueError(f"TorchGrouped: dtype must be bf16 or fp8, got {dtype!r}")
        self.dtype, self.E, self.I = dtype, w13.shape[0], w2.shape[2]
        name = "_scaled_grouped_mm" if dtype == "fp8" else "_grouped_mm"
        if not hasattr(torch, name):
            raise AttributeError(f"torch {torch.__version__} has no torch.{name}")
        if dtype == "bf16":
            # [E, 2I, H] contiguous, seen as [E, H, 2I]: column-major per expert, as the kernel wants
            self.w13, self.w2 = w13.to(torch.bfloat16), w2.to(torch.bfloat16)
            self.s13 = self.s2 = None
        else:
            self.w13, self.s13 = _fp8_weights(w13)
            self.w2, self.s2 = _fp8_weights(w2)
        self.experts = torch.arange(self.E, device=w13.device)

    def _gemm(self, a: torch.Tensor, a_scale, w: torch.Tensor, w_scale, offs: torch.Tensor) -> torch.Tensor:
        if self.dtype == "bf16":
            return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)
        return torch._scaled_grouped_mm(a, w.transpose(-2, -1), a_scale, w_scale, offs=offs,
                                        out_dtype=torch.bfloat16)

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        M, H = x.shape
        k = topk_ids.shape[1]
        ids, perm = torch.sort(topk_ids.reshape(-1), stable=True)
        offs = torch.searchsorted(ids, self.experts.to(ids.dtype), right=True, out_int32=True)
        tok = perm // k
        if self.dtype == "bf16":
            a, sa = x.to(torch.bfloat16)[tok], None
        else:
            x8, sx = fp8_rows(x)
            a, sa = x8[tok], sx[tok]
        h = self._gemm(a, sa, self.w13, self.s13, offs).float()  # [P, 2I]
        y = torch.nn.functional.silu(h[:, :self.I]) * h[:, self.I:]
        if self.dtype == "bf16":
            y, sy = y.to(torch.bfloat16), None
        else:
            y, sy = fp8_rows(y)
        rows = self._gemm(y, sy, self.w2, self.s2, offs).float()  # [P, H], sorted order
        rows = rows * topk_weights.reshape(-1)[perm].float()[:, None]
        pairs = torch.empty_like(rows).index_copy_(0, perm, rows)  # back in pair order m*k + j
        return pairs.view(M, k, H).sum(dim=1).to(torch.bfloat16)
