"""Tuned configs on disk: keys, the user's cache, the tables shipped with the package.

Key (one string): op, device name, input and output dtypes, N, K, E, the M bucket, and the
versions of densemoe, Triton and CuTe DSL (``none`` when it is not installed). A config tuned
under other versions is not used: the key does not match, and the heuristic runs instead.

Files, same format (``{"format": 1, "entries": {key: entry}}``):

* the user's cache, ``$DENSEMOE_CACHE_DIR/tuned.json`` (default: ``$XDG_CACHE_HOME/densemoe``
  or ``~/.cache/densemoe``), written by ``densemoe.tune``;
* the shipped tables, ``densemoe/tuning/tables/*.json``, used when the user's cache has no entry.

Writes take an exclusive lock on ``tuned.json.lock`` (``fcntl``; two processes tuning at once
both keep their entries), re-read the file under the lock, merge, write a temporary file in the
same directory and ``os.replace`` it over the old one, so a reader never sees half a file. A file
that does not parse, or has another format, gives one warning per path and process and is
treated as empty: the heuristic runs, nothing crashes. An entry whose config no longer parses or
fits the problem gives one warning and is skipped.

An entry: ``{"best": {"backend", "config", "us"}, "triton": {...}, "cute": {...},
"heuristic": {"backend", "config", "us"}, "m": tuned M, "device": ..., "time": ...}``: the
overall winner, each backend's best, and what the heuristic picked, as measured.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from densemoe.tuning.buckets import m_bucket

FORMAT = 1
ENV_CACHE_DIR = "DENSEMOE_CACHE_DIR"
ENV_AUTOTUNE = "DENSEMOE_AUTOTUNE"
ENV_TUNED = "DENSEMOE_TUNED"
FILE_NAME = "tuned.json"
TABLES_DIR = Path(__file__).resolve().parent / "tables"

_DTYPE_NAMES = {torch.float8_e4m3fn: "fp8", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_warned: set[str] = set()


def _warn_once(tag: str, msg: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _env_flag(name: str) -> bool | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    return v.strip().lower() not in ("0", "false", "no", "off")


def tuned_lookups_enabled() -> bool:
    """``DENSEMOE_TUNED=0`` turns every tuned lookup off (heuristic only, for comparisons)."""
    return _env_flag(ENV_TUNED) is not False


def autotune_enabled() -> bool:
    """``DENSEMOE_AUTOTUNE=1``: tune a missing key on first use (never during graph capture)."""
    return bool(_env_flag(ENV_AUTOTUNE))


def cache_dir() -> Path:
    d = os.environ.get(ENV_CACHE_DIR)
    if d:
        return Path(d).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "densemoe"


def cache_path() -> Path:
    return cache_dir() / FILE_NAME


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Versions that make a tuned entry valid (part of the key)."""
    import importlib.metadata as md

    import triton

    from densemoe._version import __version__

    try:
        cute = md.version("nvidia-cutlass-dsl")
    except md.PackageNotFoundError:
        cute = "none"
    return {"densemoe": __version__, "triton": triton.__version__, "cutedsl": cute}


@functools.lru_cache(maxsize=16)
def device_name(device: torch.device) -> str:
    """The key's device part: the CUDA device name, or ``cpu`` (Triton's interpreter)."""
    if device.type != "cuda":
        return device.type
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(idx)


# keys that do not depend on whether CuTe DSL is installed: the routed path has no CuTe backend;
# a strategy crossover chooses between pipelines that differ by multiples (docs/routed.md, "The
# rule"), which CuTe's FC2 on a few dense buckets does not move, and the shipped crossovers must
# reach users with the [cute] extra as well as without
CUTE_INDEPENDENT_OPS = ("routed", "strategy")


@functools.lru_cache(maxsize=4096)
def make_key(op: str, device: str, problem) -> str:
    """The cache key of ``problem`` (an ``Fc1Problem``, ``Fc2Problem`` or ``RoutedProblem``) on
    ``device`` (a name). An op in ``CUTE_INDEPENDENT_OPS`` keys ``cutedsl=unused``."""
    p = problem
    v = dict(versions())
    if op in CUTE_INDEPENDENT_OPS:
        v["cutedsl"] = "unused"
    return (f"{op}|{device}|{_DTYPE_NAMES.get(p.dtype, str(p.dtype))}->{_DTYPE_NAMES.get(p.out_dtype, str(p.out_dtype))}"
            f"|N={p.n}|K={p.k}|E={p.e}{f'|topk={p.top_k}' if hasattr(p, 'top_k') else ''}{f'|block={p.block}' if getattr(p, 'block', 0) else ''}|M<={m_bucket(p.m)}"
            f"|densemoe={v['densemoe']}|triton={v['triton']}|cutedsl={v['cutedsl']}")


