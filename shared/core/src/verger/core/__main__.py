"""``python -m verger.core demo|bench`` (console script ``verger-core``).

- ``demo`` (:mod:`verger.core.demo`): a tiny LM trained on the embedded multi-domain corpus,
  per-domain validation loss before and after.
- ``bench`` (:mod:`verger.core.benchmarks`): the transformer LM's training step, the fused
  kernels against their references, cross-entropy memory, and the data pipeline.

Both follow the package contract (:mod:`verger.core.cli`): ``--out DIR`` receives
``metrics.json``, ``report.md``, PNG plots and ``run.json``.
"""

from __future__ import annotations

from collections.abc import Sequence

from verger.core.benchmarks import BenchSettings, run_bench
from verger.core.cli import PackageCLI
from verger.core.demo import DemoSettings, run_demo

cli = PackageCLI(
    "verger.core",
    description="verger-core: the shared transformer LM, kernels and data, in miniature.",
)
cli.command(
    "demo",
    run_demo,
    settings=DemoSettings,
    help="train a tiny LM on the embedded corpus; per-domain validation loss",
    corpus=True,
)
cli.command("bench", run_bench, settings=BenchSettings, help="LM, kernel and data benchmarks")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
