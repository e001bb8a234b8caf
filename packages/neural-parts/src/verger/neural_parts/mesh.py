"""Meshes of the parts: a triangulated sphere pushed forward through each primitive.

Every part's mesh has the icosphere's connectivity and vertices moved by a homeomorphism,
so it is closed and manifold by construction (no marching cubes, no holes), and orientation
is kept (the coupling, scale and rotation steps all have a positive Jacobian determinant),
so faces point outward. Export: PLY (vertex and face colours) or OBJ (one group per part,
vertex colours in the common ``v x y z r g b`` extension).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh

from verger.core.files import atomic_path, atomic_write_text
from verger.neural_parts.geometry import icosphere
from verger.neural_parts.model import NeuralParts

# Colour-blind friendly (Okabe-Ito) then tab10 extras: the part index picks the colour.
PART_COLOURS = np.array(
    [
        (230, 159, 0),
        (86, 180, 233),
        (0, 158, 115),
        (240, 228, 66),
        (0, 114, 178),
        (213, 94, 0),
        (204, 121, 167),
        (140, 86, 75),
        (127, 127, 127),
        (188, 189, 34),
    ],
    dtype=np.uint8,
)


def part_colour(index: int) -> np.ndarray:
    """RGB uint8 colour of part ``index`` (the palette repeats after 10)."""
    return PART_COLOURS[index % len(PART_COLOURS)]


@dataclass
class PartMeshes:
    """The parts of one shape: vertices ``[M, V, 3]`` sharing the faces ``[F, 3]``."""

    vertices: np.ndarray
    faces: np.ndarray

    @property
    def n_parts(self) -> int:
        return int(self.vertices.shape[0])

    def part(self, index: int) -> trimesh.Trimesh:
        """Part ``index`` as a trimesh (no processing: the connectivity stays the sphere's)."""
        return trimesh.Trimesh(self.vertices[index], self.faces, process=False)

    def parts(self) -> list[trimesh.Trimesh]:
        return [self.part(i) for i in range(self.n_parts)]

    def combined(self) -> trimesh.Trimesh:
        """All parts in one mesh, each face and vertex coloured by its part."""
        n_v, n_f = self.vertices.shape[1], self.faces.shape[0]
        faces = np.concatenate([self.faces + i * n_v for i in range(self.n_parts)])
        mesh = trimesh.Trimesh(self.vertices.reshape(-1, 3), faces, process=False)
        rgba = np.concatenate([part_colour(i) for i in range(self.n_parts)]).reshape(-1, 3)
        rgba = np.concatenate([rgba, np.full((self.n_parts, 1), 255, np.uint8)], axis=1)
        mesh.visual = trimesh.visual.ColorVisuals(
            mesh,
            face_colors=np.repeat(rgba, n_f, axis=0),
            vertex_colors=np.repeat(rgba, n_v, axis=0),
        )
        return mesh

    def part_labels(self) -> np.ndarray:
        """The part of each face of :meth:`combined`."""
        return np.repeat(np.arange(self.n_parts), self.faces.shape[0])


@torch.no_grad()
def extract_meshes(
    model: NeuralParts, cond: torch.Tensor, *, subdivisions: int = 3
) -> list[PartMeshes]:
    """Push an icosphere with ``subdivisions`` through every primitive of every shape.

    ``model`` is a :class:`verger.neural_parts.NeuralParts`; ``cond`` its conditions
    ``[B, M, D]``. Returns one :class:`PartMeshes` per shape (20·4^s faces per part).
    """
    vertices, faces = icosphere(subdivisions)
    directions = torch.as_tensor(vertices, dtype=cond.dtype, device=cond.device)
    moved = model.surface(cond, directions)  # [B, M, V, 3]
    out = moved.detach().cpu().double().numpy()
    return [PartMeshes(out[b], faces) for b in range(out.shape[0])]


def export_mesh(meshes: PartMeshes, path: str | Path) -> Path:
    """Write the coloured parts to ``path`` (``.ply`` or ``.obj``), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".ply":
        data = trimesh.exchange.ply.export_ply(meshes.combined(), encoding="binary")
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    elif suffix == ".obj":
        atomic_write_text(path, obj_text(meshes))
    else:
        raise ValueError(f"path={str(path)!r}: the format must be .ply or .obj, got {suffix!r}")
    return path


def obj_text(meshes: PartMeshes) -> str:
    """Wavefront OBJ: ``o part_<m>`` groups, vertex colours in [0, 1], 1-based faces."""
    lines = ["# verger-neural-parts: one object per part, vertex colours per part"]
    n_v = meshes.vertices.shape[1]
    for m in range(meshes.n_parts):
        r, g, b = (part_colour(m) / 255.0).tolist()
        lines.append(f"o part_{m}")
        lines += [
            f"v {x:.6f} {y:.6f} {z:.6f} {r:.4f} {g:.4f} {b:.4f}" for x, y, z in meshes.vertices[m]
        ]
        base = m * n_v + 1
        lines += [f"f {a + base} {b_ + base} {c + base}" for a, b_, c in meshes.faces]
    return "\n".join(lines) + "\n"
