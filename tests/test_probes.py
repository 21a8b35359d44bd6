"""The probes that check their results on a tiny shape through Triton's interpreter
(``--check``) do so in CI, so a device call does not find their bugs (bench/probes/README.md).
The sharded benchmarks' checks are in tests/test_parallel.py; the CuTe sweep needs a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.interpreter
@pytest.mark.parametrize("argv,says", [
    (["routed_fc2_rowscale.py", "--check"], "check passed"),
    (["routed_fc1_contiguous.py", "--check"], "check passed"),
    (["fc1_gate_up_one_dot.py", "--check"], "check passed"),
    (["block_dense_stages.py", "skip", "--check"], "M=7"),
    (["timing_position.py", "--check"], "check passed"),
    (["routed_fc1_vs_dense.py", "--check"], "check passed"),
])
def test_the_probe_checks_itself_on_the_cpu(argv, says):
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "probes" / argv[0]), *argv[1:]], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and says in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


@pytest.mark.cute_compile
def test_the_row_tma_probe_compiles_for_sm90a():
    """bench/probes/row_tma_gather.py --compile: CuTe DSL builds the one-row TMA atom over the
    stage's 128-byte swizzle and the producer warp issues the rows' loads, one elected lane each
    (the GPU run checks where they land)."""
    pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed (pip install -e '.[dev]')")
    env = dict(os.environ, CUTE_DSL_ARCH=os.environ.get("CUTE_DSL_ARCH", "sm_90a"))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "probes" / "row_tma_gather.py"), "--compile"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "1 one-row TMA load in the PTX's row loop, elect.sync before it" in r.stdout, \
        r.stdout[-2000:] + r.stderr[-3000:]
