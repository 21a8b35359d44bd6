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
from densemoe.kernels.triton.fc1 import Fc1TritonConfig, fc1_triton
from densemoe.kernels.triton.fc2 import Fc2TritonConfig, fc2_triton
from densemoe.kernels.triton.skip import active_experts, active_experts_ref
from densemoe.reference import fc1_ref, fc2_ref
from _helpers import FP8, seed_of

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
                    Fc1TritonConfig(32, 32, 32, 4, 2, use_tma=0, persistent=1)]


@needs_kernel
@pytest.mark.interpreter
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("cfg", FC1_SKIP_CONFIGS, ids=lambda c: c.to_str().split(":")[1])
def test_fc1_skipping_kernel(pattern, cfg, request):
    """y = FC1 where the token picked the expert, 0 elsewhere; skipped segments are zero-filled
    (the output starts as NaN)."""
    M, E, I, H = 40, 6, 40, 48
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    x = torch.randn(M, H, generator=g).to(BF16).to(DEV)
    w1 = (torch.randn(2 * E * I, H, generator=g) * H ** -0.5).to(BF16).to(DEV)
    a1 = (torch.rand(E, generator=g) + 0.5).to(DEV)
    r = routing(pattern, M, E, g)
    y = torch.full((M, E * I), float("nan"), device=DEV)
    fc1_triton(x, w1, a1, y, cfg, routing=r, active=active_experts(r, cfg.block_m), num_programs=3)
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
def test_fc2_skipping_kernel(pattern, cfg, request):
    """FC2 over the picked experts only: NaN in the segments nobody picked must not leak (they
    are never read, or weighted by alpha = 0), tiles with no expert come out as zeros."""
    M, E, I, N = 40, 6, 64, 64
    g = torch.Generator().manual_seed(seed_of(request.node.nodeid))
    r = routing(pattern, M, E, g)
    a = torch.randn(M, E * I, generator=g).to(BF16).to(DEV)
    w = (torch.randn(N, E * I, generator=g) * 0.1).to(BF16).to(DEV)
    a_nan = a.clone()
    a_nan[(r == 0).repeat_interleave(I, dim=1)] = float("nan")
    out = torch.full((M, N), float("nan"), dtype=torch.float32, device=DEV)
    fc2_triton(a_nan, w, r, out, cfg, active=active_experts(r, cfg.block_m), num_programs=5)
    ref = fc2_ref(a, w, r, out_dtype=torch.float64)
    assert not torch.isnan(out).any()
    if pattern == "empty_tile":
        assert (out[16:] == 0).all()
    assert rel(out, ref) <= 1e-5
