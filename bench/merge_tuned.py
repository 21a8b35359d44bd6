"""Merge tuned entries (a tuning-cache file brought back from the device) into a shipped table
(FC2, FC1, routed and strategy keys).

    python bench/merge_tuned.py <tuned.json> [<tuned.json> ...] [--into src/densemoe/tuning/tables/h100.json]

Entries are checked on the way: each must name a config that parses and that its backend's
``can_implement`` accepts for the key's problem (a strategy crossover: a strategy name); bad
ones are listed and left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from densemoe.kernels.common import Fc1Problem, Fc2Problem, RoutedProblem
from densemoe.kernels.cute import fc1_sm90, fc2_sm90
from densemoe.kernels.triton import fc1 as triton_fc1
from densemoe.kernels.triton import fc2 as triton_fc2
from densemoe.kernels.triton import routed as triton_routed
from densemoe.ops import fc1_configs, fc2_configs, routed_configs
from densemoe.ops.strategy import STRATEGIES
from densemoe.tuning import cache
from densemoe.tuning.tuner import MARGIN

_DT = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def problem_of(key: str):
    """The op's problem for a key: ``fc2|device|in->out|N=|K=|E=|M<=..``, ``fc1|...``, or
    ``routed|...`` / ``strategy|...`` (a ``RoutedProblem``: N = H, K = E*I, ``topk=``, ``block=``
    for block-scaled weights)."""
    parts = dict(p.split("=", 1) for p in key.split("|") if "=" in p)
    dt, out = key.split("|")[2].split("->")
    m = int(next(p for p in key.split("|") if p.startswith("M<=")).split("=")[1])
    n, k, e = int(parts["N"]), int(parts["K"]), int(parts["E"])
    if key.startswith(("routed|", "strategy|")):
        return RoutedProblem(m, n, e, k // e, int(parts["topk"]), _DT[dt], _DT[out], int(parts.get("block", 0)))
    if key.startswith("fc1|"):
        return Fc1Problem(m, k, e, n // (2 * e), _DT[dt], _DT[out])
    return Fc2Problem(m, n, e, k // e, _DT[dt], _DT[out])


def check(key: str, entry: dict) -> str:
    """The first slot whose config does not fit the key's problem (its backend's
    ``can_implement``; a crossover's: not a strategy name) and why, or an empty string when
    every slot fits."""
    p = problem_of(key)
    if key.startswith("strategy|"):
        for slot in ("best", "heuristic"):
            item = entry.get(slot)
            if item and item.get("config") not in STRATEGIES:
                return f"{slot}: {item.get('config')!r} is not one of {STRATEGIES}"
        return "" if entry.get("best") else "no best strategy"
    if key.startswith("routed|"):
        for slot in ("best", "triton", "no_cute", "heuristic"):
            item = entry.get(slot)
            if item:
                try:
                    cfg = routed_configs.parse_config(item["config"])
                except (ValueError, TypeError) as exc:
                    return f"{slot}: {exc}"
                ok, why = triton_routed.can_implement(p, cfg)
                if not ok:
                    return f"{slot}: {why}"
        return ""
    fc1 = isinstance(p, Fc1Problem)
    for slot in ("best", "triton", "cute", "heuristic"):
        item = entry.get(slot)
        if not item:
            continue
        cfg = (fc1_configs if fc1 else fc2_configs).parse_config(item["config"])
        kernel = (fc1_sm90 if fc1 else fc2_sm90) if cfg.backend == "cute" else (triton_fc1 if fc1 else triton_fc2)
        ok, why = kernel.can_implement(p, cfg)
        if not ok:
            return f"{slot}: {why}"
    return ""


def card_mismatch(key: str, into: Path) -> str:
    """Why a key's entry does not belong in the table ``into`` (empty where it does): a table
    named after a card (h100.json, h200.json) takes that card's keys only; a device call asked
    for an H200 can run on a held H100 (2026-12-06), and its keys would never match an H200."""
    card = into.stem.upper()
    device = key.split("|")[1] if key.count("|") >= 1 else ""
    if card.startswith("H") and card[1:].isdigit() and card not in device:
        return f"tuned on {device!r}, not an {card}: merge it into that card's table"
    return ""


def apply_margin(entry: dict, margin: float) -> bool:
    """The tuner's rule (tuner.MARGIN) applied to an entry recorded without it: the heuristic's
    choice stays the winner unless the best beat it by more than ``margin``. True if changed."""
    best, heur = entry.get("best"), entry.get("heuristic")
    if not best or not heur or not heur.get("us") or best["config"] == heur["config"]:
        return False
    if best["us"] * (1 + margin) >= heur["us"]:
        entry["best"] = dict(heur)
        return True
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--into", default=str(cache.TABLES_DIR / "h100.json"))
    ap.add_argument("--margin", type=float, default=None,
                    help="re-apply the tuner's heuristic margin to every entry (default: tuner.MARGIN); 0: off")
    args = ap.parse_args(argv)
    good = {}
    for f in args.files:
        raw = Path(f).read_bytes()
        if f.endswith(".gz"):  # bench/results/h200_wip/tuned.json.gz: kept gzipped (the device's carry limit)
            import gzip

            raw = gzip.decompress(raw)
        for key, entry in json.loads(raw)["entries"].items():
            margin = MARGIN if args.margin is None else args.margin
            if margin and apply_margin(entry, margin):
                print(f"kept the heuristic (within {margin:.0%}): {key.split('|densemoe')[0]}", file=sys.stderr)
            why = card_mismatch(key, Path(args.into)) or check(key, entry)
            if why:
                print(f"left out {key}: {why}", file=sys.stderr)
            else:
                good[key] = entry
    into = Path(args.into)
    cache.write_entries(into, good)
    into.chmod(0o644)  # package data: readable by every user (the cache writer makes 0600 files)
    Path(str(into) + ".lock").unlink(missing_ok=True)
    print(f"merged {len(good)} entries into {args.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
