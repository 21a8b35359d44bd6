"""The README's code runs as written: every ```python block of README.md (and of docs/usage.md,
where the ops' example moved) in a fresh interpreter (a GPU when there is one, else the CPU
through Triton's interpreter, TRITON_INTERPRET=1, set before the block imports densemoe), and the
README's install-and-test commands are CI's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USAGE = ROOT / "docs" / "usage.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```\s*$", text, flags=re.S | re.M)


README_BLOCKS = python_blocks(README.read_text())
USAGE_BLOCKS = python_blocks(USAGE.read_text())
BLOCKS = README_BLOCKS + USAGE_BLOCKS
BLOCK_IDS = [f"readme{i}" for i in range(len(README_BLOCKS))] + [f"usage{i}" for i in range(len(USAGE_BLOCKS))]


def test_readme_has_python_blocks():
    assert len(README_BLOCKS) >= 4, "the quick start's blocks: transformers, DenseMoE, fused_experts, the layer"
    assert len(USAGE_BLOCKS) >= 1, "docs/usage.md's example of the ops"


def test_readme_holds_the_commands_ci_runs():
    """`.ci/run` runs exactly the README's two install-and-test commands."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python ")]
    assert ci == ['python -m pip install -e ".[dev]"', "python -m pytest -q tests"], ci
    bash = re.findall(r"^```bash\n(.*?)^```\s*$", README.read_text(), flags=re.S | re.M)
    assert any([line.strip() for line in block.splitlines() if line.strip()] == ci for block in bash), \
        "README.md must hold CI's two commands, verbatim, as one ```bash block"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=BLOCK_IDS)
def test_readme_block_runs(index, tmp_path):
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(BLOCKS[index])
    env = dict(os.environ)
    env.pop("DENSEMOE_NO_HF_REGISTER", None)  # the blocks rely on `import densemoe` registering in transformers
    env["DENSEMOE_CACHE_DIR"] = str(tmp_path / "cache")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"block {BLOCK_IDS[index]} failed:\n{BLOCKS[index]}\n--- stderr ---\n{res.stderr[-6000:]}"
