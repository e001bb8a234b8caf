"""The settings of each command, one validated dataclass each (verger.core.settings).

Every field is declared once with its default, its ``--quick`` value, its bounds and its
help; the CLI derives the ``--<field>`` flags. The defaults are the paper's architecture
(4 coupling blocks, hidden 256, projection 128, 5 parts) with CPU-sized training; ``--quick``
shrinks the networks and the sample counts so that the demo fits in 2 minutes on 2 cores.
``bench`` trains eight models, so its defaults are the small networks (hidden 64) as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from verger.core.settings import Settings, SettingsError, option
from verger.neural_parts.config import (
    ENCODERS,
    PRIMITIVES,
    VOLUME_DISTANCES,
    LossConfig,
    ModelConfig,
    SampleConfig,
)
from verger.neural_parts.data.samples import SampleSpec
from verger.neural_parts.train import OPTIMIZERS, TrainConfig

DEFAULT_MODEL = Path("runs/neural-parts/train/model")


@dataclass(kw_only=True)
class ModelOptions(Settings):
    """Network sizes and sample counts shared by the training commands."""

    n_primitives: int = option(5, at_least=1, help="parts per shape (M)")
    encoder: str = option("pointnet", choices=ENCODERS, help="shape encoder")
    feature_dim: int = option(256, quick=64, at_least=1, help="shape feature F")
    embedding_dim: int = option(256, quick=64, at_least=1, help="per-primitive embedding z_m")
    n_blocks: int = option(4, at_least=1, help="coupling layers of the INN")
    hidden: int = option(256, quick=64, at_least=1, help="width of the coupling networks")
    projection_dim: int = option(
        128, quick=32, at_least=1, help="projection of the fixed coordinates"
    )
    n_surface: int = option(1000, quick=300, at_least=1, help="surface points per shape and step")
    n_volume: int = option(2000, quick=512, at_least=2, help="occupancy points per shape and step")
    n_sphere: int = option(200, quick=100, at_least=1, help="sphere points per primitive and step")
    n_input: int = option(512, quick=256, at_least=1, help="points of the encoder's input cloud")
    pool_surface: int = option(
        20_000, quick=5_000, at_least=16, help="surface samples cached per shape"
    )
    pool_volume: int = option(
        50_000, quick=10_000, at_least=16, help="occupancy samples cached per shape"
    )
    batch_size: int = option(4, quick=2, at_least=1, help="shapes per step (per rank)")
    lr: float = option(1e-3, above=0.0, help="Adam learning rate (the paper: 5e-5 for 1.5M steps)")
    cache_dir: Path | None = option(
        None, identity=False, help="sample cache folder (default $VERGER_DATA/neural-parts)"
    )

    def model_config(self, **overrides: object) -> ModelConfig:
        values = dict(
            n_primitives=self.n_primitives,
            encoder=self.encoder,
            feature_dim=self.feature_dim,
            embedding_dim=self.embedding_dim,
            n_blocks=self.n_blocks,
            hidden=self.hidden,
            projection_dim=self.projection_dim,
            head_hidden=self.hidden,
            pointnet_hidden=min(self.hidden, 128),
        )
        values.update(overrides)
        return ModelConfig(**values)  # type: ignore[arg-type]

    def sample_config(self) -> SampleConfig:
        return SampleConfig(
            n_surface=self.n_surface,
            n_volume=self.n_volume,
            n_sphere=self.n_sphere,
            n_input=self.n_input,
        )

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(
            n_surface=self.pool_surface,
            n_volume=self.pool_volume,
            voxel_resolution=32 if self.encoder == "voxel" else 0,
        )


@dataclass(kw_only=True)
class DemoSettings(ModelOptions):
    """``demo``: train on procedural shapes, reconstruct held-out ones, write renders/meshes."""

    n_train: int = option(64, quick=24, at_least=1, help="procedural training shapes")
    n_test: int = option(8, quick=4, at_least=1, help="held-out procedural shapes")
    steps: int = option(1500, quick=200, at_least=1, help="optimizer steps")
    eval_points: int = option(10_000, quick=3_000, at_least=100, help="surface points per metric")
    subdivisions: int = option(
        4, quick=3, at_least=0, at_most=6, help="icosphere level of the meshes"
    )
    checkpoint_every: int = option(
        250, quick=50, at_least=1, identity=False, help="steps between checkpoints"
    )


@dataclass(kw_only=True)
class BenchSettings(ModelOptions):
    """``bench``: Neural Parts vs superquadrics (5 parts), IoU by part count, mesh extraction."""

    # CPU-sized networks and samples (the paper's hidden 256 costs ~20 s per INN step on a
    # loaded 2-core VM, far beyond a bench); every model of the comparison gets the same.
    feature_dim: int = option(64, at_least=1, help="shape feature F")
    embedding_dim: int = option(64, at_least=1, help="per-primitive embedding z_m")
    hidden: int = option(64, at_least=1, help="width of the coupling networks")
    projection_dim: int = option(32, at_least=1, help="projection of the fixed coordinates")
    n_surface: int = option(300, at_least=1, help="surface points per shape and step")
    n_volume: int = option(512, at_least=2, help="occupancy points per shape and step")
    n_sphere: int = option(100, at_least=1, help="sphere points per primitive and step")
    n_input: int = option(256, at_least=1, help="points of the encoder's input cloud")
    pool_surface: int = option(5_000, at_least=16, help="surface samples cached per shape")
    pool_volume: int = option(10_000, at_least=16, help="occupancy samples cached per shape")
    batch_size: int = option(2, at_least=1, help="shapes per step (per rank)")
    n_train: int = option(32, quick=16, at_least=1, help="procedural training shapes")
    n_test: int = option(8, quick=4, at_least=1, help="held-out procedural shapes")
    steps: int = option(400, quick=60, at_least=1, help="optimizer steps of every model")
    seeds: int = option(3, quick=1, at_least=1, help="seeds of the 5-part comparison")
    part_counts: tuple[int, ...] = option((2, 5, 8), at_least=1, help="part counts of iou_by_parts")
    volume_distance: str = option(
        "implicit",
        choices=VOLUME_DISTANCES,
        help="part value the volume losses read (both methods): implicit, Euclidean-scaled, surface",
    )
    eval_points: int = option(10_000, quick=2_000, at_least=100, help="surface points per metric")
    subdivisions: int = option(
        4, quick=3, at_least=0, at_most=6, help="icosphere level of the meshes"
    )
    grid: int = option(32, at_least=8, help="marching-cubes grid for the timing baseline")
    repeats: int = option(3, quick=2, at_least=1, help="timed repeats of the mesh extraction")
    embedded: bool = option(
        True, help="also score the wheel meshes (pymeshlab/pyvista) if installed"
    )

    def validate(self) -> None:
        if 5 not in self.part_counts:
            raise SettingsError(f"part_counts={self.part_counts!r} must include 5 (the headline)")


@dataclass(kw_only=True)
class TrainSettings(ModelOptions):
    """``train``: fit a model on procedural shapes or a ShapeNet-style folder (torchrun-ready)."""

    data: str = option("procedural", help="'procedural' or a ShapeNet-style folder of meshes")
    split: str | None = option(None, help="split list (<category>/<split>.lst) of a folder")
    n_shapes: int = option(
        64, quick=16, at_least=1, help="procedural shapes (or max folder models)"
    )
    primitive: str = option(
        "inn", choices=PRIMITIVES, help="'inn' (Neural Parts) or 'superquadric'"
    )
    steps: int = option(2000, quick=60, at_least=1, help="optimizer steps")
    optimizer: str = option("adam", choices=OPTIMIZERS, help="optimizer")
    grad_clip: float | None = option(1.0, above=0.0, help="gradient-norm clip (none: off)")
    w_reconstruction: float = option(0.3, at_least=0.0, help="weight of the Chamfer loss")
    w_normal: float = option(0.01, at_least=0.0, help="weight of the normal loss")
    w_occupancy: float = option(1.0, at_least=0.0, help="weight of the occupancy loss")
    w_coverage: float = option(0.01, at_least=0.0, help="weight of the coverage loss")
    w_overlap: float = option(0.1, at_least=0.0, help="weight of the overlap loss")
    sharpness: float = option(250.0, above=0.0, help="occupancy logit = -sharpness * g")
    volume_distance: str = option(
        "surface",
        choices=VOLUME_DISTANCES,
        help="part value the volume losses read: surface distance, implicit, Euclidean-scaled implicit",
    )
    sphere_radius: float = option(0.25, above=0.0, help="radius r of the primitives' sphere")
    checkpoint_every: int = option(
        200, quick=20, at_least=1, identity=False, help="steps between checkpoints"
    )
    log_every: int = option(10, at_least=1, identity=False, help="steps between log records")

    def loss_config(self) -> LossConfig:
        return LossConfig(
            reconstruction=self.w_reconstruction,
            normal=self.w_normal,
            occupancy=self.w_occupancy,
            coverage=self.w_coverage,
            overlap=self.w_overlap,
            sharpness=self.sharpness,
            volume_distance=self.volume_distance,
        )

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            grad_clip=self.grad_clip,
            log_every=self.log_every,
            checkpoint_every=self.checkpoint_every,
            seed=seed,
        )

    def validate(self) -> None:
        try:
            self.loss_config()
        except ValueError as err:
            raise SettingsError(str(err)) from None


@dataclass(kw_only=True)
class ShapesOptions(Settings):
    """Which trained model and which shapes the inference commands use."""

    model: Path = option(DEFAULT_MODEL, help="a saved model folder (train writes <out>/model)")
    inputs: str = option(
        "procedural",
        help="'procedural' (held-out shapes), a mesh file, or a ShapeNet-style folder",
    )
    n_shapes: int = option(4, at_least=1, help="shapes to process (procedural or folder)")
    first: int = option(100_000, at_least=0, help="index of the first procedural shape (held out)")
    subdivisions: int = option(
        4, quick=3, at_least=0, at_most=6, help="icosphere level of the meshes"
    )
    cache_dir: Path | None = option(None, identity=False, help="sample cache folder")


@dataclass(kw_only=True)
class ReconstructSettings(ShapesOptions):
    """``reconstruct``: meshes, renders and metrics of a trained model on shapes."""

    eval_points: int = option(10_000, quick=2_000, at_least=100, help="surface points per metric")


@dataclass(kw_only=True)
class ExportSettings(ShapesOptions):
    """``export``: the part meshes of shapes as PLY or OBJ, one colour per part."""

    format: str = option("ply", choices=("ply", "obj"), help="mesh file format")


@dataclass(kw_only=True)
class RenderSettings(ShapesOptions):
    """``render``: a PNG of the predicted parts (and the input shape) of each shape."""

    columns: int = option(4, at_least=1, help="panels per row")
