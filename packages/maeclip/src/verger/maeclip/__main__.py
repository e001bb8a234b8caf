"""``python -m verger.maeclip demo|compare|bench|train`` (console script ``verger-maeclip``).

* ``demo``: CLIP, MAE and MAE+CLIP on the embedded image-text data; table, loss curves,
  retrieval grid.
* ``compare``: the same with every knob exposed (model, mask ratio, MAE weight, contrastive
  input, methods), for sweeps.
* ``bench``: the comparison figures plus training-step throughput/memory of each variant
  (and ViT-B/16 when ``--device`` is a GPU).
* ``train``: one method on embedded, CSV or webdataset data; runs under ``torchrun``.

The command line follows the verger-core package contract (:mod:`verger.core.cli`): the
shared options, one settings dataclass per command (:mod:`verger.maeclip.settings`), run
folders with ``run.json``. Under ``torchrun`` rank 0 owns the run folder and the other ranks
follow its decision (:mod:`verger.core.runs`); ``train`` runs on every rank, the other commands
on rank 0 alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from verger.core.cli import PackageCLI
from verger.maeclip.bench import run_bench
from verger.maeclip.commands import leader_only, run_compare, run_demo, run_train
from verger.maeclip.settings import BenchSettings, CompareSettings, DemoSettings, TrainSettings

cli = PackageCLI(
    "verger.maeclip",
    description="verger-maeclip: MAE + CLIP image-text pretraining on open_clip, in miniature.",
)
cli.command(
    "demo",
    leader_only(run_demo),
    settings=DemoSettings,
    help="CLIP, MAE, MAE+CLIP on the embedded data: table, curves, retrieval grid",
)
cli.command(
    "compare",
    leader_only(run_compare),
    settings=CompareSettings,
    help="the comparison with every knob exposed",
)
cli.command(
    "bench",
    leader_only(run_bench),
    settings=BenchSettings,
    help="comparison figures + throughput per variant",
)
cli.command("train", run_train, settings=TrainSettings, help="train one method (torchrun-ready)")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
