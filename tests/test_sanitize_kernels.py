"""bench/sanitize_kernels.py, the driver compute-sanitizer runs (bench/sanitize_gpu.sh): its
numbered list, a range of it, and the skipping variants it promises (docs/trust.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def driver(*args: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sanitize_kernels.py"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.interpreter
def test_the_list_is_numbered_and_a_range_runs_just_those_launches():
    listed = driver("--list").splitlines()
    numbered = [line.split(" ", 1) for line in listed if not line.startswith("#")]
    assert [int(i) for i, _ in numbered] == list(range(len(numbered)))
    assert listed[-1] == f"# {len(numbered)} launches"
    names = dict(numbered)
    # FC2 and FC1 with expert skipping, per Triton config (until 2026-12-05 a check on the config
    # string's prefix, which Triton configs do not carry, left every one of them out)
    skips = [i for i, n in numbered if n.endswith(" skip") and n.startswith(("fc1", "fc2"))]
    assert len(skips) >= 20
    start = int(skips[0]) - 1  # the skipping launch and the plain one before it
    out = driver("--from", str(start), "--to", str(start + 2))
    ran = re.findall(r"^ok (\d+) [\d.]+ (.*)$", out, flags=re.M)
    assert [(int(i), n) for i, n in ran] == [(start, names[str(start)]), (start + 1, names[str(start + 1)])]
    assert "# 2 launches checked on cpu" in out and f"(of {len(numbered)}, from {start})" in out


@pytest.mark.interpreter
def test_the_list_holds_block_scaled_fp8_and_x_quantised_in_the_schedule():
    """Block-scaled fp8 (the routed path per signature, the skip and dense paths) and the routed
    op handed x unquantised (x's quantisation in the schedule's launch) are in the list, and one of
    each runs and passes its check on the interpreter (until the nineteenth session neither was
    in the list, so no sanitizer saw those kernels)."""
    numbered = [line.split(" ", 1) for line in driver("--list").splitlines() if not line.startswith("#")]
    names = {n: int(i) for i, n in numbered}
    block = [n for n in names if n.startswith("routed fp8block M=") and not n.endswith("x-in-schedule")]
    assert len(block) >= 3 * 5
    for prefix in ("routed fp8 M=", "routed fp8block M="):
        assert {m for m in (1, 7, 100) if any(n.startswith(f"{prefix}{m} ") and n.endswith(" x-in-schedule")
                                                for n in names)} == {1, 7, 100}, prefix
    for strategy in ("skip", "dense"):
        assert all(f"experts fp8block {strategy} M={m}" in names for m in (1, 7, 100))
    picks = [next(n for n in names if n.startswith("routed fp8 M=7 ") and n.endswith(" x-in-schedule")),
             next(n for n in names if n.startswith("routed fp8block M=7 ") and n.endswith(" x-in-schedule")),
             "experts fp8block skip M=7"]
    for name in picks:
        i = names[name]
        out = driver("--from", str(i), "--to", str(i + 1))
        assert re.search(rf"^ok {i} [\d.]+ {re.escape(name)}$", out, flags=re.M), out[-2000:]
