"""Scratch memory that the kernels leave zeroed, so that it is zeroed once, not per call.

The Triton kernels that reduce partial sums across programs (FC2's split column tiles with
expert skipping, FC1's split k-ranges) add into an fp32 workspace and count arrivals per tile;
the last program to arrive reads the sum and sets what it used (sums and counter) back to zero.
So one buffer per device and stream serves every such launch with no memset in between:
launches on one stream run one after another (under programmatic dependent launch a kernel
touches memory only after its predecessor has finished), and another stream gets a buffer of
its own.

Under CUDA-graph capture, the first buffer of the capturing stream is allocated in the graph's
pool with its zeroing captured; that graph zeroes it again on each replay, which every user of
the buffer leaves at zero anyway. A buffer that is outgrown is kept alive (a captured graph may
still address it), so the memory is at most twice the largest request per stream.

FC2 on the dense path (large M) keeps fresh zeros per call: there the reused buffer's lines are
cold in L2 when the atomics come, which cost 5% at TP8 fp8 M = 192 on the H100.
"""

from __future__ import annotations

import torch

_BUFFERS: dict = {}   # (device, stream) -> fp32 zeros
_RETIRED: list = []   # outgrown buffers, never freed


def _key(dev: torch.device) -> tuple:
    return str(dev), torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0


def reused_zeros(numel: int, device) -> torch.Tensor:
    """``numel`` fp32 zeros (a view of this stream's buffer); the caller's kernel must leave
    every element it touches at zero (int32 counters viewed from it included)."""
    dev = torch.device(device)
    key = _key(dev)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(numel, 2 * buf.numel() if buf is not None else 0, 1), dtype=torch.float32, device=dev)
        _BUFFERS[key] = buf
    return buf[:numel]


def stream_buffer(device) -> torch.Tensor | None:
    """This stream's buffer, whole (tests)."""
    return _BUFFERS.get(_key(torch.device(device)))
