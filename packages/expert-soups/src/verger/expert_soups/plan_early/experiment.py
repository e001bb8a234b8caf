"""The "Plan Early" experiment behind ``plan-early demo`` and ``plan-early bench``.

Runs the grid (methods x in-domain sample sizes x target domains x seeds) on the embedded
corpus, then reports each method's specialized loss (after the same fine-tune), its ratio
to the plain small model, the cost accounts, the total cost against the number of domains
(with the crossover where SLM-is's per-domain pretraining overtakes the one-off pretraining
of SLM-pn / SLM-mix), and the planner's answer for one set of budgets.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from verger.core.bench import Report, new_figure
from verger.expert_soups.plan_early.budgets import Budgets
from verger.expert_soups.plan_early.costs import lm_parameters
from verger.expert_soups.plan_early.grid import run_grid
from verger.expert_soups.plan_early.methods import (
    METHODS,
    MethodContext,
    describe,
)
from verger.expert_soups.plan_early.planner import (
    cost_crossover,
    cost_curves,
    plan,
    plot_costs,
    plot_loss_vs_cost,
    summarize,
)
from verger.expert_soups.settings import BudgetOptions, PlanEarlyRunSettings
from verger.expert_soups.workbench import Workbench

RATIOS = {"is": "slm_is", "pn": "slm_pn", "mix": "slm_mix", "d": "slm_d", "llm": "llm"}


def default_budgets(summaries: dict[tuple[str, int], Any], sample_tokens: int) -> Budgets:
    """A question the records can answer: the SLM's size, 1.1x its pretraining, 1.1x the
    per-domain cost of SLM-is, the largest sample."""
    slm = summaries[("slm", sample_tokens)]
    is_ = summaries.get(("slm_is", sample_tokens), slm)
    return Budgets(
        pretrain_flops=1.1 * slm.pretrain_flops_shared,
        specialize_flops=1.1 * is_.per_domain_flops(),
        inference_params=slm.inference_params,
        in_domain_tokens=sample_tokens,
    )


def _seed_means(records: list[dict[str, Any]], sample_tokens: int) -> dict[str, dict[int, float]]:
    by: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["sample_tokens"] == sample_tokens:
            by[r["method"]][r["seed"]].append(float(r["loss_specialized"]))
    return {m: {s: statistics.fmean(v) for s, v in seeds.items()} for m, seeds in by.items()}


def run_plan_early(
    settings: PlanEarlyRunSettings,
    out: str | Path,
    device: torch.device | str = "cpu",
    *,
    seed: int = 0,
    path: Callable[[str], Path] | None = None,
    rebuild_corpus: bool = False,
    title: str = "expert-soups: Plan Early",
    show_progress: bool | None = None,
) -> Report:
    """Run (or resume) the grid under ``out`` and return the report (metrics, tables, plots).

    ``path(name)`` names each top-level entry written under ``out`` (a run folder's
    :meth:`~verger.core.runs.Run.path`); the grid's records and models already there are
    reused (a resumed run). With budget settings (``plan-early-demo|bench``) the report
    ends with the planner's answer (budgets derived from the run when none are given).
    """
    out, device = Path(out), torch.device(device)
    name_path = path if path is not None else (lambda name: out / name)
    bench = Workbench.build(
        settings.data_settings(), cache_dir=name_path("clusters"), seed=seed, rebuild=rebuild_corpus
    )
    methods = settings.method_settings(seed)
    ctx = MethodContext(bench, methods, device=device)
    asks = isinstance(settings, BudgetOptions)
    budgets = settings.budgets() if isinstance(settings, BudgetOptions) else None
    if budgets is not None:
        budgets.check_model(lm_parameters(ctx.slm), what=f"the SLM ({settings.slm_size})")
    spec = settings.grid_spec(seed)
    name_path("records.jsonl"), name_path("models")  # the grid writes both
    records = run_grid(spec, bench, methods, out, device=device, show_progress=show_progress)
    summaries = summarize(records)
    largest = max(spec.sample_tokens)
    report = Report(out, title=title)
    means = _seed_means(records, largest)

    for method in METHODS:
        if method in means:
            values = list(means[method].values())
            report.metric(f"val_loss_specialized_{method}", statistics.fmean(values))
            report.metric(f"val_loss_specialized_{method}_std", statistics.pstdev(values))
    if "slm" in means:
        for short, method in RATIOS.items():
            if method not in means:
                continue
            ratios = [
                means[method][s] / means["slm"][s] for s in means["slm"] if s in means[method]
            ]
            report.metric(f"loss_ratio_{short}_vs_slm", statistics.fmean(ratios))
            report.metric(f"loss_ratio_{short}_vs_slm_std", statistics.pstdev(ratios))
    crossover = cost_crossover(summaries, sample_tokens=largest)
    if crossover is not None:
        report.metric("cost_crossover_domains", crossover)
    info = describe(ctx)
    tokens = settings.pretrain_steps * ctx.window_tokens()
    report.metric("pretrain_tokens_slm", tokens)
    report.metric("tokens_per_parameter_slm", tokens / info["slm_parameters"])
    report.metric("tokens_per_parameter_llm", info["pretrain_steps_llm"] * ctx.window_tokens() / info["llm_parameters"])  # fmt: skip
    report.metric("seeds", len(spec.seeds))
    report.metric("torch_num_threads", torch.get_num_threads())

    n_domains = settings.n_domains if isinstance(settings, BudgetOptions) else 4
    max_domains = settings.max_domains if isinstance(settings, BudgetOptions) else 64
    if asks:
        budgets = budgets or default_budgets(summaries, largest)
        answer = plan(records, budgets, n_domains=n_domains)
        if answer and answer[0].feasible:
            report.metric("plan_best_method", answer[0].method)

    report.text(
        f"SLM `{settings.slm_size}` ({info['slm_parameters']:,} parameters), LLM "
        f"`{settings.llm_size}` ({info['llm_parameters']:,}); SLM pretraining "
        f"{tokens:,} tokens = {tokens / info['slm_parameters']:.0f} tokens per parameter; the "
        f"LLM gets the same FLOPs ({info['pretrain_steps_llm']} steps). SLM-pn: "
        f"{settings.pn_experts} experts on the MLPs ({info['pn_parameters']:,} "
        f"parameters); SLM-mix: {settings.mix_experts} experts, steps "
        f"{info['mix_expert_steps']}. {bench.clusters.n_clusters} clusters; targets "
        f"{list(spec.targets or bench.domains)}; seeds {list(spec.seeds)}; "
        f"the same fine-tune for every method ({methods.finetune}). Device: {device}."
    )
    rows = []
    for (method, n), s in sorted(
        summaries.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))
    ):
        rows.append({
            "method": method, "in-domain tokens": n, "records": s.records,
            "loss pretrained": s.loss_pretrained, "loss specialized": s.loss_specialized,
            "std over targets x seeds": s.loss_specialized_std,
            "pretrain FLOPs shared": s.pretrain_flops_shared,
            "pretrain FLOPs per domain": s.pretrain_flops_per_domain,
            "specialize FLOPs per domain": s.specialize_flops_per_domain,
            "inference params": s.inference_params,
            "inference FLOPs/token": s.inference_flops_per_token,
        })  # fmt: skip
    report.table("Methods: specialized loss (nats/byte) and costs", rows)
    if asks:
        report.table(
            f"Planner: {n_domains} domains, budgets {budgets}",
            [row.as_row(i + 1) for i, row in enumerate(answer)],
        )
    curves = cost_curves(summaries, sample_tokens=largest, n_max=max_domains)
    report.plot(
        "cost_vs_domains",
        plot_costs(curves, crossover=crossover, title=f"total cost, {largest} in-domain tokens"),
    )
    report.plot("loss_per_target", _plot_targets(records, largest))
    report.plot(
        "loss_vs_cost",
        plot_loss_vs_cost(
            summaries, n_domains=n_domains,
            title="specialized loss vs cost (labels: in-domain tokens)",
        ),
    )  # fmt: skip
    report.write()
    return report


def _plot_targets(records: list[dict[str, Any]], sample_tokens: int) -> Any:
    import numpy as np

    rows = [r for r in records if r["sample_tokens"] == sample_tokens]
    targets = sorted({r["target"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, ax = new_figure(width=9, height=4)
    x = np.arange(len(targets))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        values = [
            statistics.fmean(
                r["loss_specialized"] for r in rows if r["method"] == m and r["target"] == t
            )
            for t in targets
        ]
        ax.bar(x + (j - (len(methods) - 1) / 2) * width, values, width=width, label=m)
    ax.set_xticks(x, targets)
    ax.set_ylabel("validation loss after fine-tune (nats/byte)")
    ax.set_title(f"specialized loss per target ({sample_tokens} in-domain tokens)")
    low = min(r["loss_specialized"] for r in rows)
    ax.set_ylim(bottom=max(0.0, low - 0.3))
    ax.legend(fontsize=8, ncol=3)
    return fig
