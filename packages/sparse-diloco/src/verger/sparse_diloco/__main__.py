"""``python -m verger.sparse_diloco demo|bench|train`` (console script ``verger-sparse-diloco``).

* ``demo``: W gloo worker processes on the embedded corpus, DiLoCo vs partial updates.
* ``bench``: the ratios of partial updates vs DiLoCo, and the torchft figures (README).
* ``train``: one run, simulated, under torchrun (one worker per rank, or islands), or on
  torchft (``--engine torchft``); worker checkpoints resume with ``--resume``.

The command line follows the verger-core package contract (`verger.core.cli`): the shared
options, one settings dataclass per command (`verger.sparse_diloco.settings`), run folders
with ``run.json``. Under torchrun every rank runs the command line: rank 0 owns the run folder
and the other ranks follow its decision (`verger.core.runs`); ``train`` runs on every rank,
``demo`` and ``bench`` on rank 0 alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from verger.core.cli import PackageCLI
from verger.sparse_diloco.bench import run_bench
from verger.sparse_diloco.commands import run_train
from verger.sparse_diloco.demo import run_demo
from verger.sparse_diloco.settings import BenchSettings, DemoSettings, TrainSettings

cli = PackageCLI(
    "verger.sparse_diloco",
    description="verger-sparse-diloco: DiLoCo with partial parameter updates, in miniature.",
)
cli.command(
    "demo",
    run_demo,
    settings=DemoSettings,
    help="W gloo workers: DiLoCo vs partial updates",
    corpus=True,
)
cli.command(
    "bench",
    run_bench,
    settings=BenchSettings,
    help="partial updates vs DiLoCo (FLOPs, memory, time, loss, bytes) and torchft figures",
    corpus=True,
)
cli.command(
    "train",
    run_train,
    settings=TrainSettings,
    help="one run: simulated, under torchrun, or on torchft (--engine torchft)",
    corpus=True,
)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
