"""Headless renders of part meshes to PNG (matplotlib's Agg backend, no display needed).

Each panel shows one shape as its parts, each in its part colour, with Lambert shading from
a fixed light; faces are depth-sorted by matplotlib (painter's algorithm), which is right
for the few thousand triangles per shape drawn here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import trimesh

from verger.core.files import atomic_path
from verger.neural_parts.mesh import PartMeshes, part_colour

_LIGHT = np.array([0.4, -0.5, 0.8]) / np.linalg.norm([0.4, -0.5, 0.8])


def _as_parts(shape: PartMeshes | Sequence[trimesh.Trimesh]) -> list[trimesh.Trimesh]:
    return shape.parts() if isinstance(shape, PartMeshes) else list(shape)


def render_panels(
    panels: Sequence[PartMeshes | Sequence[trimesh.Trimesh]],
    path: str | Path,
    *,
    titles: Sequence[str] | None = None,
    columns: int = 4,
    size: float = 2.6,
    elevation: float = 25.0,
    azimuth: float = -55.0,
    grey: Sequence[bool] | None = None,
    dpi: int = 110,
) -> Path:
    """Draw each panel's parts (coloured per part, or grey) in a grid; write ``path`` (PNG)."""
    if len(panels) == 0:
        raise ValueError("panels is empty: nothing to render")
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f"{len(titles)} titles for {len(panels)} panels")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    fig = plt.figure(figsize=(size * columns, size * rows))
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1, projection="3d")
        # One collection for all parts: matplotlib depth-sorts faces within a collection
        # only, so separate collections would paint hidden parts over visible ones.
        tris_all, colours_all = [], []
        for k, mesh in enumerate(_as_parts(panel)):
            base = np.full(3, 0.75) if grey is not None and grey[i] else part_colour(k) / 255.0
            shade = 0.35 + 0.65 * np.clip(mesh.face_normals @ _LIGHT, 0, 1)
            colours_all.append(np.clip(base[None] * shade[:, None], 0, 1))
            # y-up meshes: draw with z as height (swap y and z, keep handedness)
            tris_all.append(mesh.vertices[mesh.faces][..., [0, 2, 1]] * np.array([1, -1, 1]))
        if tris_all:
            ax.add_collection3d(
                Poly3DCollection(
                    np.concatenate(tris_all), facecolors=np.concatenate(colours_all), linewidths=0
                )
            )
        ax.set_xlim(-0.55, 0.55)
        ax.set_ylim(-0.55, 0.55)
        ax.set_zlim(-0.55, 0.55)
        ax.set_box_aspect((1, 1, 1))
        ax.view_init(elev=elevation, azim=azimuth)
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path
