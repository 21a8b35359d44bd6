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
