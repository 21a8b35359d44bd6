"""Device facts, queried lazily (never at import time) and cached per device."""

from __future__ import annotations

import functools
import os

import torch

# Programs per "SM" when the kernels run on the CPU through Triton's interpreter: small, so
# that tests on tiny shapes still split tiles across programs.
INTERPRETER_SMS = 4


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton decides whether a kernel runs through its interpreter when it defines the kernel, i.e.
# when densemoe is imported: what TRITON_INTERPRET said then is what the kernels do.
_INTERPRET_AT_IMPORT = _interpret_env()


def interpreter_enabled() -> bool:
    """Whether densemoe's Triton kernels run on CPU tensors through Triton's interpreter:
    TRITON_INTERPRET=1 now and when densemoe was imported."""
    return _INTERPRET_AT_IMPORT and _interpret_env()


def interpreter_set_late() -> bool:
    """TRITON_INTERPRET=1 now, but not when densemoe was imported (its kernels are compiled ones)."""
    return _interpret_env() and not _INTERPRET_AT_IMPORT


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int):
    return torch.cuda.get_device_properties(index)


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device()).multi_processor_count


def capability(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return (0, 0)
    p = _cuda_props(device.index if device.index is not None else torch.cuda.current_device())
    return (p.major, p.minor)


def supports_tma(device: torch.device) -> bool:
    """TMA (tensor descriptors): Hopper or newer, or the CPU interpreter (which emulates it)."""
    if device.type != "cuda":
        return interpreter_enabled()
    return capability(device) >= (9, 0)
