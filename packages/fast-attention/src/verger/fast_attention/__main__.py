"""``python -m verger.fast_attention demo|bench`` (console script ``verger-fast-attention``).

* ``demo``: small byte-level LMs with softmax, linear and improved clustered attention,
  trained alike; validation loss, throughput, generation cost per token as the context grows.
* ``bench``: speed, memory and FLOP efficiency against torch SDPA on the ``--device`` given
  (the CPU sweep, or the CUDA one), and clustered attention accuracy against exact softmax.

The command line follows the verger-core package contract (:mod:`verger.core.cli`): the shared
options, one settings dataclass per command (:mod:`verger.fast_attention.settings`), run
folders with ``run.json`` (locked, resumed only with the same settings, nothing deleted that
the run did not create).
"""

from __future__ import annotations

from collections.abc import Sequence

from verger.core.bench import Report
from verger.core.cli import PackageCLI
from verger.core.runs import Run
from verger.fast_attention.settings import BenchSettings, DemoSettings


# The commands import their modules when they run: --help, usage errors and --dry-run do not
# pay for the data, plotting and kernel imports.
def run_demo(settings: DemoSettings, run: Run) -> Report:
    from verger.fast_attention.demo import run_demo as demo

    return demo(settings, run)


def run_bench(settings: BenchSettings, run: Run) -> Report:
    from verger.fast_attention.bench import run_bench as bench

    return bench(settings, run)


cli = PackageCLI(
    "verger.fast_attention",
    description="verger-fast-attention: linear and clustered attention (Katharopoulos et al. "
    "2020, Vyas et al. 2020) with Triton kernels.",
)
cli.command(
    "demo",
    run_demo,
    settings=DemoSettings,
    help="train small LMs: softmax vs linear vs improved clustered attention",
    corpus=True,
)
cli.command("bench", run_bench, settings=BenchSettings, help="speed/memory/accuracy vs torch SDPA")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