# ------------------------------------------------------------------------------------ files

def read_file(path: Path) -> dict:
    """The entries of one tuning file ({} when missing; {} and one warning when unreadable)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        _warn_once(f"read:{path}", f"densemoe: cannot read tuning file {path} ({exc}); using the heuristic")
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            raise ValueError(f"not a format-{FORMAT} densemoe tuning file")
    except ValueError as exc:
        _warn_once(f"read:{path}", f"densemoe: ignoring tuning file {path} ({exc}); using the heuristic "
                   f"(densemoe.tune rewrites it)")
        return {}
    return data["entries"]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): the atomic replace still never tears a file
        yield
        return
    with open(str(path) + ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def write_entries(path: Path, entries: dict) -> None:
    """Merge ``entries`` into the file at ``path``: locked, re-read, merged, atomically replaced."""
    with _locked(path):
        merged = read_file(path)
        merged.update(entries)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": FORMAT, "entries": merged}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    reload()


def _unversioned(key: str) -> str:
    return "|".join(part for part in key.split("|") if not part.startswith(_VERSION_PARTS))


_VERSION_PARTS = ("densemoe=", "triton=", "cutedsl=")


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[dict, dict, dict]:
    """(user cache entries, shipped entries, {key without versions: a key with them}), read once
    per process (``reload`` re-reads)."""
    shipped: dict = {}
    if TABLES_DIR.is_dir():
        for f in sorted(TABLES_DIR.glob("*.json")):
            shipped.update(read_file(f))
    user = read_file(cache_path())
    other = {_unversioned(k): k for k in (*shipped, *user)}
    return user, shipped, other


def reload() -> None:
    """Forget what was read (after another process tuned, or the env changed)."""
    _tables.cache_clear()
    lookup.cache_clear()


@functools.lru_cache(maxsize=4096)
def lookup(key: str) -> tuple[dict | None, str]:
    """(entry, where): the user's cache first, then the shipped tables; (None, "") if neither.
    Memoised per key until ``reload`` (or a write by this process)."""
    user, shipped, other = _tables()
    if key in user:
        return user[key], "cache"
    if key in shipped:
        return shipped[key], "shipped"
    stale = other.get(_unversioned(key))
    if stale is not None:
        have = "|".join(p for p in stale.split("|") if p.startswith(_VERSION_PARTS))
        want = "|".join(p for p in key.split("|") if p.startswith(_VERSION_PARTS))
        _warn_once(f"versions:{_unversioned(key)}", f"densemoe: the tuned entry for {_unversioned(key)} was "
                   f"made with {have}, this is {want}; using the heuristic (re-tune with densemoe.tune)")
    return None, ""


# The autotune-on-miss hook (``DENSEMOE_AUTOTUNE=1``): ``densemoe.tuning.tuner`` installs it, so
# the ops, which only read entries, never import the tuner.
_autotuner = None


def set_autotuner(fn) -> None:
    """``fn(problem, device)`` tunes one problem and records its entry (``tuner.tune_problem``)."""
    global _autotuner
    _autotuner = fn


def lookup_or_autotune(key: str, problem, device: torch.device) -> tuple[dict | None, str]:
    """``lookup(key)``; on a miss with ``DENSEMOE_AUTOTUNE=1`` on a CUDA device, tune the problem
    first (never while a CUDA graph is being captured: capture never starts tuning)."""
    entry, where = lookup(key)
    if (entry is None and _autotuner is not None and autotune_enabled() and device.type == "cuda"
            and not torch.cuda.is_current_stream_capturing()):
        _autotuner(problem, device)
        entry, where = lookup(key)
    return entry, where


def record(key: str, entry: dict, path: Path | None = None) -> None:
    write_entries(path or cache_path(), {key: entry})


def warn_stale(key: str, why: str) -> None:
    _warn_once(f"stale:{key}", f"densemoe: ignoring tuned entry {key}: {why}; using the heuristic "
               f"(re-tune with densemoe.tune)")
