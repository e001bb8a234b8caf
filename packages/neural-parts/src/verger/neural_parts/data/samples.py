"""Per-shape sample pools (surface, normals, occupancy, voxels) and their cache files.

A shape is normalised into the unit cube centred at the origin (longest side 1). Its
:class:`ShapeSamples` hold area-weighted surface points with outward normals, uniform points
of the padded cube with their inside/outside label, an occupancy grid, and (for procedural
shapes) the part each surface point belongs to. Training batches draw from these pools
(:mod:`verger.neural_parts.data.batches`); metrics use them as the ground truth.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from verger.core.files import atomic_path, build_once
from verger.core.validation import integer

FORMAT = 1


@dataclass(kw_only=True)
class SampleSpec:
    """Sizes of the pools built once per shape (training draws per-step subsets from them).

    ``padding``: the occupancy points fill the cube [-0.5-padding, 0.5+padding]^3;
    ``voxel_resolution``: the occupancy grid for the voxel encoder (0: none).
    """

    n_surface: int = 20_000
    n_volume: int = 50_000
    voxel_resolution: int = 32
    padding: float = 0.05

    def __post_init__(self) -> None:
        integer("n_surface", self.n_surface, at_least=16)
        integer("n_volume", self.n_volume, at_least=16)
        integer("voxel_resolution", self.voxel_resolution, at_least=0)
        if not (isinstance(self.padding, int | float) and 0 <= self.padding <= 1):
            raise ValueError(f"padding={self.padding!r} must be a number in [0, 1]")

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def half_extent(self) -> float:
        return 0.5 + float(self.padding)


@dataclass
class ShapeSamples:
    """Ground-truth pools of one shape (float32 / bool numpy arrays)."""

    name: str
    surface: np.ndarray  # [S, 3]
    normals: np.ndarray  # [S, 3], unit, outward
    volume: np.ndarray  # [V, 3], uniform in the padded cube
    occupancy: np.ndarray  # [V] bool
    half_extent: float
    voxels: np.ndarray | None = None  # [R, R, R] bool
    surface_parts: np.ndarray | None = None  # [S] int, known parts (procedural shapes)
    n_parts: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("surface", "normals", "volume"):
            a = getattr(self, name)
            if a.ndim != 2 or a.shape[1] != 3 or len(a) == 0:
                raise ValueError(
                    f"{self.name}: {name} must be a non-empty [N, 3] array, got {a.shape}"
                )
            if not np.isfinite(a).all():
                raise ValueError(f"{self.name}: {name} holds NaN or infinite coordinates")
        if self.normals.shape != self.surface.shape:
            raise ValueError(
                f"{self.name}: normals {self.normals.shape} != surface {self.surface.shape}"
            )
        if self.occupancy.shape != (len(self.volume),):
            raise ValueError(f"{self.name}: occupancy must be [{len(self.volume)}]")

    @property
    def inside_fraction(self) -> float:
        return float(self.occupancy.mean())

    def save(self, path: str | Path) -> None:
        """Write one ``.npz`` atomically."""
        arrays: dict[str, Any] = {
            "surface": self.surface,
            "normals": self.normals,
            "volume": self.volume,
            "occupancy": self.occupancy,
        }
        if self.voxels is not None:
            arrays["voxels"] = self.voxels
        if self.surface_parts is not None:
            arrays["surface_parts"] = self.surface_parts
        meta = {
            "format": FORMAT,
            "name": self.name,
            "half_extent": self.half_extent,
            "n_parts": self.n_parts,
            "extra": self.extra,
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> ShapeSamples:
        """Read what :meth:`save` wrote; a damaged file raises ``ValueError`` naming it."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                if meta.get("format") != FORMAT:
                    raise ValueError(f"unknown format {meta.get('format')!r}")
                return cls(
                    name=meta["name"],
                    surface=data["surface"],
                    normals=data["normals"],
                    volume=data["volume"],
                    occupancy=data["occupancy"],
                    half_extent=float(meta["half_extent"]),
                    voxels=data.get("voxels"),
                    surface_parts=data.get("surface_parts"),
                    n_parts=int(meta["n_parts"]),
                    extra=dict(meta.get("extra", {})),
                )
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(
                f"{path}: damaged sample cache ({type(exc).__name__}: {exc}); delete it to rebuild"
            ) from None


def uniform_cube(n: int, half_extent: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniform points of [-h, h]^3 (float32)."""
    return rng.uniform(-half_extent, half_extent, size=(n, 3)).astype(np.float32)


def voxel_centres(resolution: int, half_extent: float) -> np.ndarray:
    """Centres of a ``resolution``^3 grid over [-h, h]^3, in C order (x slowest)."""
    edges = (np.arange(resolution) + 0.5) / resolution * 2 * half_extent - half_extent
    grid = np.stack(np.meshgrid(edges, edges, edges, indexing="ij"), -1)
    return grid.reshape(-1, 3).astype(np.float32)


def volume_samples(
    inside: Callable[[np.ndarray], np.ndarray], spec: SampleSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Uniform points of the padded cube, their labels, and the voxel grid (or None).

    ``inside(points [N, 3]) -> bool [N]`` is the shape's inside test.
    """
    h = spec.half_extent
    volume = uniform_cube(spec.n_volume, h, rng)
    voxels = None
    if spec.voxel_resolution:
        r = spec.voxel_resolution
        voxels = inside(voxel_centres(r, h)).reshape(r, r, r)
    return volume, inside(volume), voxels


def cache_key(*parts: str) -> str:
    """A short stable hash of the strings that decide a cache file's content."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def cached_samples(path: Path, build: Callable[[], ShapeSamples]) -> ShapeSamples:
    """Load ``path`` or build and save it once, under a lock shared by all processes."""

    def load() -> ShapeSamples | None:
        return ShapeSamples.load(path) if path.is_file() else None

    def make() -> ShapeSamples:
        samples = build()
        samples.save(path)
        return samples

    return build_once(path, load, make)


def depth_image(surface: np.ndarray, size: int, half_extent: float) -> np.ndarray:
    """An orthographic depth image ``[size, size]`` (float32, 0 = background) of surface points.

    The view looks down -z from above the shape, tilted (rotations about x then y) so that
    three faces of a box are visible; each pixel keeps its nearest point (a z-buffer).
    """
    a, b = np.deg2rad(35.0), np.deg2rad(45.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    p = surface.astype(np.float64) @ (rx @ ry).T
    reach = half_extent * np.sqrt(3)
    ij = np.clip(((p[:, :2] + reach) / (2 * reach) * size).astype(int), 0, size - 1)
    height = (p[:, 2] + reach) / (2 * reach)  # in (0, 1), larger = nearer the camera
    image = np.zeros(size * size)
    np.maximum.at(image, ij[:, 1] * size + ij[:, 0], height)
    return image.reshape(size, size)[::-1].astype(np.float32)
