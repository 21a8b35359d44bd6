"""Programmatic dependent launch (PDL, Hopper): the layer's small kernels overlap their launch.

At small M every kernel of the layer (gate, top-k, FC1, the y quantisation, FC2) is short, and
between two of them the GPU spends a few microseconds draining one grid and launching the next.
With PDL (``launch_pdl=True``, sm_90+) a kernel may be launched while the one before it in the
stream still runs: each of our kernels first lets its successor launch
(``griddepcontrol.launch_dependents``) and then waits for its predecessor to complete with its
memory visible (``griddepcontrol.wait``), before it touches global memory. So no kernel reads or
writes anything before everything issued before it has finished (the order the stream gives),
and the launch of the next kernel hides behind the current one. A kernel whose predecessor was
not launched this way (cuBLAS, a CuTe kernel, a torch op) simply waits for it to finish.

``DENSEMOE_PDL=0`` turns it off (every launch as usual). Under Triton's interpreter it is off.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from densemoe._runtime import capability, interpreter_enabled

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First statement of a kernel launched by ``launch_kwargs``: let the next kernel launch,
    then wait for the previous one (and its writes) before any global memory access."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: CUDA, compute capability >= 9.0, not the
    interpreter, ``DENSEMOE_PDL`` not "0"."""
    return (device.type == "cuda" and gdc_wait is not None and not interpreter_enabled()
            and os.environ.get("DENSEMOE_PDL", "1") != "0" and capability(device) >= (9, 0))


def launch_kwargs(device: torch.device) -> dict:
    """The kernel arguments for ``pdl_enter``'s ``PDL`` and the launch: {} without PDL."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {}
