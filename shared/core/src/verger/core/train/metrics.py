"""Training metrics to JSON Lines (always) and TensorBoard (when installed)."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep it visible as "nan" / "inf"
    return value


class MetricsLogger:
    """Append ``{"step": s, "time": t, **values}`` records to ``<dir>/metrics.jsonl``.

    ``tensorboard=None`` also writes TensorBoard events under ``<dir>/tb`` when the
    ``tensorboard`` package is importable; ``True`` requires it; ``False`` never uses it.
    Each record is flushed as it is written, so a killed run keeps every logged step (a
    partially written last line is skipped by :func:`read_metrics`).
    """

    def __init__(self, log_dir: str | Path, *, tensorboard: bool | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._tb: Any = None
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.log_dir / "tb"))
            except ImportError as exc:  # optional unless asked for: JSONL is the contract
                if tensorboard:
                    raise ImportError(
                        "tensorboard=True but the tensorboard package is not installed: "
                        "pip install tensorboard"
                    ) from exc

    @property
    def has_tensorboard(self) -> bool:
        return self._tb is not None

    def log(self, step: int, **values: Any) -> None:
        """Write one record for ``step``; numbers also go to TensorBoard as scalars."""
        record = {"step": int(step), "time": time.time()}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                value = _plain(value)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file; a torn last line (killed writer) is skipped with a warning."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
            warnings.warn(f"{path}: skipping a truncated last line", stacklevel=2)
    return records
