"""The embedded training set: procedural unions of deformed superquadrics with known parts.

Each shape is 2-5 (configurable) superquadric parts attached to one another, each with a
random size, shape exponents, rotation, and a taper and a twist about its own z axis (so a
part is generally *not* a superquadric: the baseline cannot fit it exactly, while a single
Neural Parts primitive can). Everything is analytic: the occupancy is exact
(inside iff a part's undeformed local point is inside its superquadric), the surface comes
from each part's mesh (a sphere pushed onto it) restricted to what lies outside the other
parts, and the part of every surface point is known.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import trimesh

from verger.core.validation import integer
from verger.neural_parts.data.samples import (
    SampleSpec,
    ShapeSamples,
    volume_samples,
)
from verger.neural_parts.geometry import icosphere, quaternion_to_matrix
from verger.neural_parts.superquadric import radial_distance, surface_along

GENERATOR_VERSION = 1  # bump when the shapes a seed gives change (cache keys include it)


@dataclass(kw_only=True)
class ProceduralConfig:
    """Ranges of the random shapes (sizes before the shape is normalised to the unit cube)."""

    min_parts: int = 2
    max_parts: int = 5
    size_range: tuple[float, float] = (0.12, 0.4)
    eps_range: tuple[float, float] = (0.3, 1.4)
    max_taper: float = 0.5
    max_twist: float = 1.2  # radians from the part's bottom (z = -a3) to its top (z = +a3)

    def __post_init__(self) -> None:
        integer("min_parts", self.min_parts, at_least=1)
        integer("max_parts", self.max_parts, at_least=self.min_parts)
        for name, lo, hi in (("size_range", 0.01, 2.0), ("eps_range", 0.1, 1.9)):
            r = getattr(self, name)
            if not (len(r) == 2 and lo <= r[0] <= r[1] <= hi):
                raise ValueError(
                    f"{name}={r!r} must be (low, high) with {lo} <= low <= high <= {hi}"
                )
        if not 0 <= self.max_taper < 1:
            raise ValueError(f"max_taper={self.max_taper!r} must be in [0, 1)")
        if not 0 <= self.max_twist <= math.pi:
            raise ValueError(f"max_twist={self.max_twist!r} must be in [0, pi]")

    def key(self) -> str:
        return repr(sorted(asdict(self).items()))


@dataclass
class Part:
    """One deformed superquadric: local point q -> taper -> twist -> rotate -> translate."""

    size: np.ndarray  # [3]
    eps: np.ndarray  # [2]
    quaternion: np.ndarray  # [4]
    translation: np.ndarray  # [3]
    taper: np.ndarray  # [2]: x and y scale by (1 + taper·z/a3)
    twist: float  # radians per unit of z/a3

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
        rot = quaternion_to_matrix(t(self.quaternion))
        return t(self.size), t(self.eps), rot, t(self.translation), t(self.taper)

    def deform(self, q: torch.Tensor) -> torch.Tensor:
        """Superquadric-local points -> world points."""
        size, _, rot, trans, taper = self._tensors()
        zn = q[:, 2:3] / size[2]
        xy = q[:, :2] * (1 + taper * zn)
        ang = self.twist * zn[:, 0]
        c, s = torch.cos(ang), torch.sin(ang)
        x = torch.stack([c * xy[:, 0] - s * xy[:, 1], s * xy[:, 0] + c * xy[:, 1], q[:, 2]], -1)
        return x @ rot.T + trans

    def undeform(self, x: torch.Tensor) -> torch.Tensor:
        """World points -> superquadric-local points (the exact inverse of :meth:`deform`)."""
        size, _, rot, trans, taper = self._tensors()
        p = (x - trans) @ rot
        zn = p[:, 2:3] / size[2]
        ang = -self.twist * zn[:, 0]
        c, s = torch.cos(ang), torch.sin(ang)
        xy = torch.stack([c * p[:, 0] - s * p[:, 1], s * p[:, 0] + c * p[:, 1]], -1)
        return torch.cat([xy / (1 + taper * zn), p[:, 2:3]], -1)

    def implicit(self, x: np.ndarray) -> np.ndarray:
        """Radial distance in the undeformed frame (negative inside), ``[N]``."""
        size, eps = self._tensors()[:2]
        q = self.undeform(torch.as_tensor(x, dtype=torch.float64))
        return radial_distance(q, size, eps).numpy()

    def mesh(self, subdivisions: int = 4) -> trimesh.Trimesh:
        """A closed mesh of the part: an icosphere pushed onto it."""
        directions, faces = icosphere(subdivisions)
        size, eps = self._tensors()[:2]
        q = surface_along(torch.as_tensor(directions), size, eps)
        return trimesh.Trimesh(self.deform(q).numpy(), faces, process=False)

    def scaled(self, factor: float, centre: np.ndarray) -> Part:
        """The part after the map x -> (x - centre)·factor (taper and twist are scale-free)."""
        return Part(
            size=self.size * factor,
            eps=self.eps,
            quaternion=self.quaternion,
            translation=(self.translation - centre) * factor,
            taper=self.taper,
            twist=self.twist,
        )


def random_parts(rng: np.random.Generator, config: ProceduralConfig) -> list[Part]:
    """A connected union: each new part is centred on the surface of an earlier one."""
    n = int(rng.integers(config.min_parts, config.max_parts + 1))
    parts: list[Part] = []
    for i in range(n):
        size = rng.uniform(*config.size_range, size=3)
        translation = np.zeros(3)
        if i > 0:
            host = parts[int(rng.integers(0, i))]
            mesh = host.mesh(1)
            translation = np.asarray(mesh.vertices[int(rng.integers(0, len(mesh.vertices)))])
        parts.append(
            Part(
                size=size,
                eps=rng.uniform(*config.eps_range, size=2),
                quaternion=rng.normal(size=4),
                translation=translation,
                taper=rng.uniform(-config.max_taper, config.max_taper, size=2),
                twist=float(rng.uniform(-config.max_twist, config.max_twist)),
            )
        )
    parts = [p for p, f in zip(parts, visible_fractions(parts, rng)) if f >= 0.03] or parts[:1]
    meshes = [p.mesh(4) for p in parts]  # the sampling meshes' resolution: exact bounds
    lo = np.min([m.bounds[0] for m in meshes], axis=0)
    hi = np.max([m.bounds[1] for m in meshes], axis=0)
    factor = 1.0 / float(np.max(hi - lo))
    return [p.scaled(factor, (lo + hi) / 2) for p in parts]


def visible_fractions(parts: list[Part], rng: np.random.Generator, n: int = 3000) -> np.ndarray:
    """Share of the union's surface area that each part contributes (a swallowed part: 0)."""
    meshes = [p.mesh(2) for p in parts]
    areas = np.array([m.area for m in meshes])
    visible = np.zeros(len(parts))
    for k, mesh in enumerate(meshes):
        count = max(16, int(n * areas[k] / areas.sum()))
        pts, _ = trimesh.sample.sample_surface(mesh, count, seed=rng)
        g = part_implicits(parts, pts)
        g[:, k] = np.inf
        visible[k] = areas[k] * float((g.min(1) > 0).mean())
    return visible / max(float(visible.sum()), 1e-12)


