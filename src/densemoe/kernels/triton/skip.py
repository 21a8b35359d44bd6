"""Expert skipping: the experts each token tile picked, listed on the GPU in one small kernel.

Semantics (``densemoe.reference.active_experts_ref`` is the executable twin)::

    # routing: [M, E]  any dtype; routing[m, e] != 0 means token m picked expert e
    T = cdiv(M, block_m)                                  # token tiles
    for t in range(T):
        picked = [e for e in range(E) if any(routing[m, e] != 0 for m in tile t)]
        rest   = [e for e in range(E) if e not in picked]
        lists[t, :] = picked + rest                       # ascending within each part
        counts[t]   = len(picked)

FC1 and FC2 build these lists themselves at the start of the kernel (``_tile_list``, into an
uninitialised scratch buffer: no extra launch) and read ``lists[t, :counts[t]]`` to visit only
those experts; FC1 also zero-fills the output segments of ``rest``. Nothing is copied to the
host, so the ops stay CUDA-graph capturable: grids are sized for the worst case and read the
counts on the GPU. ``active_experts`` is the same as a kernel of its own (tests, tools).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_positions(r_ptr, t, M, E, stride_rm, stride_re,
                    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr):
    """(pos [BLOCK_E], n): token tile t's picked-expert count n and each expert's position in
    its list (picked ascending at 0..n-1, then the rest; padding lanes: past E), in registers."""
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    act = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for r0 in range(0, BLOCK_M, ROWS):
        rows = t * BLOCK_M + r0 + tl.arange(0, ROWS)
        vals = tl.load(r_ptr + rows.to(tl.int64)[:, None] * stride_rm + offs_e[None, :] * stride_re,
                       mask=(rows < M)[:, None] & e_ok[None, :], other=0)
        act = tl.maximum(act, tl.max((vals != 0).to(tl.int32), axis=0))
    act = tl.where(e_ok, act, 0)
    n = tl.sum(act, axis=0)
    c = tl.cumsum(act, axis=0)  # picked experts in [0, e]; an unpicked e has e + 1 - c[e] unpicked there
    pos = tl.where(act == 1, c - 1, n + offs_e - c)
    return tl.where(e_ok, pos, BLOCK_E + offs_e), n


@triton.jit
def _expert_at(pos, j, BLOCK_E: tl.constexpr):
    """The expert at position j of a list given as ``pos`` (``_tile_positions``): a reduction
    in registers, no memory."""
    return tl.sum(tl.where(pos == j, tl.arange(0, BLOCK_E), 0), axis=0)


@triton.jit
def _tile_list(r_ptr, t, M, E, stride_rm, stride_re, lists_ptr, counts_ptr,
               BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr):
    """Token tile t's expert list (picked ascending, then the rest) into lists[t, :] and its
    count into counts[t]; returns the count. The FC1 and FC2 kernels call this themselves
    (then a barrier before reading the list back), so skipping costs no extra launch."""
    pos, n = _tile_positions(r_ptr, t, M, E, stride_rm, stride_re, BLOCK_M, ROWS, BLOCK_E)
    offs_e = tl.arange(0, BLOCK_E)
    tl.store(lists_ptr + t * E + pos, offs_e, mask=offs_e < E)
    tl.store(counts_ptr + t, n)
    return n


@triton.jit
def _active_lists_kernel(r_ptr, lists_ptr, counts_ptr, M, E, stride_rm, stride_re,
                         BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr):
    _tile_list(r_ptr, tl.program_id(0), M, E, stride_rm, stride_re, lists_ptr, counts_ptr, BLOCK_M, ROWS, BLOCK_E)


def list_blocks(e: int, block_m: int) -> tuple[int, int]:
    """(BLOCK_E, ROWS) for ``_tile_list``: experts padded to a power of two, rows per load so
    that a load holds at most 4096 values."""
    block_e = triton.next_power_of_2(max(e, 1))
    rows = max(1, min(block_m, 4096 // block_e))
    return block_e, 1 << (rows.bit_length() - 1)


def lists_scratch(t: int, e: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (lists [t, e], counts [t]) int32 for the kernels to fill (no launch)."""
    buf = torch.empty(t * e + t, dtype=torch.int32, device=device)
    return buf[: t * e].view(t, e), buf[t * e:]


def num_token_tiles(m: int, block_m: int) -> int:
    return triton.cdiv(m, block_m)


def active_experts(routing: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lists [T, E] int32, counts [T] int32) for token tiles of ``block_m`` rows (module
    docstring). ``routing`` [M, E]: alpha, top-k weights scattered to [M, E], or a bool mask.
    One launch of T programs; no host sync."""
    M, E = routing.shape
    T = num_token_tiles(M, block_m)
    lists, counts = lists_scratch(T, E, routing.device)
    if T == 0 or E == 0:
        return lists, counts
    r = routing.view(torch.uint8) if routing.dtype == torch.bool else routing
    block_e, rows = list_blocks(E, block_m)
    _active_lists_kernel[(T,)](r, lists, counts, M, E, r.stride(0), r.stride(1),
                               BLOCK_M=block_m, ROWS=rows, BLOCK_E=block_e, num_warps=4)
    return lists, counts
