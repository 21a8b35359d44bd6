"""What every backend's kernels share: the problem types, the Hopper limits, the TMA layout rule,
the split-work reduction's workspace.

A leaf: it imports torch only, so a Triton kernel file and a CuTe kernel file can both use it
without importing each other.

The workspace. Kernels that reduce partial sums across programs (FC2's split column tiles, FC1's
split k-ranges) add into an fp32 workspace and count arrivals per tile; the last program to
arrive reads the sum and writes the output. Two ways to get one:

* ``split_workspace(..., reuse=False)``: fresh zeros per call (one memset).
* ``reused_zeros``: one buffer per device and stream, zeroed once. The kernels that use it set
  everything they touched (sums and counters) back to zero, so the next launch finds zeros with
  no memset in between: launches on one stream run one after another (under programmatic
  dependent launch a kernel touches memory only after its predecessor has finished), and another
  stream gets a buffer of its own. Under CUDA-graph capture, the first buffer of the capturing
  stream is allocated in the graph's pool with its zeroing captured; that graph zeroes it again
  on each replay, which every user of the buffer leaves at zero anyway. A buffer that is
  outgrown is kept alive (a captured graph may still address it), so the memory is at most
  twice the largest request per stream.

Which launches take which is the launchers' choice (``docs/skipping.md`` has the measurements).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

SMEM_BYTES = 227 * 1024  # Hopper's per-block shared-memory limit (232448 B, opt-in)
# I (each expert's intermediate size) must be a multiple of this: FC2's smallest k-tile (an fp8
# MMA's k), so that a k-tile never straddles two experts
I_MULTIPLE = 32


@dataclasses.dataclass(frozen=True)
class Fc2Problem:
    """The static description of one FC2 call (what a config must fit): a [M, E*I] x w [N, E*I]."""

    m: int
    n: int
    e: int
    i: int
    dtype: torch.dtype  # of a and w
    out_dtype: torch.dtype

    @property
    def k(self) -> int:
        return self.e * self.i


@dataclasses.dataclass(frozen=True)
class Fc1Problem:
    """The static description of one FC1 call: x [M, H] x w1 [E*2I, H] (M is bucketed wherever
    it keys anything)."""

    m: int
    h: int
    e: int
    i: int
    dtype: torch.dtype
    out_dtype: torch.dtype

    @property
    def n(self) -> int:  # the GEMM's N (rows of w1) and K, for tuning keys
        return self.e * 2 * self.i

    @property
    def k(self) -> int:
        return self.h


@dataclasses.dataclass(frozen=True)
class RoutedProblem:
    """The static description of one routed experts call: M tokens of H, each picking top_k of E
    experts of intermediate size I (M is bucketed wherever it keys anything)."""

    m: int
    h: int
    e: int
    i: int
    top_k: int
    dtype: torch.dtype  # of x and the weights
    out_dtype: torch.dtype
    block: int = 0  # block-scaled fp8 weights: their scale block (128); 0: per-expert scales

    @property
    def n(self) -> int:  # for tuning keys: FC2's N and K (over all experts), as Fc2Problem
        return self.h

    @property
    def k(self) -> int:
        return self.e * self.i


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """TMA needs a unit inner stride, 16-byte aligned row strides and base address."""
    for t in tensors:
        if (t.stride(1) != 1 or t.stride(0) < t.shape[1] or (t.stride(0) * t.element_size()) % 16
                or t.data_ptr() % 16):
            return False
    return True


@functools.lru_cache(maxsize=1024)
def tiles_cut(n_tiles: int, e: int, groups: int) -> bool:
    """Whether splitting ``n_tiles * e`` (tile, expert) units evenly over ``groups`` workers cuts
    some tile (so partial sums need the workspace). Cached because it loops over the groups."""
    units = n_tiles * e
    return any((g * units // groups) % e for g in range(1, groups))


_BUFFERS: dict = {}   # (device, stream) -> fp32 zeros
_RETIRED: list = []   # outgrown buffers, never freed


def _stream_key(dev: torch.device) -> tuple:
    return str(dev), torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0


def reused_zeros(numel: int, device) -> torch.Tensor:
    """``numel`` fp32 zeros (a view of this stream's buffer); the caller's kernel must leave
    every element it touches at zero (int32 counters viewed from it included)."""
    dev = torch.device(device)
    key = _stream_key(dev)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(numel, 2 * buf.numel() if buf is not None else 0, 1), dtype=torch.float32, device=dev)
        _BUFFERS[key] = buf
    return buf[:numel]


def stream_buffer(device) -> torch.Tensor | None:
    """This stream's reused buffer, whole (tests)."""
    return _BUFFERS.get(_stream_key(torch.device(device)))


def split_workspace(m: int, n: int, m_tiles: int, n_tiles: int, cut: bool, device,
                    reuse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partial sums [m * n], int32 per-tile counters [m_tiles * n_tiles]) for launches that
    cut tiles, zeroed; a 1-element placeholder (never touched) when no tile is cut.
    ``reuse``: a view of ``reused_zeros`` (the kernel must leave it at zero), else fresh zeros."""
    if not cut:
        ws = torch.empty(1, dtype=torch.float32, device=device)
        return ws, ws.view(torch.int32)
    need = m * n + m_tiles * n_tiles
    if reuse:
        buf = reused_zeros(need, device)
        return buf[: m * n], buf[m * n:].view(torch.int32)
    ws = torch.zeros(need, dtype=torch.float32, device=device)
    return ws, ws[m * n:].view(torch.int32)


def max_tiles(pairs: int, experts: int, block_m: int) -> int:
    """Tiles of ``block_m`` sorted rows a routing of ``pairs`` over ``experts`` can need at most:
    every expert's last one part-filled, none empty (the size of a tile list that any routing
    fits: CUDA graphs replay with any)."""
    return max(1, min(pairs, (pairs + experts * (block_m - 1)) // block_m))


def check_tile_list(tiles: torch.Tensor, n_tiles: torch.Tensor, sorted_pairs: torch.Tensor, offsets: torch.Tensor,
                    pairs: int, experts: int, block_m: int) -> None:
    """The schedule's buffers as a kernel that walks the tile list reads them: int32 and
    contiguous; ``tiles`` [>= max_tiles, 2] and 8-byte aligned (each (expert, first row) is one
    8-byte load in the CuTe kernels)."""
    n = max_tiles(pairs, experts, block_m)
    if (tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[0] < n or tiles.shape[1] != 2
            or not tiles.is_contiguous() or tiles.data_ptr() % 8):
        raise ValueError(f"tiles must be int32 [>= {n}, 2], contiguous and 8-byte aligned")
    for name, t, size in (("n_tiles", n_tiles, 1), ("sorted_pairs", sorted_pairs, pairs),
                          ("offsets", offsets, experts + 1)):
        if t.dtype != torch.int32 or not t.is_contiguous() or t.numel() < size:
            raise ValueError(f"{name} must be int32, contiguous, at least {size} long")
