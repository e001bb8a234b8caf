"""From sweep records to the paper's questions: which QAT fraction was best, and how well
the law predicts it and the loss on budgets it did not see."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from verger.qat_scaling.config import effective_bits
from verger.qat_scaling.law import FittedLaw, tokens_per_parameter_byte
from verger.qat_scaling.records import parse_record


def mean_over_seeds(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Average ``val_loss`` over seeds of otherwise identical runs (adds ``val_loss_std``
    and ``seeds``)."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        parse_record(r)
        key = (
            r["n_params"],
            r["tokens"],
            r["bits"],
            r["qat_fraction"],
            bool(r.get("fused", False)),
        )
        groups[key].append(r)
    out = []
    for (n, d, b, f, fused), rs in groups.items():
        losses = np.array([float(r["val_loss"]) for r in rs])
        out.append(
            {
                "n_params": n,
                "tokens": d,
                "bits": b,
                "qat_fraction": f,
                "fused": fused,
                "val_loss": float(losses.mean()),
                "val_loss_std": float(losses.std(ddof=1)) if len(losses) > 1 else 0.0,
                "seeds": len(rs),
                "size": rs[0].get("size"),
            }
        )
    return out


def optimal_fraction_table(
    records: Iterable[Mapping[str, Any]], law: FittedLaw | None = None
) -> list[dict[str, Any]]:
    """Per (N, D, bits, fused): the measured best QAT fraction on the grid of fractions
    that were run (losses averaged over seeds) and, given a law, its f* and the distance
    between the two in grid steps (the law's f* snapped to the nearest grid fraction)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in mean_over_seeds(records):
        if r["bits"] is None or not 0.0 < r["qat_fraction"] < 1.0:
            continue
        groups[(r["n_params"], r["tokens"], r["bits"], r["fused"])].append(r)
    table = []
    for (n, d, b, fused), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if len(rs) < 2:
            continue
        rs.sort(key=lambda r: r["qat_fraction"])
        grid = [r["qat_fraction"] for r in rs]
        best = int(np.argmin([r["val_loss"] for r in rs]))
        row: dict[str, Any] = {
            "size": rs[0]["size"],
            "n_params": n,
            "tokens": d,
            "bits": b,
            "fused": fused,
            "s_total": tokens_per_parameter_byte(d, n, effective_bits(b)),
            "measured": grid[best],
            "grid": grid,
        }
        if law is not None:
            predicted = law.optimal_fraction(n, d, effective_bits(b))
            snapped = int(np.argmin([abs(g - predicted) for g in grid]))
            row["predicted"] = predicted
            row["grid_error"] = abs(snapped - best)
        table.append(row)
    return table


def prediction_errors(law: FittedLaw, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """RMSE and mean absolute error (nats) of the law's predictions on ``records`` (those the
    law can predict: FP runs and QAT runs with 0 < f < 1)."""
    errors = []
    for r in records:
        p = parse_record(r)
        if not (p.is_fp or 0.0 < p.qat_fraction < 1.0):
            continue
        b = p.effective_bits or 0.0
        errors.append(float(law.predict(p.n_params, p.tokens, p.qat_fraction, b)) - p.val_loss)
    if not errors:
        raise ValueError("no record the law can predict")
    e = np.asarray(errors)
    return {"rmse": float(np.sqrt(np.mean(e**2))), "mae": float(np.mean(np.abs(e))), "n": len(e)}