def part_implicits(parts: list[Part], x: np.ndarray) -> np.ndarray:
    """``[N, P]`` implicit values of every part."""
    return np.stack([p.implicit(x) for p in parts], -1)


def procedural_samples(
    parts: list[Part], spec: SampleSpec, *, seed: int, name: str, subdivisions: int = 4
) -> ShapeSamples:
    """Pools of one procedural shape: union surface with normals and part labels, occupancy."""
    rng = np.random.default_rng(seed)
    meshes = [p.mesh(subdivisions) for p in parts]
    areas = np.array([m.area for m in meshes])
    chunks, normal_chunks, label_chunks = [], [], []
    need = spec.n_surface
    while need > 0:
        # area-weighted over the part meshes, then keep what no other part covers
        counts = rng.multinomial(2 * need + 64, areas / areas.sum())
        for k, (mesh, count) in enumerate(zip(meshes, counts)):
            pts, faces = trimesh.sample.sample_surface(mesh, int(count), seed=rng)
            if len(pts) == 0:
                continue
            g = part_implicits(parts, pts)
            g[:, k] = np.inf
            keep = g.min(1) > 0
            chunks.append(pts[keep])
            normal_chunks.append(mesh.face_normals[faces[keep]])
            label_chunks.append(np.full(int(keep.sum()), k))
        need = spec.n_surface - sum(len(c) for c in chunks)
    order = rng.permutation(sum(len(c) for c in chunks))[: spec.n_surface]
    surface = np.concatenate(chunks)[order]
    normals = np.concatenate(normal_chunks)[order]
    labels = np.concatenate(label_chunks)[order]
    volume, occupancy, voxels = volume_samples(
        lambda x: part_implicits(parts, x).min(1) < 0, spec, rng
    )
    return ShapeSamples(
        name=name,
        surface=surface.astype(np.float32),
        normals=normals.astype(np.float32),
        volume=volume,
        occupancy=occupancy,
        half_extent=spec.half_extent,
        voxels=voxels,
        surface_parts=labels.astype(np.int16),
        n_parts=len(parts),
    )
