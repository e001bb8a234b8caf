"""The planner: given four budgets and a number of domains, rank the methods from the records.

For each method the planner takes the grid's largest in-domain sample that fits the data
budget, predicts the specialized loss as the mean over that sample size's records (targets
and seeds), and checks the other budgets against the method's cost account: the model size
against the inference budget, the shared pretraining against the pretraining budget, and
the per-domain cost (fine-tune, plus SLM-is's targeted pretraining and SLM-d's teacher
fine-tune, which the paper counts as specialization) against the specialization budget.
Feasible methods rank first, by predicted loss; each row carries its evidence.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import mean, pstdev
from typing import Any

from verger.core.validation import integer
from verger.expert_soups.plan_early.budgets import Budgets
from verger.expert_soups.plan_early.methods import METHODS


@dataclass
class MethodSummary:
    """One method at one sample size, averaged over its records (targets x seeds)."""

    method: str
    sample_tokens: int
    records: int
    loss_specialized: float
    loss_specialized_std: float
    loss_pretrained: float
    pretrain_flops_shared: float
    pretrain_flops_per_domain: float
    specialize_flops_per_domain: float
    inference_params: int
    inference_flops_per_token: float

    def per_domain_flops(self) -> float:
        return self.pretrain_flops_per_domain + self.specialize_flops_per_domain

    def total_flops(self, n_domains: int) -> float:
        return self.pretrain_flops_shared + n_domains * self.per_domain_flops()


def summarize(records: Sequence[dict[str, Any]]) -> dict[tuple[str, int], MethodSummary]:
    """``{(method, sample_tokens): summary}`` over the records."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["method"], int(r["sample_tokens"]))].append(r)
    out = {}
    for (method, n), rows in groups.items():
        losses = [float(r["loss_specialized"]) for r in rows]
        out[(method, n)] = MethodSummary(
            method=method,
            sample_tokens=n,
            records=len(rows),
            loss_specialized=mean(losses),
            loss_specialized_std=pstdev(losses),
            loss_pretrained=mean(float(r["loss_pretrained"]) for r in rows),
            pretrain_flops_shared=mean(float(r["pretrain_flops_shared"]) for r in rows),
            pretrain_flops_per_domain=mean(float(r["pretrain_flops_per_domain"]) for r in rows),
            specialize_flops_per_domain=mean(float(r["specialize_flops_per_domain"]) for r in rows),
            inference_params=max(int(r["inference_params"]) for r in rows),
            inference_flops_per_token=mean(float(r["inference_flops_per_token"]) for r in rows),
        )
    return out


@dataclass
class PlanRow:
    """One method's answer: feasible or why not, predicted loss, costs for ``n_domains``."""

    method: str
    feasible: bool
    reasons: list[str]
    predicted_loss: float
    sample_tokens: int
    total_flops: float
    summary: MethodSummary | None

    def as_row(self, rank: int) -> dict[str, Any]:
        s = self.summary
        return {
            "rank": rank,
            "method": self.method,
            "feasible": "yes" if self.feasible else "no: " + "; ".join(self.reasons),
            "predicted loss": self.predicted_loss,
            "in-domain tokens": self.sample_tokens,
            "records": s.records if s else 0,
            "pretrain FLOPs (shared)": s.pretrain_flops_shared if s else math.nan,
            "per-domain FLOPs": s.per_domain_flops() if s else math.nan,
            "total FLOPs": self.total_flops,
            "inference params": s.inference_params if s else 0,
        }


