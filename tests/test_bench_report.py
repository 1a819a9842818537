"""The README's Performance and tuning tables are what bench/report.py renders from the committed
bench/results.json, so that no figure in them is typed by hand or left from an earlier run."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def report() -> ModuleType:
    # By path: bench/ is scripts, not a package, and `bench` would name its folder.
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_readme_blocks_are_rendered_from_results(report: ModuleType) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    results = json.loads((REPO / "bench" / "results.json").read_text(encoding="utf-8"))
    assert report.render_readme(readme, results) == readme, "run `python bench/report.py` after changing results.json"


def test_every_row_renders_from_results(report: ModuleType) -> None:
    """Each workload shows this run's figure or a dated one: a key renamed in bench/ without
    report.py would otherwise leave its cell empty."""
    results = json.loads((REPO / "bench" / "results.json").read_text(encoding="utf-8"))
    src = report.Sources(results)
    for row in report.ROWS:
        assert src.cell(row.now), row.workload


def test_a_figure_the_run_lacks_comes_from_history_marked_and_dated(report: ModuleType) -> None:
    row = report.Row("W", [lambda f: f"{f['a']:.1f} s", lambda f: f"slow {f['b']:.0f} s"])
    results = {
        "engine": "1.1.0",
        "a": 1.0,
        "history": [
            {"when": "2026-11-01T10:00:00+00:00", "engine": "1.0.0", "note": "n1", "figures": {"a": 2.0, "b": 9.0}},
        ],
    }
    src = report.Sources(results)
    assert src.cell(row.now) == "1.0 s; slow 9 s ᵃ"
    assert src.before(row) == "2.0 s; slow 9 s ᵃ"
    assert src.notes() == ["ᵃ 2026-11-01 10:00 UTC, engine 1.0.0: n1."]


def test_the_previous_run_joins_history_when_the_engine_changes(report: ModuleType) -> None:
    old = {"engine": "1.0.0", "when": "2026-11-01T10:00:00+00:00", "machine": "m", "a": 2.0, "history": []}
    partial = {"when": "2026-11-02", "engine": "1.1.0", "note": "alone", "figures": {"a": 1.5}}
    undated_baseline = {"when": "2026-10-01", "note": "once", "figures": {"b": 9.0}}
    old["history"] = [partial, undated_baseline]

    new = report.with_history({"engine": "1.1.0", "when": "2026-11-03", "a": 1.0}, old)

    assert [h.get("engine") for h in new["history"]] == ["1.0.0", None]
    assert new["history"][0]["figures"] == {"a": 2.0}
    # Snapshots stay in date order; the earlier-engine column takes the latest engine before this one.
    newer = report.with_history({"engine": "1.2.0", "when": "2026-11-05", "a": 0.9}, {**old, "engine": "1.1.5"})
    assert [h.get("engine") for h in newer["history"]] == ["1.1.0", "1.1.5", None]
    row = report.Row("W", [lambda f: f"{f['a']:.1f} s"])
    assert report.Sources(newer).before(row) == "2.0 s ᵃ"
    # Another run of the same engine replaces the previous one instead of piling up.
    again = report.with_history({"engine": "1.1.0", "when": "2026-11-04", "a": 1.1}, new)
    assert again["history"] == new["history"]
