"""The answer of ``fc1_configs.choose`` / ``fc2_configs.choose``: which backend and config run a
call, and where the config came from."""

from __future__ import annotations

from typing import NamedTuple

SOURCES = ("pinned", "cache", "shipped", "heuristic")


class Choice(NamedTuple):
    """backend: "triton" or "cute"; config: that backend's config object; source: "pinned" (the
    caller's), "cache" (the user's tuned cache), "shipped" (the package's tuned tables) or
    "heuristic" (the deterministic rules)."""

    backend: str
    config: object
    source: str
