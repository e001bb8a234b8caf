"""Figures (matplotlib, headless): the law's loss surface with the planner's choice, and
measured vs predicted optimal QAT fractions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from verger.qat_scaling.config import effective_bits
from verger.qat_scaling.law import FittedLaw, optimal_fraction
from verger.qat_scaling.planner import Plan


def _subplots(ncols: int, width: float = 5.0, height: float = 4.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, ncols, figsize=(width * ncols, height), squeeze=False, layout="constrained"
    )
    return fig, axes[0]


def plot_loss_surface(law: FittedLaw, chosen: Plan, *, title: str = "") -> Any:
    """Predicted loss over (bit width, QAT fraction) at each candidate's (N, D): a heat map
    with the chosen point starred, and the loss-vs-f curves with each candidate's f*."""
    fractions = np.linspace(0.02, 0.98, 97)
    cands = chosen.candidates
    surface = np.array(
        [law.predict(c.n_params, c.tokens, fractions, effective_bits(c.bits)) for c in cands]
    )
    fig, (heat, curves) = _subplots(2)
    image = heat.imshow(
        surface,
        aspect="auto",
        origin="lower",
        extent=(fractions[0], fractions[-1], -0.5, len(cands) - 0.5),
        cmap="viridis_r",
    )
    fig.colorbar(image, ax=heat, label="predicted loss (nats)")
    heat.set_yticks(range(len(cands)), [str(c.bits) for c in cands])
    best = cands.index(chosen.best)
    heat.plot(chosen.qat_fraction, best, marker="*", color="red", markersize=16, label="chosen")
    heat.set_xlabel("QAT fraction f")
    heat.set_ylabel("bits")
    heat.legend(loc="upper right")
    for c, row in zip(cands, surface):
        (line,) = curves.plot(fractions, row, label=f"{c.bits} bits (N={c.n_params:.3g})")
        curves.plot(c.qat_fraction, c.predicted_loss, "o", color=line.get_color())
    curves.plot(chosen.qat_fraction, chosen.predicted_loss, "*", color="red", markersize=16)
    if chosen.interval is not None:
        # drawn as is: a bootstrap percentile interval need not contain the full-data estimate
        # (errorbar's yerr would then be negative, which matplotlib refuses)
        low_end, high_end = chosen.interval
        curves.vlines(chosen.qat_fraction, low_end, high_end, color="red")
        curves.plot([chosen.qat_fraction] * 2, [low_end, high_end], "_", color="red", ms=10)
    curves.set_xlabel("QAT fraction f")
    curves.set_ylabel("predicted loss (nats)")
    curves.legend(fontsize=7)
    low, high = surface.min(), np.percentile(surface, 75)
    curves.set_ylim(low - 0.05 * (high - low), high)
    fig.suptitle(title or f"plan: {chosen.bits} bits, f = {chosen.qat_fraction:.2f}")
    return fig


def plot_optimal_fractions(
    groups: Sequence[dict[str, Any]], *, a: float | None = None, title: str = ""
) -> Any:
    """Measured best f (grid) vs the law's f* against S = D / (N B / 8).

    ``groups``: dicts with ``s_total``, ``measured``, ``predicted`` and ``bits``; ``a``
    adds the curve f*(S) = exp(-a / ln S)."""
    fig, (ax,) = _subplots(1, width=6.0)
    markers = "os^Dvp<>"
    for i, b in enumerate(sorted({g["bits"] for g in groups}, key=str)):
        sel = [g for g in groups if g["bits"] == b]
        s = [g["s_total"] for g in sel]
        ax.plot(s, [g["measured"] for g in sel], markers[i % 8], label=f"measured, {b} bits")
        ax.plot(
            s, [g["predicted"] for g in sel], markers[i % 8], mfc="none", label=f"law, {b} bits"
        )
    if a is not None and groups:
        s_all = [g["s_total"] for g in groups]
        grid = np.geomspace(max(min(s_all) / 1.5, 1.01), max(s_all) * 1.5, 100)
        ax.plot(grid, [optimal_fraction(s, a) for s in grid], "k--", label=f"exp(-{a:.2f}/ln S)")
    ax.set_xscale("log")
    ax.set_xlabel("S = D / (N B / 8)  (tokens per parameter byte)")
    ax.set_ylabel("optimal QAT fraction")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(title or "optimal QAT fraction")
    return fig
