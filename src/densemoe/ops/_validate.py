"""Argument checks shared by the public ops: each error names the argument, what was given and
what was expected."""

from __future__ import annotations

import torch

from densemoe._runtime import capability, interpreter_enabled, interpreter_set_late

FP8 = torch.float8_e4m3fn
_DT_NAMES = {FP8: "float8_e4m3fn", torch.bfloat16: "bfloat16", torch.float16: "float16",
             torch.float32: "float32"}


def dtype_name(dt: torch.dtype) -> str:
    return _DT_NAMES.get(dt, str(dt).replace("torch.", ""))


def tensor(op: str, name: str, x, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def dtype(op: str, name: str, x: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if x.dtype not in allowed:
        want = " or ".join(dtype_name(d) for d in allowed)
        raise TypeError(f"{op}: {name} must be {want}, got {dtype_name(x.dtype)}")


def same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    names = list(tensors)
    dev = tensors[names[0]].device
    for n in names[1:]:
        if tensors[n].device != dev:
            raise ValueError(f"{op}: {n} is on {tensors[n].device} but {names[0]} is on {dev}; "
                             "all tensors must be on one device")
    if dev.type == "cuda":
        return dev
    if dev.type == "cpu" and interpreter_enabled():
        return dev  # Triton's interpreter runs the kernels on the CPU (tests)
    late = (" TRITON_INTERPRET=1 was set after `import densemoe`, but Triton decides when it defines the "
            "kernels (at import) whether they run interpreted: set it before importing densemoe, e.g. "
            "`TRITON_INTERPRET=1 python script.py`." if dev.type == "cpu" and interpreter_set_late() else "")
    raise ValueError(f"{op}: tensors are on {dev}; densemoe's kernels run on CUDA devices "
                     "(on the CPU they run only under TRITON_INTERPRET=1; "
                     f"densemoe.reference has the plain-PyTorch twins).{late}")


def device_supports(op: str, dev: torch.device, dt: torch.dtype) -> None:
    if dev.type != "cuda":
        return
    cap = capability(dev)
    need = (8, 9) if dt == FP8 else (8, 0)
    if cap < need:
        raise ValueError(f"{op}: {dtype_name(dt)} needs compute capability >= {need[0]}.{need[1]}; "
                         f"{dev} is sm_{cap[0]}{cap[1]}")


INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def expert_ids(op: str, ids, M: int, E: int, skip: bool, dev: torch.device) -> torch.Tensor:
    """``expert_ids`` of the skipping ops: one token's picked experts ([k] or [1, k], integer,
    1 <= k <= E) with skipping at M = 1. Their values (distinct, in [0, E)) are the caller's
    promise: checking them would cost a device sync."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{op}: expert_ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() not in (1, 2) or (ids.dim() == 2 and ids.shape[0] != 1) or not 1 <= ids.shape[-1] <= E:
        raise ValueError(f"{op}: expert_ids must be [k] or [1, k] with 1 <= k <= E={E}, got shape {tuple(ids.shape)}")
    if ids.dtype not in INT_DTYPES:
        raise TypeError(f"{op}: expert_ids must be an integer tensor, got {dtype_name(ids.dtype)}")
    if M != 1:
        raise ValueError(f"{op}: expert_ids are one token's picked experts (M = 1), got M={M}")
    if not skip:
        raise ValueError(f"{op}: expert_ids is the expert list of skipping; skipping is off (skip=False, or a "
                         "pinned config or backend that cannot skip)")
    if ids.device != dev:
        raise ValueError(f"{op}: expert_ids is on {ids.device} but the other tensors are on {dev}")
    return ids.reshape(-1).contiguous()


def inference_only(op: str, **tensors) -> None:
    """A ValueError if grad mode is on and a tensor requires grad: the kernels have no backward, so
    the result would carry no gradient to it (silently wrong for training)."""
    if torch.is_grad_enabled():
        grads = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
        if grads:
            raise ValueError(f"{op} is inference-only (no backward): {', '.join(grads)} require(s) grad; call it "
                             "under torch.no_grad() / torch.inference_mode() or on tensors that do not require grad")
