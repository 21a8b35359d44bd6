"""What ``fc1_configs.choose`` and ``fc2_configs.choose`` share: their answer (``Choice``: which
backend and config run a call, and where the config came from), the check of a pinned config and
the reading of a tuned entry."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from densemoe.tuning import cache

SOURCES = ("pinned", "cache", "shipped", "heuristic")


class Choice(NamedTuple):
    """backend: "triton" or "cute"; config: that backend's config object; source: "pinned" (the
    caller's), "cache" (the user's tuned cache), "shipped" (the package's tuned tables) or
    "heuristic" (the deterministic rules)."""

    backend: str
    config: object
    source: str


def pinned(op: str, config, check: Callable[[], tuple[bool, str]]) -> Choice:
    """A pinned config: its backend runs it (a CuTe config only where ``check`` says the CuTe
    kernel can run these tensors; else a ValueError naming ``op`` and why)."""
    if config.backend == "cute":
        ok, why = check()
        if not ok:
            raise ValueError(f"{op}: backend='cute' cannot run this call: {why}")
    return Choice(config.backend, config, "pinned")


def tuned(name: str, problem, device: torch.device, backend: str, check: Callable[[], tuple[bool, str]],
          parse: Callable[[str], object], fits: dict, slots: tuple | None = None) -> Choice | None:
    """The tuned entry for ``problem`` on ``device`` (``cache.lookup_or_autotune``), or None.

    "auto" takes the entry's best, then its best Triton config; a forced backend takes that
    backend's slot, then the best if it is of that backend. A config that runs on CuTe (the CuTe
    backend, or a config whose ``uses_cute`` is true) that ``check`` says cannot run here moves
    on to the next slot; a config that does not parse, or that
    its backend's ``fits[backend](problem, config)`` refuses, warns once and is skipped.
    ``name``: the op's key prefix ("fc1", "fc2", "routed"); ``slots``: the entry's slots to try
    instead (the routed op's: its best, then its fastest without CuTe, "no_cute")."""
    if not cache.tuned_lookups_enabled():
        return None
    key = cache.make_key(name, cache.device_name(device), problem)
    entry, where = cache.lookup_or_autotune(key, problem, device)
    if entry is None:
        return None
    for slot in slots or (("best", "triton") if backend == "auto" else (backend, "best")):
        item = entry.get(slot)
        if not item:
            continue
        try:
            cfg = parse(item["config"])
        except Exception as exc:  # noqa: BLE001 - any malformed entry: warn, fall back
            cache.warn_stale(key, f"config {item.get('config')!r} does not parse ({type(exc).__name__}: {exc})")
            return None
        if backend != "auto" and cfg.backend != backend:
            continue
        if (cfg.backend == "cute" or getattr(cfg, "uses_cute", False)) and not check()[0]:
            continue  # fine on the tuning machine, not for these tensors here: next slot
        ok, why = fits[cfg.backend](problem, cfg)
        if ok:
            return Choice(cfg.backend, cfg, where)
        cache.warn_stale(key, f"config {item['config']!r} does not fit this problem ({why})")
    return None
