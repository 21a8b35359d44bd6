"""Test set-up.

Without a GPU the kernels run on the CPU through Triton's interpreter, which must be switched on
before any @triton.jit function is defined, hence here, before densemoe is imported (``import
densemoe`` then applies its fixes to the interpreter's numerics: ``densemoe/_interpreter.py``).
GPU tests (marker ``gpu``) run in a separate process without the interpreter (see README).
"""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# CuTe DSL reads these when it is imported: without a GPU, compile for Hopper (sm_90a); keep the
# PTX of every compile in a scratch directory so the compile tests can inspect it.
if not torch.cuda.is_available():
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
os.environ.setdefault("CUTE_DSL_KEEP", "ptx,ir")
os.environ.setdefault("CUTE_DSL_DUMP_DIR", tempfile.mkdtemp(prefix="densemoe_cute_"))

# Hermetic tuning lookups: an empty cache of our own, never the developer's ~/.cache/densemoe
# (tests that need entries write them into their own directory).
os.environ["DENSEMOE_CACHE_DIR"] = tempfile.mkdtemp(prefix="densemoe_cache_")
atexit.register(shutil.rmtree, os.environ["DENSEMOE_CACHE_DIR"], True)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter: runs the Triton kernels on the CPU (needs TRITON_INTERPRET=1)")


def pytest_collection_modifyitems(config, items):
    """GPU tests need CUDA and no interpreter; CPU-kernel tests need the interpreter."""
    has_gpu = torch.cuda.is_available() and not INTERPRET
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU and TRITON_INTERPRET unset"))
        if "interpreter" in item.keywords and not INTERPRET:
            item.add_marker(pytest.mark.skip(reason="runs the kernels on the CPU: set TRITON_INTERPRET=1"))


def pytest_runtest_logreport(report):
    """``DENSEMOE_FAILURES=<file>``: each failing test's report is appended to the file as it
    arrives (with pytest-xdist, in the controller), so a run cut by a timeout still says which
    tests failed and why (the device runs of the fuzz suite: bench/h200_next.sh)."""
    path = os.environ.get("DENSEMOE_FAILURES")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