def plan(records: Sequence[dict[str, Any]], budgets: Budgets, *, n_domains: int) -> list[PlanRow]:
    """Rank every method of the records for ``budgets`` and ``n_domains`` domains."""
    if not isinstance(budgets, Budgets):
        raise TypeError(f"budgets must be a Budgets, got {type(budgets).__name__}")
    integer("n_domains", n_domains, at_least=1)
    if not records:
        raise ValueError("no records: run the grid first (plan-early run)")
    summaries = summarize(records)
    methods = [m for m in METHODS if any(k[0] == m for k in summaries)]
    rows = []
    for method in methods:
        sizes = sorted(n for m, n in summaries if m == method)
        usable = [n for n in sizes if n <= budgets.in_domain_tokens]
        if not usable:
            rows.append(
                PlanRow(method, False, [f"needs >= {sizes[0]} in-domain tokens (the grid's "
                        "smallest sample)"], math.inf, sizes[0], math.inf, None)
            )  # fmt: skip
            continue
        s = summaries[(method, usable[-1])]
        reasons = []
        if s.inference_params > budgets.inference_params:
            reasons.append(
                f"{s.inference_params:,} parameters exceed the inference budget "
                f"{budgets.inference_params:,}"
            )
        if s.pretrain_flops_shared > budgets.pretrain_flops:
            reasons.append(
                f"pretraining {s.pretrain_flops_shared:.3g} FLOPs exceeds "
                f"{budgets.pretrain_flops:.3g}"
            )
        if s.per_domain_flops() > budgets.specialize_flops:
            reasons.append(
                f"{s.per_domain_flops():.3g} FLOPs per domain exceed the specialization "
                f"budget {budgets.specialize_flops:.3g}"
            )
        rows.append(
            PlanRow(method, not reasons, reasons, s.loss_specialized, s.sample_tokens,
                    s.total_flops(n_domains), s)
        )  # fmt: skip
    rows.sort(key=lambda r: (not r.feasible, r.predicted_loss))
    return rows


def cost_curves(
    summaries: dict[tuple[str, int], MethodSummary], *, sample_tokens: int, n_max: int
) -> dict[str, list[float]]:
    """Total FLOPs C(N) for N = 1..n_max of each method at ``sample_tokens``."""
    return {
        m: [s.total_flops(n) for n in range(1, n_max + 1)]
        for (m, size), s in summaries.items()
        if size == sample_tokens
    }


def cost_crossover(
    summaries: dict[tuple[str, int], MethodSummary],
    *,
    sample_tokens: int,
    against: Sequence[str] = ("slm_pn", "slm_mix"),
) -> float | None:
    """The number of domains N from which SLM-is costs more than the cheapest of
    ``against``: the smallest N with C_is(N) > min_m C_m(N) (one-off pretraining beats
    per-domain pretraining from there on). None when SLM-is stays cheaper (or is missing).
    """
    is_ = summaries.get(("slm_is", sample_tokens))
    others = [summaries[(m, sample_tokens)] for m in against if (m, sample_tokens) in summaries]
    if is_ is None or not others:
        return None
    best: float | None = None
    for o in others:
        slope = is_.per_domain_flops() - o.per_domain_flops()
        if slope <= 0:
            continue  # SLM-is's per-domain cost is no larger: never overtaken
        gap = o.pretrain_flops_shared - is_.pretrain_flops_shared
        n = max(1, math.floor(gap / slope) + 1)  # first integer N with C_is(N) > C_o(N)
        best = n if best is None else min(best, n)
    return best


def plot_costs(curves: dict[str, list[float]], *, crossover: float | None, title: str) -> Any:
    """Total cost against the number of domains (log y), the crossover marked."""
    from verger.core.bench import new_figure

    fig, ax = new_figure(width=6.5, height=4.2)
    for method, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=method)
    if crossover is not None:
        ax.axvline(crossover, color="grey", ls="--", lw=1)
        ax.text(crossover, ax.get_ylim()[1], f" N={crossover:g}", va="top", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of domains served")
    ax.set_ylabel("total FLOPs (pretraining + specialization)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def plot_loss_vs_cost(
    summaries: dict[tuple[str, int], MethodSummary], *, n_domains: int, title: str
) -> Any:
    """Specialized loss against the total FLOPs of serving ``n_domains`` domains, one point
    per method and in-domain sample size (the paper's loss-vs-budget view)."""
    from verger.core.bench import new_figure

    fig, ax = new_figure(width=6.5, height=4.2)
    for method in METHODS:
        points = sorted((n, s) for (m, n), s in summaries.items() if m == method)
        if not points:
            continue
        xs = [s.total_flops(n_domains) for _, s in points]
        ys = [s.loss_specialized for _, s in points]
        ax.plot(xs, ys, marker="o", label=method)
        for x, y, (n, _) in zip(xs, ys, points):
            ax.annotate(f"{n}", (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xlabel(f"total FLOPs for {n_domains} domains (pretraining + specialization)")
    ax.set_ylabel("specialized validation loss (nats/byte)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig
