"""The model, loss and sampling settings, with the official Neural Parts values as defaults.

Each config is a kw-only dataclass checked in ``__post_init__``: a bad value raises a
``ValueError`` naming the field, the value and what is allowed, before any work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from verger.core.validation import finite_number, integer, one_of

PRIMITIVES = ("inn", "superquadric")
ENCODERS = ("pointnet", "voxel", "image")
FEATURE_NORMS = ("running", "layer")
VOLUME_DISTANCES = ("surface", "implicit", "scaled")


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a Neural Parts model (official configuration by default).

    - ``n_primitives``: M, the number of parts.
    - ``primitive``: ``"inn"`` (Neural Parts: a conditional invertible network deforms a
      sphere) or ``"superquadric"`` (the baseline: each part a superquadric predicted from the
      same condition).
    - ``encoder``: ``"pointnet"`` (surface point cloud, default), ``"voxel"`` (occupancy grid,
      torchvision R3D-18) or ``"image"`` (a depth image, torchvision ResNet-18, frozen
      BatchNorm), all built without downloaded weights.
    - ``feature_dim`` / ``embedding_dim``: the shape feature F and the learned per-primitive
      embedding z_m; the condition is C_m = [F; z_m].
    - ``n_blocks``, ``hidden``, ``projection_dim``: coupling layers, width of their s/t
      networks and of the 3 -> hidden -> projection_dim network on the fixed coordinates.
    - ``sphere_radius``: r; ``scale_clip``: the coupling log-scales s are clamped to
      [-scale_clip, scale_clip].
    - ``head_hidden``: width of the scale / rotation / translation head.
    - ``mask_seed``: which coordinate each coupling layer transforms (a seeded permutation).
    - ``feature_norm``: ``"running"`` standardises F with running statistics over the shapes
      seen in training (so F varies from shape to shape from the start), ``"layer"`` is a
      LayerNorm (per shape, over the feature's entries: F stays nearly input-independent
      for many steps).
    - ``init_spread``: the parts start centred on an even spread of points at this distance
      from the origin (the shapes fill the unit cube); 0 starts them all at the centre, where
      one part takes the whole shape and the others shrink inside it.
    """

    n_primitives: int = 5
    primitive: str = "inn"
    encoder: str = "pointnet"
    feature_dim: int = 256
    embedding_dim: int = 256
    n_blocks: int = 4
    hidden: int = 256
    projection_dim: int = 128
    sphere_radius: float = 0.25
    scale_clip: float = 10.0
    head_hidden: int = 256
    pointnet_hidden: int = 128
    voxel_resolution: int = 32
    image_size: int = 64
    mask_seed: int = 0
    feature_norm: str = "running"
    init_spread: float = 0.25

    def __post_init__(self) -> None:
        integer("n_primitives", self.n_primitives, at_least=1)
        one_of("primitive", self.primitive, PRIMITIVES)
        one_of("encoder", self.encoder, ENCODERS)
        for name in ("feature_dim", "embedding_dim", "n_blocks", "hidden", "projection_dim"):
            integer(name, getattr(self, name), at_least=1)
        integer("head_hidden", self.head_hidden, at_least=1)
        integer("pointnet_hidden", self.pointnet_hidden, at_least=1)
        integer("voxel_resolution", self.voxel_resolution, at_least=8)
        integer("image_size", self.image_size, at_least=32)
        integer("mask_seed", self.mask_seed, at_least=0)
        self.sphere_radius = finite_number("sphere_radius", self.sphere_radius, above=0)
        self.scale_clip = finite_number("scale_clip", self.scale_clip, above=0)
        one_of("feature_norm", self.feature_norm, FEATURE_NORMS)
        self.init_spread = finite_number("init_spread", self.init_spread, at_least=0, at_most=1)

    @property
    def condition_dim(self) -> int:
        """Size of C_m = [F; z_m]."""
        return self.feature_dim + self.embedding_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return cls(**values)


@dataclass(kw_only=True)
class LossConfig:
    """Weights and shapes of the five losses (the released config's values by default).

    total = reconstruction·rec + normal·normal + occupancy·occ + coverage·cov + overlap·ovl.
    ``sharpness`` turns an implicit value g into an occupancy logit -sharpness·g;
    ``overlap_threshold`` is how much summed soft occupancy a point may carry before the
    overlap loss charges it; ``coverage_k`` the inside points each primitive must cover.
    A weight of 0 skips computing that loss.

    ``volume_distance``: what the occupancy, coverage and overlap losses read as part m's
    value at a query point. ``"surface"`` (the released code's choice): the Euclidean
    distance to part m's sampled surface points, negative inside (the sign from the exact
    implicit), so a part is charged by how far it really is. ``"implicit"``: the exact
    ||φ^-1(x)|| - r, measured in the part's sphere space: a part that has grown has smaller
    values everywhere and can win the union's minimum at every uncovered point. ``"scaled"``:
    the exact implicit divided by the local scale of the part's map, exp(log|det ∂y/∂x| / 3)
    (the geometric mean of the inverse Jacobian's singular values), which turns it back into
    approximately Euclidean units so that parts are comparable (exactly the signed distance
    for a sphere that is only scaled and moved). The superquadrics' radial distance is already
    Euclidean: for them ``"scaled"`` is the same as ``"implicit"``. See the README.
    """

    reconstruction: float = 0.3
    normal: float = 0.01
    occupancy: float = 1.0
    coverage: float = 0.01
    overlap: float = 0.1
    sharpness: float = 250.0
    overlap_threshold: float = 1.95
    coverage_k: int = 10
    volume_distance: str = "surface"

    def __post_init__(self) -> None:
        for name in ("reconstruction", "normal", "occupancy", "coverage", "overlap"):
            setattr(self, name, finite_number(name, getattr(self, name), at_least=0))
        if not any(getattr(self, n) for n in ("reconstruction", "occupancy")):
            raise ValueError(
                "reconstruction and occupancy weights are both 0: nothing ties the parts to "
                "the shape; give one of them a weight > 0"
            )
        self.sharpness = finite_number("sharpness", self.sharpness, above=0)
        self.overlap_threshold = finite_number("overlap_threshold", self.overlap_threshold, above=0)
        integer("coverage_k", self.coverage_k, at_least=1)
        one_of("volume_distance", self.volume_distance, VOLUME_DISTANCES)


@dataclass(kw_only=True)
class SampleConfig:
    """Points drawn per shape and training step (official counts by default).

    - ``n_surface``: ground-truth surface points (with normals) for the Chamfer and normal
      losses (official 1500-2000).
    - ``n_volume``: occupancy points, drawn half inside and half outside with importance
      weights that undo the balancing (official 5000).
    - ``n_sphere``: sphere points pushed onto every primitive (official 200-500).
    - ``n_input``: points of the encoder's input point cloud.
    """

    n_surface: int = 2000
    n_volume: int = 5000
    n_sphere: int = 200
    n_input: int = 1024

    def __post_init__(self) -> None:
        for name in ("n_surface", "n_sphere", "n_input"):
            integer(name, getattr(self, name), at_least=1)
        integer("n_volume", self.n_volume, at_least=2)
