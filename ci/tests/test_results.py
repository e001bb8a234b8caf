"""ci/results.py: the combined report and docs results page from metrics.json files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import results


def write_run(build: Path, kind: str, member: str, metrics: object, plots: int = 0) -> Path:
    folder = build / kind / member
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    for i in range(plots):
        (folder / f"plot{i}.png").write_bytes(b"png")
    return folder


def test_every_member_gets_a_section_and_missing_runs_say_so(tmp_path: Path) -> None:
    write_run(tmp_path, "demo", "a", {"loss": 0.123456, "steps": 10, "ok": True}, plots=2)
    text, found = results.render(["a", "b"], tmp_path, title="T")
    assert found == 1
    assert text.startswith("# T\n")
    a, b = text.split("## a\n")[1].split("## b\n")
    assert "| `loss` | 0.1235 |" in a and "| `steps` | 10 |" in a and "| `ok` | true |" in a
    assert '**bench**: not yet run (`uvx nox -s "bench(a)"`).' in a
    assert "not yet run" in b and b.count("not yet run") == 2
    assert "plot0" not in text  # no asset mapper: nothing linked


def test_assets_link_plots_and_reports(tmp_path: Path) -> None:
    folder = write_run(tmp_path, "bench", "a", {"speedup": 2.0}, plots=1)
    (folder / "report.md").write_text("# r\n")
    seen: list[Path] = []

    def asset(path: Path) -> str | None:
        seen.append(path)
        return None if path.suffix == ".md" else "x/" + path.name

    text, _ = results.render(["a"], tmp_path, title="T", asset=asset)
    assert "![a bench: plot0](x/plot0.png)" in text
    assert "Full report" not in text  # the mapper refused report.md
    assert folder / "report.md" in seen


def test_pending_reason_replaces_not_yet_run(tmp_path: Path) -> None:
    text, found = results.render(["a"], tmp_path, title="T", pending={"a": "no CLI yet"})
    assert found == 0 and text.count("no CLI yet.") == 2 and "not yet run" not in text


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "unreadable metrics.json"), ("[1, 2]", "holds a list")],
)
def test_bad_metrics_are_reported_not_fatal(tmp_path: Path, content: str, message: str) -> None:
    folder = tmp_path / "demo" / "a"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(content)
    text, found = results.render(["a"], tmp_path, title="T")
    assert found == 1 and message in text


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (1.0 / 3.0, "0.3333"),
        (12345678.0, "1.235e+07"),
        (math.nan, "nan"),
        (False, "false"),
        (7, "7"),
        ("a|b", "a\\|b"),
        ([1, 2], "[1, 2]"),
    ],
)
def test_format_value(value: object, shown: str) -> None:
    assert results.format_value(value) == shown


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.md"
    results.write_atomic(target, "one")
    results.write_atomic(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.md"]
