"""``python -m verger.qat_scaling sweep|fit|plan|demo|bench`` (console script
``verger-qat-scaling``).

The command line follows the verger-core package contract (:mod:`verger.core.cli`).
"""

from __future__ import annotations

from collections.abc import Sequence

from verger.core.cli import PackageCLI
from verger.qat_scaling.bench import BenchSettings, run_bench
from verger.qat_scaling.commands import run_fit, run_plan, run_sweep_command
from verger.qat_scaling.demo import DemoSettings, run_demo
from verger.qat_scaling.settings import FitSettings, PlanSettings, SweepSettings

cli = PackageCLI(
    "verger.qat_scaling",
    description="verger-qat-scaling: compute-optimal quantization-aware training, its scaling "
    "law and planner",
)
cli.command("sweep", run_sweep_command, settings=SweepSettings, help="train a grid of FP-then-QAT runs", corpus=True)  # fmt: skip
cli.command("fit", run_fit, settings=FitSettings, help="fit the loss law and f*(S) to run records")
cli.command("plan", run_plan, settings=PlanSettings, help="best bits and QAT fraction for a budget")
cli.command("demo", run_demo, settings=DemoSettings, help="the paper's claims in miniature", corpus=True)  # fmt: skip
cli.command("bench", run_bench, settings=BenchSettings, help="the issue's benchmark metrics", corpus=True)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
