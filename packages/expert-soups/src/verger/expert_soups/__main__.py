"""``python -m verger.expert_soups <command>`` (console script ``verger-expert-soups``).

Soup-of-Experts: ``train``, ``instantiate``, ``eval``, ``demo``, ``bench``. "Plan Early":
``plan-early-run``, ``plan-early-plan``, ``plan-early-demo``, ``plan-early-bench``. The
command line follows the verger-core package contract (:mod:`verger.core.cli`).
"""

from __future__ import annotations

from collections.abc import Sequence

from verger.core.cli import PackageCLI
from verger.expert_soups import commands
from verger.expert_soups.settings import (
    EvalSettings,
    InstantiateSettings,
    PlanEarlyBenchSettings,
    PlanEarlyDemoSettings,
    PlanEarlyRunSettings,
    PlanSettings,
    SoupBenchSettings,
    SoupDemoSettings,
    TrainCommandSettings,
)

cli = PackageCLI(
    "verger.expert_soups",
    description="verger-expert-soups: Soup-of-Experts specialists for any domain mixture, "
    "and the 'Plan Early' ways to a small specialist with their costs",
)
cli.command(
    "train", commands.train, settings=TrainCommandSettings, corpus=True,
    help="train a soup and the generic baseline (--nproc N: DDP processes)",
)  # fmt: skip
cli.command(
    "instantiate", commands.instantiate, settings=InstantiateSettings,
    help="a specialist from a trained soup, exported with save_pretrained",
)  # fmt: skip
cli.command(
    "eval", commands.evaluate, settings=EvalSettings,
    help="a trained soup's specialists vs the generic baseline, per task",
)  # fmt: skip
cli.command(
    "demo", commands.demo, settings=SoupDemoSettings, corpus=True,
    help="soup vs generic vs oracle on every corpus domain and two mixtures",
)  # fmt: skip
cli.command(
    "bench", commands.bench, settings=SoupBenchSettings, corpus=True,
    help="specialist win rate, gap closed, instantiate time, step time (over seeds)",
)  # fmt: skip
cli.command(
    "plan-early-run", commands.plan_early_run, settings=PlanEarlyRunSettings, corpus=True,
    help="Plan Early: the grid of methods x sample sizes x targets (records.jsonl)",
)  # fmt: skip
cli.command(
    "plan-early-plan", commands.plan_early_plan, settings=PlanSettings,
    help="Plan Early: rank the methods of recorded runs for four budgets",
)  # fmt: skip
cli.command(
    "plan-early-demo", commands.plan_early_demo, settings=PlanEarlyDemoSettings, corpus=True,
    help="Plan Early in miniature: losses, the cost-vs-domains plot, a plan",
)  # fmt: skip
cli.command(
    "plan-early-bench", commands.plan_early_bench, settings=PlanEarlyBenchSettings, corpus=True,
    help="Plan Early: loss ratios to the small model over seeds, cost crossover",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
