"""The ``sweep``, ``fit`` and ``plan`` commands, and the report sections ``demo`` and
``bench`` share with them (law table, optimal fractions, the planner's answer)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from verger.core.bench import Report, new_figure
from verger.core.files import atomic_write_json
from verger.core.runs import Run
from verger.qat_scaling.analysis import optimal_fraction_table, prediction_errors
from verger.qat_scaling.law import (
    FittedLaw,
    fit_fraction_constant,
    fit_law,
    leave_one_out,
    load_law,
    save_law,
)
from verger.qat_scaling.planner import Plan, plan
from verger.qat_scaling.plots import plot_loss_surface, plot_optimal_fractions
from verger.qat_scaling.records import read_records
from verger.qat_scaling.settings import FitSettings, GridSettings, PlanSettings, parse_bits
from verger.qat_scaling.sweep import RUNS_FILE, SETTINGS_FILE, SweepConfig, SweepResult, run_sweep


# ---------------------------------------------------------------------- sweep
def sweep_in_run(
    settings: GridSettings,
    run: Run,
    *,
    show_progress: bool | None = None,
    config: SweepConfig | None = None,
) -> SweepResult:
    """Run the grid of ``settings`` (or ``config``, a grid with the same training settings)
    in the run folder (its entries recorded by the run)."""
    for name in (SETTINGS_FILE, RUNS_FILE, "trunks", "runs", ".sweep.lock"):
        run.path(name)
    devices = None
    workers = settings.workers
    if run.device.type == "cuda" and workers > 1:
        count = torch.cuda.device_count()
        devices = [f"cuda:{i}" for i in range(min(workers, count))]
    threads = max(1, torch.get_num_threads() // workers) if workers > 1 else torch.get_num_threads()
    return run_sweep(
        config or settings.sweep_config(run.seed), run.folder, workers=workers, devices=devices,
        device=run.device, threads=threads, show_progress=show_progress,
    )  # fmt: skip


def loss_vs_fraction_plot(
    records: Sequence[Mapping[str, Any]], report: Report, name: str = "loss_vs_fraction"
) -> None:
    """Final validation loss against the QAT fraction, one line per (size, budget, bits)."""
    fig, ax = new_figure(width=7.0, height=4.5)
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    fp: dict[tuple[Any, ...], float] = {}
    for r in records:
        if r["bits"] is None:
            fp[(r.get("size"), r["tokens"])] = r["val_loss"]
        else:
            groups.setdefault(
                (r.get("size"), r["tokens"], r["bits"], r.get("fused", False)), []
            ).append(r)
    colors: dict[tuple[Any, ...], str] = {}
    for (size, tokens, bits, fused), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rs = sorted(rs, key=lambda r: r["qat_fraction"])
        color = colors.setdefault((size, tokens, bits), f"C{len(colors) % 10}")
        label = f"{size} {tokens // 1000}k tok, {bits} bit{' fused' if fused else ''}"
        xs, ys = [r["qat_fraction"] for r in rs], [r["val_loss"] for r in rs]
        ax.plot(xs, ys, "s--" if fused else "o-", color=color, label=label)
    for (size, tokens), loss in fp.items():
        ax.axhline(loss, color="gray", ls=":", lw=0.8)
        ax.annotate(f"FP {size} {tokens // 1000}k", (1.0, loss), fontsize=6, color="gray")
    ax.set_xlim(right=1.15)
    ax.set_xlabel("QAT fraction f")
    ax.set_ylabel("validation loss (nats); dotted: FP, same tokens")
    ax.legend(fontsize=6)
    report.plot(name, fig)


def run_sweep_command(settings: GridSettings, run: Run) -> Report:
    """``sweep``: every run of the grid, one record each in ``runs.jsonl``."""
    result = sweep_in_run(settings, run)
    report = run.report("verger-qat-scaling sweep")
    report.metric("sweep_runs", len(result.records))
    report.metric("sweep_runs_trained", result.runs_trained)
    report.metric("sweep_steps_trained", result.steps_trained)
    report.metric("sweep_fp_prefix_compute_saving", result.compute.saving)
    report.table(
        "Runs",
        [
            {
                "run": r["run_id"],
                "val_loss": r["val_loss"],
                "tokens": r["tokens"],
                "n_params": r["n_params"],
            }
            for r in result.records
        ],
    )
    loss_vs_fraction_plot(result.records, report)
    return report


# ---------------------------------------------------------------------- fit
def fit_sections(
    records: Sequence[Mapping[str, Any]],
    report: Report,
    *,
    starts: int,
    bootstrap: int,
    seed: int,
    heldout_tokens: Sequence[int] = (),
    loo: bool = False,
) -> tuple[FittedLaw, dict[str, Any]]:
    """Fit the law (on the records outside ``heldout_tokens``), add its sections and metrics
    to ``report``; returns the law and the optimal-fraction table."""
    heldout = [r for r in records if r["tokens"] in set(heldout_tokens)]
    train = [r for r in records if r["tokens"] not in set(heldout_tokens)]
    if heldout_tokens and not heldout:
        raise ValueError(f"heldout_tokens={tuple(heldout_tokens)} match no record's tokens")
    law = fit_law(train, starts=starts, bootstrap=bootstrap, seed=seed)
    report.metric("law_records", law.n_points)
    fitted_budgets = len({int(r["tokens"]) for r in train})
    report.metric("law_fitted_budgets", fitted_budgets)
    if fitted_budgets < 3:
        report.text(
            f"The law is fitted on {fitted_budgets} token budget(s): its Chinchilla part "
            "E + B_D / D^beta has three constants, so its extrapolation in D is not identified "
            "(fit three budgets or more before trusting predictions at other budgets)."
        )
    report.metric("law_free_parameters", sum(law.free.values()))
    report.metric("law_train_rmse", prediction_errors(law, train)["rmse"])
    if heldout:
        report.metric("law_heldout_rmse", prediction_errors(law, heldout)["rmse"])
    if loo:
        report.metric(
            "law_loo_rmse", leave_one_out(train, starts=max(1, starts // 3), seed=seed)["rmse"]
        )
    rows = [
        {"parameter": k, "value": v, "low": lo, "high": hi, "free": law.free_readable(k)}
        for k, (v, lo, hi) in law.param_intervals().items()
    ]
    report.table("Fitted law (bootstrap 95% intervals)", rows)
    table = optimal_fraction_table(records, law)
    summary: dict[str, Any] = {"groups": table}
    if table:
        errors = [row["grid_error"] for row in table]
        report.metric("optimal_fraction_grid_error", float(np.mean(errors)))
        report.metric("optimal_fraction_grid_error_max", int(max(errors)))
        usable = [row for row in table if row["s_total"] > 1.0 and 0 < row["measured"] < 1]
        if usable:
            a = fit_fraction_constant(
                [r["s_total"] for r in usable], [r["measured"] for r in usable]
            )
            report.metric("fraction_constant_a", a)
            summary["a"] = a
        report.table(
            "Optimal QAT fraction: measured (grid) vs the law's",
            [
                {
                    "size": row["size"], "tokens": row["tokens"], "bits": row["bits"],
                    "fused": row["fused"], "S": row["s_total"], "measured": row["measured"],
                    "law": row["predicted"], "grid steps off": row["grid_error"],
                    "heldout": row["tokens"] in set(heldout_tokens),
                }
                for row in table
            ],
        )  # fmt: skip
        report.plot("optimal_fraction", plot_optimal_fractions(table, a=summary.get("a")))
    return law, summary


def _records(path: Any) -> list[dict[str, Any]]:
    if path is None:
        raise ValueError("give --records <runs.jsonl> (the output of `sweep`)")
    return read_records(path)


def run_fit(settings: FitSettings, run: Run) -> Report:
    """``fit``: the law (with bootstrap intervals), f*(S) and out-of-sample errors."""
    records = _records(settings.records)
    report = run.report("verger-qat-scaling fit")
    law, _ = fit_sections(
        records, report, starts=settings.starts, bootstrap=settings.bootstrap, seed=run.seed,
        heldout_tokens=settings.heldout_tokens, loo=settings.leave_one_out,
    )  # fmt: skip
    save_law(law, run.path("law.json"))
    report.text(
        f"The law is in `law.json` ({len(law.bootstrap)} bootstrap fits); `plan --law` reads it."
    )
    return report


# ---------------------------------------------------------------------- plan
def plan_section(law: FittedLaw, report: Report, **budget: Any) -> Plan:
    """Plan for ``budget`` (:func:`plan`'s keywords), add the answer and the loss surface."""
    result = plan(law, **budget)
    best = result.best
    report.metric("plan_bits", str(best.bits))
    report.metric("plan_qat_fraction", best.qat_fraction)
    report.metric("plan_n_params", best.n_params)
    report.metric("plan_tokens", best.tokens)
    report.metric("plan_predicted_loss", best.predicted_loss)
    if best.interval is not None:
        report.metric("plan_interval_low", best.interval[0])
        report.metric("plan_interval_high", best.interval[1])
    report.table("Planner candidates", [
        {"bits": c.bits, "N": c.n_params, "tokens": c.tokens, "S": c.tokens_per_param_byte,
         "f*": c.qat_fraction, "predicted loss": c.predicted_loss,
         "interval": "-" if c.interval is None else f"{c.interval[0]:.4f}-{c.interval[1]:.4f}"}
        for c in result.candidates
    ])  # fmt: skip
    for bits, why in result.rejected.items():
        report.text(f"- rejected {bits} bits: {why}")
    report.plot("loss_surface", plot_loss_surface(law, result))
    return result


def run_plan(settings: PlanSettings, run: Run) -> Report:
    """``plan``: the best bit width and QAT fraction for the budget."""
    if (settings.law is None) == (settings.records is None):
        raise ValueError("give exactly one of --law <law.json> or --records <runs.jsonl>")
    report = run.report("verger-qat-scaling plan")
    if settings.law is not None:
        law = load_law(settings.law)
    else:
        law = fit_law(_records(settings.records), bootstrap=settings.bootstrap, seed=run.seed)
        save_law(law, run.path("law.json"))
    budget: dict[str, Any] = {
        "bits": parse_bits(settings.bits),
        "min_params": settings.min_params,
        "max_params": settings.max_params,
        "confidence": settings.confidence,
    }
    if settings.size_by == "memory":
        budget["memory_bytes"] = settings.memory_bytes
    else:
        budget["n_params"] = settings.n_params
    if settings.train_by == "tokens":
        budget["tokens"] = settings.tokens
    else:
        budget["flops"] = settings.flops
    result = plan_section(law, report, **budget)
    atomic_write_json(run.path("plan.json"), result.as_dict())
    return report
