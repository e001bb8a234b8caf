"""Small geometry helpers: quaternions, sphere samples, the triangulated sphere."""

from __future__ import annotations

import math

import numpy as np
import torch
import trimesh


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` of (not necessarily unit) quaternions ``[..., 4]``.

    Layout (w, x, y, z); the quaternion is normalised first, so any non-zero vector works.
    """
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)),
        (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)),
        (2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)),
    )
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def sphere_directions(
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` unit vectors: uniform random with a generator, else an even Fibonacci lattice."""
    if n < 1:
        raise ValueError(f"n={n!r} must be >= 1")
    if generator is not None:
        d = torch.randn(n, 3, generator=generator, dtype=torch.float64)
        d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return d.to(dtype=dtype, device=device)
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + math.sqrt(5)) * i
    rho = (1 - z * z).clamp_min(0).sqrt()
    d = torch.stack([rho * torch.cos(phi), rho * torch.sin(phi), z], -1)
    return d.to(dtype=dtype, device=device)


def spread_points(n: int, radius: float) -> torch.Tensor:
    """``n`` points evenly spread on a sphere of ``radius`` (``[n, 3]``; the origin when n=1).

    Where the parts start: apart from each other, each nearest to its own region of the shape.
    """
    if n < 1:
        raise ValueError(f"n={n!r} must be >= 1")
    if n == 1:
        return torch.zeros(1, 3)
    return radius * sphere_directions(n)


def icosphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    """A unit icosphere: vertices ``[V, 3]`` (unit length) and faces ``[F, 3]`` (outward).

    10·4^s + 2 vertices and 20·4^s faces; it is a closed 2-manifold, so every mesh obtained
    by moving its vertices with a homeomorphism of space is closed too.
    """
    if not isinstance(subdivisions, int) or isinstance(subdivisions, bool) or subdivisions < 0:
        raise ValueError(f"subdivisions={subdivisions!r} must be an int >= 0")
    if subdivisions > 7:
        raise ValueError(f"subdivisions={subdivisions} > 7 would make over 1.3M faces")
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    vertices /= np.linalg.norm(vertices, axis=1, keepdims=True)
    return vertices, np.asarray(mesh.faces, dtype=np.int64)
