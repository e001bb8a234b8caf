"""A results folder: ``metrics.json`` (flat named figures), ``report.md`` and PNG plots.

Every package's ``demo`` and ``bench`` commands write one of these; the docs and the combined
``nox -s report`` read ``metrics.json``, so metric names are a public contract.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from verger.core.bench.timing import Timing
from verger.core.files import atomic_write_bytes, atomic_write_json, atomic_write_text

_NAME = re.compile(r"^[A-Za-z0-9_.\-/]+$")
Scalar = int | float | bool | str


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Render rows (dicts sharing keys; the first row's keys are the columns) as Markdown."""
    if not rows:
        return "_(no rows)_\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class Report:
    """Collects metrics, tables, notes and plots, then writes them atomically to ``out_dir``.

    >>> report = Report("build/bench/core", title="verger-core bench")
    >>> report.metric("matmul_speedup", 1.8)
    >>> report.write()  # metrics.json, report.md (plots are saved by .plot())
    """

    def __init__(self, out_dir: str | Path, *, title: str = "Report") -> None:
        self.out_dir = Path(out_dir)
        self.title = title
        self.metrics: dict[str, Scalar] = {}
        self._sections: list[str] = []
        self._plots: list[str] = []

    @property
    def plot_files(self) -> list[str]:
        """The file names of the plots saved so far (``<name>.png``)."""
        return list(self._plots)

    def metric(self, name: str, value: Scalar) -> None:
        """Record one named figure (names: letters, digits, ``_ . - /``; floats must be finite)."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"metric name {name!r} must match {_NAME.pattern}")
        if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
            value = value.item()
        if not isinstance(value, int | float | bool | str):
            raise TypeError(
                f"metric {name!r}: value of type {type(value).__name__} is not int/float/bool/str"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metric {name!r}: value {value} is not finite (JSON cannot hold it)")
        self.metrics[name] = value

    def metrics_from(self, values: Mapping[str, Scalar], *, prefix: str = "") -> None:
        """Record several figures, each name prefixed with ``prefix``."""
        for name, value in values.items():
            self.metric(prefix + name, value)

    def text(self, markdown: str) -> None:
        """Append a free Markdown paragraph to the report."""
        self._sections.append(markdown.rstrip() + "\n")

    def table(self, title: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append a titled Markdown table (rows are dicts with the same keys)."""
        self._sections.append(f"### {title}\n\n{markdown_table(rows)}")

    def timings(
        self, title: str, timings: Mapping[str, Timing], *, baseline: str | None = None
    ) -> None:
        """Append a table of medians (ms), spreads and speedups over ``baseline`` if given."""
        base = timings[baseline] if baseline is not None else None
        rows = []
        for name, t in timings.items():
            row: dict[str, Any] = {
                "name": name,
                "median ms": t.median_s * 1e3,
                "IQR ms": t.iqr_s * 1e3,
                "repeats": t.repeats,
            }
            if base is not None:
                row[f"speedup vs {baseline}"] = t.speedup_over(base)
            rows.append(row)
        self.table(title, rows)

    def plot(self, name: str, fig: Any, *, dpi: int = 120) -> Path:
        """Save a matplotlib figure as ``out_dir/<name>.png`` (atomically), close it, link it."""
        if not isinstance(name, str) or not _NAME.match(name) or "/" in name:
            raise ValueError(
                f"plot name {name!r} must be a plain file stem matching {_NAME.pattern}"
            )
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        import matplotlib.pyplot as plt  # lazy: importing pyplot is slow

        plt.close(fig)
        path = self.out_dir / f"{name}.png"
        atomic_write_bytes(path, buf.getvalue())
        if path.name not in self._plots:
            self._plots.append(path.name)
        self._sections.append(f"![{name}]({name}.png)\n")
        return path

    def render(self) -> str:
        """The report's Markdown: title, the metrics table, then sections in order."""
        parts = [f"# {self.title}\n"]
        if self.metrics:
            rows = [{"metric": f"`{k}`", "value": v} for k, v in self.metrics.items()]
            parts.append("## Metrics\n\n" + markdown_table(rows))
        if self._sections:
            parts.append("## Details\n")
            parts += self._sections
        return "\n".join(parts)

    def write(self) -> Path:
        """Write ``metrics.json`` and ``report.md`` atomically; returns the output folder."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out_dir / "metrics.json", self.metrics)
        atomic_write_text(self.out_dir / "report.md", self.render())
        return self.out_dir


def new_figure(*, width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    """A headless (Agg) matplotlib figure and axes: ``fig, ax = new_figure()``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    return fig, ax
