"""``plan``: the bit width and QAT fraction a fitted law predicts best for a budget.

Give the model size either as a memory budget (bytes of quantized weights: N = 8 M / B
for each candidate B, with B the *stored* bits, so ternary counts 2) or as a parameter
count N (the same for every candidate), and the training budget as tokens D or FLOPs C
(D = C / (6 N), the usual estimate of a training step's cost). For each candidate bit
width the law's loss-optimal fraction f* is found (within the fractions the law was fitted
on, ``law.f_range``), and the candidate with the lowest
predicted loss wins; its interval comes from the law's bootstrap fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from verger.core.validation import finite_number
from verger.qat_scaling.config import check_bits, effective_bits, storage_bits
from verger.qat_scaling.law import FittedLaw, tokens_per_parameter_byte

DEFAULT_CANDIDATES: tuple[int | str, ...] = (1, "ternary", 2, 3, 4, 6, 8)


class PlanError(ValueError):
    """No candidate bit width fits the budget (the message says why each was rejected)."""


@dataclass(frozen=True)
class Candidate:
    """One bit width under the budget."""

    bits: int | str
    n_params: float
    tokens: float
    qat_fraction: float
    predicted_loss: float
    interval: tuple[float, float] | None
    tokens_per_param_byte: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "n_params": self.n_params,
            "tokens": self.tokens,
            "qat_fraction": self.qat_fraction,
            "predicted_loss": self.predicted_loss,
            "interval": list(self.interval) if self.interval else None,
            "tokens_per_param_byte": self.tokens_per_param_byte,
        }


@dataclass(frozen=True)
class Plan:
    """The chosen candidate (``best``) and every candidate that fitted."""

    best: Candidate
    candidates: list[Candidate]
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def bits(self) -> int | str:
        return self.best.bits

    @property
    def qat_fraction(self) -> float:
        return self.best.qat_fraction

    @property
    def predicted_loss(self) -> float:
        return self.best.predicted_loss

    @property
    def interval(self) -> tuple[float, float] | None:
        return self.best.interval

    def as_dict(self) -> dict[str, Any]:
        return {
            "best": self.best.as_dict(),
            "candidates": [c.as_dict() for c in self.candidates],
            "rejected": dict(self.rejected),
        }


def _exactly_one(names: tuple[str, str], values: tuple[Any, Any]) -> None:
    given = [n for n, v in zip(names, values) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {names[0]} or {names[1]} (got {given or 'none'})")


def plan(
    law: FittedLaw,
    *,
    memory_bytes: float | None = None,
    n_params: float | None = None,
    tokens: float | None = None,
    flops: float | None = None,
    bits: Sequence[int | str] = DEFAULT_CANDIDATES,
    min_params: float | None = None,
    max_params: float | None = None,
    confidence: float = 0.95,
) -> Plan:
    """The predicted-best bit width and QAT fraction for a budget (see the module doc).

    ``min_params`` / ``max_params`` bound the model sizes considered (e.g. the range the
    law was fitted on, ``law.n_range``). Raises :class:`PlanError` when no candidate fits.
    """
    if not isinstance(law, FittedLaw):
        raise TypeError(f"law must be a FittedLaw, got {type(law).__name__}")
    _exactly_one(("memory_bytes", "n_params"), (memory_bytes, n_params))
    _exactly_one(("tokens", "flops"), (tokens, flops))
    if isinstance(bits, str | int) or not bits:
        raise ValueError(f"bits={bits!r} must be a non-empty sequence of bit widths")
    candidates_bits = [check_bits("bits", b) for b in bits]
    if not 0.0 < finite_number("confidence", confidence) < 1.0:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1)")
    lo = finite_number("min_params", min_params, above=0.0) if min_params is not None else 1.0
    hi = finite_number("max_params", max_params, above=0.0) if max_params is not None else np.inf
    budget_m = (
        finite_number("memory_bytes", memory_bytes, above=0.0) if memory_bytes is not None else None
    )
    budget_n = finite_number("n_params", n_params, above=0.0) if n_params is not None else None
    budget_d = finite_number("tokens", tokens, above=0.0) if tokens is not None else None
    budget_c = finite_number("flops", flops, above=0.0) if flops is not None else None

    found: list[Candidate] = []
    rejected: dict[str, str] = {}
    for b in candidates_bits:
        n = budget_n if budget_n is not None else float(int(8.0 * budget_m / storage_bits(b)))  # type: ignore[operator]
        if not lo <= n <= hi:
            rejected[str(b)] = f"N={n:.4g} outside [{lo:.4g}, {hi:.4g}]"
            continue
        d = budget_d if budget_d is not None else budget_c / (6.0 * n)  # type: ignore[operator]
        be = effective_bits(b)
        s = tokens_per_parameter_byte(d, n, be)
        if s <= 1.0:
            rejected[str(b)] = f"S={s:.3g} tokens per parameter byte (the law needs S > 1)"
            continue
        f = law.optimal_fraction(n, d, be)
        loss = float(law.predict(n, d, f, be))
        found.append(
            Candidate(
                bits=b,
                n_params=n,
                tokens=d,
                qat_fraction=f,
                predicted_loss=loss,
                interval=law.interval(n, d, f, be, confidence),
                tokens_per_param_byte=s,
            )
        )
    if not found:
        reasons = "; ".join(f"bits={k}: {v}" for k, v in rejected.items())
        raise PlanError(f"no candidate bit width fits the budget: {reasons}")
    best = min(found, key=lambda c: c.predicted_loss)
    return Plan(best=best, candidates=found, rejected=rejected)
