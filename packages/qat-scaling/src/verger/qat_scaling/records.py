"""The run record: one JSON object per finished run, one line each in ``runs.jsonl``.

Schema ``verger.qat_scaling/run-v1`` (fields marked * are what :func:`fit_law` reads;
records made elsewhere need only those):

=====================  ===============================================================
field                  meaning
=====================  ===============================================================
``schema``             ``"verger.qat_scaling/run-v1"``
``run_id``             unique name of the run
``n_params`` *         N: parameters quantized at ``bits`` (the blocks' linear layers)
``n_params_total``     every parameter of the model (embedding included)
``bits`` *             1, 2, 3, 4, 6, 8, ``"ternary"``, or ``null`` for a full-precision run
``effective_bits``     B of the law: ``bits``, log2(3) for ternary, ``null`` for FP
``qat_fraction`` *     f = D_qat / D in [0, 1] (0 for FP runs)
``fused``              cooldown & QAT fusion (``false``: FP cooldown, then QAT)
``tokens`` *           D: training tokens of the whole run
``tokens_fp``          D_fp = D - D_qat
``tokens_qat``         D_qat
``flops``              training FLOPs (analytic matmul count, forward + backward)
``val_loss`` *         final validation loss, nats per token (mean over domains)
``val_loss_by_domain`` ``{domain: loss}``
``size``, ``seed``     model size name and seed
``steps``              optimizer steps; ``batch_size``, ``seq_len``
``quant``, ``train``   the QuantConfig and TrainConfig fields
``seconds``            wall time of the branch (the shared trunk not included)
=====================  ===============================================================
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verger.core.validation import finite_number
from verger.qat_scaling.config import BITS, effective_bits

SCHEMA = "verger.qat_scaling/run-v1"
REQUIRED = ("n_params", "tokens", "qat_fraction", "bits", "val_loss")


class RecordError(ValueError):
    """A run record (or a ``runs.jsonl`` line) is malformed; the message says where."""


@dataclass(frozen=True)
class RunPoint:
    """What the scaling law sees of one run."""

    n_params: float
    tokens: float
    qat_fraction: float
    bits: int | str | None
    val_loss: float

    @property
    def is_fp(self) -> bool:
        return self.bits is None

    @property
    def effective_bits(self) -> float | None:
        return None if self.bits is None else effective_bits(self.bits)


def _number(record: Mapping[str, Any], name: str, where: str, *, low: float, strict: bool) -> float:
    bound = {"above": low} if strict else {"at_least": low}
    try:
        return finite_number(name, record[name], **bound)
    except ValueError as exc:  # the same check, told with the record it is in
        raise RecordError(f"{where}: {exc}") from None


def parse_record(record: object, where: str = "record") -> RunPoint:
    """Check the fields the law needs and return them; raises :class:`RecordError`."""
    if not isinstance(record, Mapping):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise RecordError(f"{where}: missing field(s) {missing} (required: {list(REQUIRED)})")
    bits = record["bits"]
    if bits is not None and (isinstance(bits, bool) or bits not in BITS):
        raise RecordError(f"{where}: bits={bits!r} must be null (FP) or one of {BITS}")
    f = _number(record, "qat_fraction", where, low=0.0, strict=False)
    if f > 1.0:
        raise RecordError(f"{where}: qat_fraction={f!r} must be in [0, 1]")
    if bits is None and f != 0.0:
        raise RecordError(f"{where}: a full-precision run (bits=null) must have qat_fraction=0")
    return RunPoint(
        n_params=_number(record, "n_params", where, low=0.0, strict=True),
        tokens=_number(record, "tokens", where, low=0.0, strict=True),
        qat_fraction=f,
        bits=bits,
        val_loss=_number(record, "val_loss", where, low=0.0, strict=True),
    )


def parse_records(records: Iterable[object]) -> list[RunPoint]:
    """:func:`parse_record` for each; raises :class:`RecordError` on an empty list."""
    points = [parse_record(r, f"record {i}") for i, r in enumerate(records)]
    if not points:
        raise RecordError("no records: the law needs finished runs")
    return points


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a ``runs.jsonl`` file. A torn last line (a writer killed mid-line)
    is skipped; any other unreadable line raises :class:`RecordError` naming it."""
    target = Path(path)
    if not target.is_file():
        raise RecordError(f"{target} does not exist")
    text = target.read_text(encoding="utf-8")
    lines = text.split("\n")
    torn = not text.endswith("\n") and bool(text)
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if torn and number == len(lines):
                break
            raise RecordError(f"{target}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise RecordError(f"{target}:{number}: a record must be a JSON object")
        out.append(record)
    return out


def append_record(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one record as a line and fsync it. A torn last line left by a killed writer
    is cut off first, so the new record starts on a line of its own."""
    target = Path(path)
    line = json.dumps(dict(record), allow_nan=False, sort_keys=True) + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_file():
        data = target.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(target, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    with open(target, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
