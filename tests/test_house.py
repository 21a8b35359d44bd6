"""The shape of the package, checked from its source: the import graph has no circle, kernel files
are leaves (no kernel file imports another backend's, nor anything above the kernels), the
runtime never imports the benchmark harness, the references are a leaf, and ``import densemoe``
queries no GPU. Imports inside functions count as much as those at the top of a module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "densemoe"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / PKG).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its source)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                # "from a.b import c": the module a.b.c if there is one, else a.b
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t == PKG or t.startswith(PKG + "."):
                    while t not in mods and "." in t:
                        t = t.rsplit(".", 1)[0]
                    if t in mods and t != name:
                        deps.add(t)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_imports():
    g = _graph()
    assert "densemoe.kernels.triton.routing" in g["densemoe.routing"]  # imported inside a custom op
    assert "densemoe.tuning.precompile" in g["densemoe.tuning.tuner"]  # imported inside tune()


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_kernels_are_leaves():
    """A kernel file imports only the runtime facts, the kernels' common leaf and its own
    backend's files: never another backend's kernel file, and nothing above the kernels."""
    g = _graph()
    allowed_everywhere = {"densemoe._runtime", "densemoe.kernels.common", "densemoe.kernels"}
    for name, deps in g.items():
        if not name.startswith("densemoe.kernels."):
            continue
        backend = name.split(".")[2] if name.count(".") >= 3 else None  # triton / cute / None (common)
        for d in deps - allowed_everywhere:
            assert backend is not None and d.startswith(f"densemoe.kernels.{backend}"), f"{name} imports {d}"


def test_the_runtime_never_imports_the_benchmarks():
    for name, deps in _graph().items():
        if name.startswith("densemoe.bench"):
            continue
        assert not [d for d in deps if d.startswith("densemoe.bench")], name


def test_each_decision_has_one_home():
    """The references and the timer are leaves of the package (they import no densemoe module that
    could import them back); the strategy rule reads only the tuning cache (the crossovers the
    tuner recorded); the ops read the tuning cache, never the tuner."""
    g = _graph()
    assert g["densemoe.reference"] == set()
    assert g["densemoe.ops.strategy"] == {"densemoe.tuning.cache"}
    assert g["densemoe.timing"] == set()
    for name, deps in g.items():
        if name.startswith(("densemoe.ops", "densemoe.kernels")):
            assert not [d for d in deps if d.startswith("densemoe.tuning") and d != "densemoe.tuning.cache"], name


_NO_GPU_QUERY = textwrap.dedent("""
    import torch

    def refuse(*a, **k):
        raise AssertionError("a GPU query at import")

    for name in ("get_device_properties", "get_device_name", "get_device_capability", "current_device",
                 "device_count", "set_device", "synchronize", "mem_get_info"):
        setattr(torch.cuda, name, refuse)
    import densemoe, densemoe.bench, densemoe.bench.fc2, densemoe.bench.layer, densemoe.bench.skip  # noqa: E401
    print("imported", densemoe.__version__)
""")


def test_import_queries_no_gpu():
    env = dict(os.environ, DENSEMOE_NO_HF_REGISTER="1")
    r = subprocess.run([sys.executable, "-c", _NO_GPU_QUERY], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("module", ["densemoe.kernels.cute.hopper", "densemoe.kernels.cute.fc1_sm90",
                                    "densemoe.kernels.cute.fc2_sm90"])
def test_cute_modules_import_without_cute_dsl(module):
    """The configs and ``can_implement`` of the CuTe backend work where CuTe DSL is missing."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["cutlass"] = None  # an import of cutlass now fails
        import importlib
        m = importlib.import_module({module!r})
        from densemoe.kernels.cute import hopper
        assert not hopper.cute_available()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, DENSEMOE_NO_HF_REGISTER="1"))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_probes_and_bench_scripts_import_what_exists():
    """The probes that documents cite (bench/probes) and the scripts beside them import only
    names the package has: a reorganisation that moves a name must take them along."""
    import importlib

    bench = Path(__file__).resolve().parents[1] / "bench"
    missing = []
    for path in sorted(bench.glob("probes/*.py")) + sorted(bench.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PKG):
                mod = importlib.import_module(node.module)
                for a in node.names:
                    if not hasattr(mod, a.name):
                        try:
                            importlib.import_module(f"{node.module}.{a.name}")
                        except ImportError:
                            missing.append(f"{path.name}:{node.lineno} {node.module}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(PKG):
                        importlib.import_module(a.name)
    assert missing == []
