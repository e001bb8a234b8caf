"""``python -m verger.neural_parts train|reconstruct|export|render|demo|bench``.

The command line follows the verger-core package contract (:mod:`verger.core.cli`).
``train`` also runs under ``torchrun --nproc-per-node N -m verger.neural_parts train``.
"""

from __future__ import annotations

from collections.abc import Sequence

from verger.core.cli import PackageCLI
from verger.neural_parts.bench import run_bench
from verger.neural_parts.commands import (
    run_export,
    run_reconstruct,
    run_render,
    run_train,
)
from verger.neural_parts.demo import run_demo
from verger.neural_parts.settings import (
    BenchSettings,
    DemoSettings,
    ExportSettings,
    ReconstructSettings,
    RenderSettings,
    TrainSettings,
)

cli = PackageCLI(
    "verger.neural_parts",
    description="verger-neural-parts: 3D shapes as unions of invertible-network primitives",
)
cli.command(
    "train",
    run_train,
    settings=TrainSettings,
    help="train a model (procedural shapes or a ShapeNet-style folder; torchrun for DDP)",
)
cli.command(
    "reconstruct",
    run_reconstruct,
    settings=ReconstructSettings,
    help="meshes, renders and metrics of a saved model",
)
cli.command(
    "export",
    run_export,
    settings=ExportSettings,
    help="part meshes as PLY or OBJ, one colour per part",
)
cli.command(
    "render", run_render, settings=RenderSettings, help="PNG renders of the predicted parts"
)
cli.command(
    "demo",
    run_demo,
    settings=DemoSettings,
    help="train on procedural shapes, reconstruct held-out ones",
)
cli.command(
    "bench",
    run_bench,
    settings=BenchSettings,
    help="Neural Parts vs superquadrics, parts sweep, mesh timing",
)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
