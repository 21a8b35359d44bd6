"""The documents cannot drift from the committed measurements: docs/performance.md and the
README's headline table are regenerated from bench/results/ (``densemoe.bench.docs``) and
compared with the committed files; the documents' links to files in the repository resolve."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from densemoe.bench import docs
from densemoe.bench.__main__ import main as bench_main

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
REGENERATE = "python -m densemoe.bench docs --out docs/performance.md"


def test_the_sources_exist():
    for rel in (*docs.SOURCES.values(), docs.CHART):
        assert (ROOT / rel).is_file(), rel


def test_performance_md_is_regenerated_from_the_results():
    committed = (ROOT / "docs" / "performance.md").read_text()
    assert docs.performance_md(ROOT) == committed, f"docs/performance.md is stale: run `{REGENERATE}`"


def test_the_cli_writes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "performance.md"
    assert bench_main(["docs", "--out", str(out)]) == 0
    assert out.read_text() == (ROOT / "docs" / "performance.md").read_text()
    assert bench_main(["docs"]) == 0
    assert capsys.readouterr().out == out.read_text()
    monkeypatch.chdir(tmp_path)  # elsewhere: one line naming what it reads
    assert bench_main(["docs"]) == 2
    assert "repository root" in capsys.readouterr().err


def test_readme_headline_table_is_the_results():
    readme = (ROOT / "README.md").read_text()
    layer = docs.load(ROOT / docs.SOURCES["layer"])
    assert docs.headline_table(layer) in readme, "README.md's table differs from the results: paste " \
        "densemoe.bench.docs.headline_table(...)"
    meta = layer["meta"]
    for fact in (meta["device"], meta["date"].split()[0], meta["commit"], docs.SOURCES["layer"], docs.CHART):
        assert fact in readme, fact


@pytest.mark.parametrize("card, sources, table", [("H200", docs.H200_SOURCES, docs.h200_table),
                                                  ("H100", docs.H100_SOURCES, docs.h100_table)])
def test_readme_card_table_is_the_results(card, sources, table):
    """The README's per-card experts-path tables are regenerated from their result files."""
    readme = (ROOT / "README.md").read_text()
    data = {shape: docs.load_first(rel if isinstance(rel, tuple) else (rel,), ROOT) for shape, rel in sources.items()}
    assert table(data) in readme, f"README.md's {card} table differs from the results: paste " \
        f"densemoe.bench.docs.{table.__name__}(...)"
    for d in data.values():
        for meta in d["metas"]:
            assert meta["commit"] in readme and meta["date"].split()[0] in readme
            assert card in meta["device"]


def test_load_first_takes_each_point_from_the_first_file_that_has_it(tmp_path):
    a = {"meta": {"commit": "a"}, "records": [{"op": "experts", "dtype": "fp8", "M": m, "us": m} for m in (1, 16)]}
    b = {"meta": {"commit": "b"}, "records": [{"op": "experts", "dtype": "fp8", "M": m, "us": -m} for m in (16, 512)]}
    for name, d in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(d))
    got = docs.load_first(("a.json", "b.json"), tmp_path)
    assert [(r["M"], r["us"]) for r in got["records"]] == [(1, 1), (16, 16), (512, -512)]
    assert got["meta"]["commit"] == "a" and [m["commit"] for m in got["metas"]] == ["a", "b"]


def _local_links(path: Path):
    """(target, resolved path) of every relative markdown link in ``path`` (anchors dropped)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        yield target, (path.parent / target.split("#")[0]).resolve()


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS, ROOT / "bench" / "probes" / "README.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path):
    broken = [t for t, p in _local_links(path) if not p.exists()]
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files {broken}"


def test_routed_md_budget_table_is_the_scripts_output(capsys, monkeypatch):
    """docs/routed.md's per-launch bounds are what bench/routed_budget.py prints from the
    committed H200 log; the pipeline floors the text argues from are in it."""
    import runpy
    import sys

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["routed_budget.py"])
    runpy.run_path(str(ROOT / "bench" / "routed_budget.py"), run_name="__main__")
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    routed = (ROOT / "docs" / "routed.md").read_text()
    assert "\n".join(table) in routed, "docs/routed.md's budget table is stale: paste `python bench/routed_budget.py`"
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from routed_budget import SHAPES, STAGES, least_bytes
    finally:
        sys.path.pop(0)

    def floor(shape, M):
        sh = SHAPES[shape]
        b, P = least_bytes(M, **sh), M * sh["k"]
        fl = dict(fc1=4 * P * sh["I"] * sh["H"], fc2=2 * P * sh["H"] * sh["I"])
        return sum(max(b[s] / 4.57e6, fl.get(s, 0) / 1333e6) for s in STAGES)

    assert round(floor("deepseek-v3-tp8", 4096)) == 556 and "pipeline's floor is 556 us" in routed
    assert round(floor("qwen3-30b-a3b", 4096)) == 272 and "floor\n  there is 272 us" in routed
