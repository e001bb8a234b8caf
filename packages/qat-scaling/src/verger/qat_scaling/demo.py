"""``demo``: the paper's pipeline in miniature, on the embedded corpus.

A small sweep of FP-then-QAT runs whose fractions share one FP prefix per model, the loss
law fitted to it (with bootstrap intervals), the measured best QAT fraction against the
law's, and the planner's answer for a memory budget (``--quick``: under 2 minutes on 2
CPU cores; the full demo covers two sizes, three bit widths and three budgets).
"""

from __future__ import annotations

from dataclasses import dataclass

from verger.core.bench import Report
from verger.core.runs import Run
from verger.core.settings import option
from verger.qat_scaling.commands import (
    fit_sections,
    loss_vs_fraction_plot,
    plan_section,
    sweep_in_run,
)
from verger.qat_scaling.models import SIZES
from verger.qat_scaling.settings import BIT_NAMES, GridSettings, parse_bits


@dataclass(kw_only=True)
class DemoSettings(GridSettings):
    """``demo``: sweep, fit, plan (``--quick``: < 2 minutes on 2 CPU cores)."""

    sizes: tuple[str, ...] = option(("xxs", "xs"), quick=("xxs",), choices=tuple(SIZES), help="model sizes")  # fmt: skip
    bits: tuple[str, ...] = option(("1", "2", "4"), quick=("2", "4"), choices=BIT_NAMES, help="bit widths")  # fmt: skip
    fractions: tuple[float, ...] = option(
        (0.1, 0.25, 0.5, 0.75),
        quick=(0.2, 0.5, 0.8),
        above=0.0,
        at_most=1.0,
        help="QAT fractions f",
    )
    tokens: tuple[int, ...] = option(
        (102_400, 204_800, 409_600), quick=(32_768, 65_536), at_least=1, help="training tokens per run"
    )  # fmt: skip
    workers: int = option(2, at_least=1, identity=False, help="local processes (one per GPU on CUDA)")  # fmt: skip
    starts: int = option(12, quick=6, at_least=1, help="law fit starts")
    bootstrap: int = option(50, quick=10, at_least=0, help="bootstrap refits for intervals")
    memory_bytes: float = option(16_384.0, above=0.0, help="the planner's memory budget (bytes of weights)")  # fmt: skip
    plan_tokens: float = option(4e5, quick=6.5e4, above=0.0, help="the planner's token budget")


def run_demo(settings: DemoSettings, run: Run) -> Report:
    """Sweep, fit the law, compare optimal fractions, plan under a memory budget."""
    result = sweep_in_run(settings, run)
    records = result.records
    report = run.report("verger-qat-scaling demo")
    report.text(
        "FP-then-QAT runs of tiny byte-level LMs on verger-core's embedded corpus. All fractions "
        "of a (size, seed) branch from one shared FP trunk (warmup, then the peak LR), so the FP "
        f"prefix is trained once: {result.compute.saving:.0%} of the grid's FLOPs are saved."
    )
    report.metric("demo_runs", len(records))
    report.metric("sweep_fp_prefix_compute_saving", result.compute.saving)
    loss_vs_fraction_plot(records, report)
    law, _ = fit_sections(
        records, report, starts=settings.starts, bootstrap=settings.bootstrap, seed=run.seed
    )
    report.text(
        f"The planner, for {settings.memory_bytes:.0f} bytes of quantized weights and "
        f"{settings.plan_tokens:.3g} training tokens, over the law's fitted size range "
        f"({law.n_range[0]:.3g}-{law.n_range[1]:.3g} parameters, extrapolated by a factor <= 4):"
    )
    plan_section(
        law, report, memory_bytes=settings.memory_bytes, tokens=settings.plan_tokens,
        bits=parse_bits(settings.bits), min_params=law.n_range[0] / 4, max_params=law.n_range[1] * 4,
    )  # fmt: skip
    return report
