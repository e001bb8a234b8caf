"""Combine the members' ``metrics.json`` files into one Markdown page (stdlib only).

``python -m verger.<name> demo|bench --out build/<kind>/<name>`` writes a flat JSON object of
named figures. The ``report`` nox session renders them into ``build/report.md``; the docs
generator renders the same page (with the plots copied into the site) as ``results.md``.
Members that have not run yet get an explicit "not yet run" line, never a silent gap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

KINDS = ("demo", "bench")


@dataclass
class Run:
    """One ``build/<kind>/<member>/`` output folder."""

    kind: str
    member: str
    folder: Path
    metrics: dict[str, object] = field(default_factory=dict)
    error: str | None = None  # set when metrics.json is missing or unreadable
    plots: list[Path] = field(default_factory=list)
    when: str = ""


def load_run(build: Path, kind: str, member: str) -> Run | None:
    """The run of ``member``'s ``kind`` command under ``build``, or None if it never ran."""
    folder = build / kind / member
    metrics_file = folder / "metrics.json"
    if not metrics_file.is_file():
        return None
    run = Run(kind=kind, member=member, folder=folder, plots=sorted(folder.glob("*.png")))
    stamp = datetime.fromtimestamp(metrics_file.stat().st_mtime, tz=UTC)
    run.when = stamp.strftime("%Y-%m-%d %H:%M UTC")
    try:
        data = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        run.error = f"unreadable metrics.json ({exc})"
        return run
    if not isinstance(data, dict):
        run.error = f"metrics.json holds a {type(data).__name__}, expected a flat JSON object"
        return run
    run.metrics = data
    return run


def format_value(value: object) -> str:
    """A compact, table-safe rendering of one metric value."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return value.__repr__() if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, int | str):
        return str(value).replace("|", "\\|")
    return json.dumps(value).replace("|", "\\|")


def render(
    members: Iterable[str],
    build: Path,
    *,
    title: str,
    asset: Callable[[Path], str | None] | None = None,
    pending: Mapping[str, str] | None = None,
) -> tuple[str, int]:
    """The Markdown page for ``members`` and the number of runs found.

    ``asset`` maps a file under ``build`` (a plot, a run's report.md) to the link used in the
    page, or to None to leave that file out; without ``asset`` no files are linked.
    ``pending`` gives, per member, why it has no runs yet (shown instead of "not yet run").
    """
    pending = pending or {}
    lines = [f"# {title}", ""]
    lines += [
        "Figures from each package's `python -m verger.<name> demo|bench --out "
        "build/<kind>/<name>` run (`uvx nox -s demo`, `uvx nox -s bench`), read from its "
        "`metrics.json`; the metric names are listed in each package's README. "
        "Measured on whatever machine ran the command: compare ratios, not absolute times.",
        "",
    ]
    found = 0
    for member in members:
        lines += [f"## {member}", ""]
        for kind in KINDS:
            run = load_run(build, kind, member)
            if run is None and member in pending:
                lines += [f"**{kind}**: {pending[member]}.", ""]
                continue
            if run is None:
                lines += [f'**{kind}**: not yet run (`uvx nox -s "{kind}({member})"`).', ""]
                continue
            found += 1
            lines += [f"**{kind}** ({run.when})", ""]
            if run.error:
                lines += [f"Error: {run.error}.", ""]
                continue
            lines += ["| metric | value |", "| --- | --- |"]
            lines += [f"| `{k}` | {format_value(v)} |" for k, v in run.metrics.items()]
            lines.append("")
            if asset is None:
                continue
            report = run.folder / "report.md"
            link = asset(report) if report.is_file() else None
            if link:
                lines += [f"Full report: [{kind}/{member}/report.md]({link})", ""]
            for plot in run.plots:
                if link := asset(plot):
                    lines += [f"![{member} {kind}: {plot.stem}]({link})", ""]
    return "\n".join(lines).rstrip() + "\n", found


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def pending_reasons(members: Iterable[Any]) -> dict[str, str]:
    """Why each workspace member without a ``__main__`` has no runs (for :func:`render`)."""
    return {m.short: f"no `python -m {m.module}` command yet" for m in members if not m.has_cli}


def write_report(members: list[Any], build: Path) -> tuple[Path, int]:
    """Render every member's runs under ``build`` into ``build/report.md``; (path, runs found)."""
    text, found = render(
        [m.short for m in members],
        build,
        title="verger: combined report",
        asset=lambda p: p.relative_to(build).as_posix(),
        pending=pending_reasons(members),
    )
    target = build / "report.md"
    write_atomic(target, text)
    return target, found
