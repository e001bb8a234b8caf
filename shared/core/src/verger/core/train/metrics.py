"""Training metrics to JSON Lines (always) and TensorBoard (when installed)."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from verger.core.files import atomic_write_text


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
    partially written last line is skipped by :func:`read_metrics`, and cut off when a
    logger reopens the file, so that appended records start on a line of their own).

    An existing file is appended to. A run resumed from a checkpoint at step ``s`` calls
    :meth:`rewind` (``TrainLoop`` does) so the records the crashed run wrote after ``s``
    are not followed by a second copy of the same steps.
    """

    def __init__(self, log_dir: str | Path, *, tensorboard: bool | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / "metrics.jsonl"
        _cut_torn_tail(self.path)
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

    def rewind(self, step: int) -> int:
        """Drop the records logged after ``step`` (a resume from the checkpoint of ``step``).

        Records up to ``step`` stay (the loop logs a step before checkpointing it); the file
        is rewritten atomically. TensorBoard events after ``step`` are purged too (its
        ``purge_step``). Returns the number of records dropped.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step={step!r} must be an int >= 0")
        self._file.close()
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if not _after(line, step)]
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(log_dir=str(self.log_dir / "tb"), purge_step=step + 1)
        return len(lines) - len(kept)

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


def _after(line: str, step: int) -> bool:
    """Whether a JSONL record line belongs to a step after ``step`` (unparsable lines stay)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return (
        isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
    )


def _cut_torn_tail(path: Path) -> None:
    """Truncate a last line that a killed writer left without its newline.

    Appending to it would glue the next record onto the fragment and make a line in the
    middle of the file unreadable for :func:`read_metrics`.
    """
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        end = f.seek(0, 2)
        if end == 0:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        pos = end
        while pos > 0:  # scan back, block by block, for the last complete line
            start = max(0, pos - 65536)
            f.seek(start)
            newline = f.read(pos - start).rfind(b"\n")
            if newline >= 0:
                pos = start + newline + 1
                break
            pos = start
        f.seek(pos)
        try:  # a complete record that only lacks its newline (written by another tool) stays
            json.loads(f.read(end - pos))
        except (json.JSONDecodeError, UnicodeDecodeError):
            f.truncate(pos)
        else:
            f.write(b"\n")
            return
    warnings.warn(f"{path}: cut off a truncated last line left by a killed run", stacklevel=3)


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
