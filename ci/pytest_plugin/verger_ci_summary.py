"""pytest plugin used by the nox test sessions: writes a one-run summary as JSON.

Loaded with ``-p verger_ci_summary`` (this folder on PYTHONPATH) and writes the counts to the
file named by ``VERGER_PYTEST_SUMMARY``, so the noxfile can print one line per member and tell
"no tests exist" (a real failure) from "every test was deselected by a marker" (fine).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the noxfile imports describe() where pytest is not installed
    import pytest

_counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0, "xpassed": 0}
_state = {"collected": 0, "deselected": 0, "start": time.perf_counter()}


def describe(summary: dict[str, Any] | None, wall: float | None = None) -> str:
    """One human line from a summary this plugin wrote (None: pytest wrote none)."""
    total = "" if wall is None else f", session {wall:.0f}s"
    if summary is None:
        return f"pytest wrote no summary (crashed or bad arguments){total}"
    parts = [f"{summary[k]} {k}" for k in ("passed", "failed", "errors", "skipped")]
    parts += [f"{summary[k]} {k}" for k in ("deselected", "xfailed", "xpassed") if summary[k]]
    return f"{', '.join(parts)}; pytest {summary['seconds']:.0f}s{total}"


def pytest_deselected(items: list[pytest.Item]) -> None:
    _state["deselected"] += len(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    _state["collected"] = len(session.items) + _state["deselected"]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if hasattr(report, "wasxfail"):
        if report.when == "call" or report.skipped:
            _counts["xpassed" if report.passed else "xfailed"] += 1
        return
    if report.failed:
        _counts["failed" if report.when == "call" else "errors"] += 1
    elif report.skipped:
        _counts["skipped"] += 1
    elif report.passed and report.when == "call":
        _counts["passed"] += 1


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _counts["errors"] += 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get("VERGER_PYTEST_SUMMARY")
    if not target:
        return
    summary = {
        **_counts,
        **_state,
        "selected": _state["collected"] - _state["deselected"],
        "exitstatus": int(exitstatus),
        "seconds": round(time.perf_counter() - _state["start"], 1),
    }
    del summary["start"]
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary), encoding="utf-8")
    tmp.replace(path)
