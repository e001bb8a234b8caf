"""Training batches drawn from sample pools; batch k is a pure function of (seed, rank, k).

So the data position is one integer (``state_dict() == {"step": k}``) and a resumed run
sees exactly the batches it would have seen. Each rank of a data-parallel run draws its own
shapes (the rank enters the seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from verger.core.validation import integer, one_of
from verger.neural_parts.config import ENCODERS, SampleConfig
from verger.neural_parts.data.samples import ShapeSamples, depth_image
from verger.neural_parts.geometry import sphere_directions


@dataclass
class Batch:
    """One step's tensors: encoder input, sphere directions and the loss targets."""

    inputs: torch.Tensor  # point cloud [B, N, 3] | voxels [B, R, R, R] | image [B, 1, H, W]
    directions: torch.Tensor  # [N_sphere, 3]
    surface: torch.Tensor  # [B, K, 3]
    normals: torch.Tensor  # [B, K, 3]
    volume: torch.Tensor  # [B, Q, 3]
    occupancy: torch.Tensor  # [B, Q] (1 inside)
    weights: torch.Tensor  # [B, Q]
    indices: torch.Tensor  # [B] shape indices

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        moved: dict[str, Any] = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            moved[f.name] = t.to(device)
        return Batch(**moved)


def encoder_input(
    shape: ShapeSamples, kind: str, n_points: int, rng: np.random.Generator, *, image_size: int = 64
) -> np.ndarray:
    """The encoder's view of a shape: a surface point cloud, its voxels or a depth image."""
    one_of("kind", kind, ENCODERS)
    if kind == "pointnet":
        idx = rng.choice(len(shape.surface), size=n_points, replace=len(shape.surface) < n_points)
        return shape.surface[idx]
    if kind == "voxel":
        if shape.voxels is None:
            raise ValueError(
                f"{shape.name}: no voxels in its samples (SampleSpec.voxel_resolution=0)"
            )
        return shape.voxels.astype(np.float32)
    return depth_image(shape.surface, image_size, shape.half_extent)[None]


def balanced_volume(
    shape: ShapeSamples, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` occupancy points, half inside and half outside, with importance weights.

    A point from a class of pool fraction p drawn with probability 1/2 gets weight 2p, so a
    weighted mean over the batch estimates the mean over the uniform cube. A shape with no
    inside (or no outside) point falls back to uniform draws with weight 1.
    """
    inside = np.flatnonzero(shape.occupancy)
    outside = np.flatnonzero(~shape.occupancy)
    if len(inside) == 0 or len(outside) == 0:
        idx = rng.integers(0, len(shape.volume), size=n)
        return shape.volume[idx], shape.occupancy[idx].astype(np.float32), np.ones(n, np.float32)
    n_in = n // 2
    idx = np.concatenate([rng.choice(inside, size=n_in), rng.choice(outside, size=n - n_in)])
    frac = len(inside) / len(shape.volume)
    w = np.concatenate([np.full(n_in, 2 * frac), np.full(n - n_in, 2 * (1 - frac))])
    return shape.volume[idx], shape.occupancy[idx].astype(np.float32), w.astype(np.float32)


class BatchStream:
    """An endless iterator of :class:`Batch` es over ``shapes``, resumable by step.

    ``batch(step)`` draws ``batch_size`` shapes and their points from a generator seeded
    with (seed, rank, step); iterating yields ``batch(self.step)`` and advances ``step``.
    """

    def __init__(
        self,
        shapes: Sequence[ShapeSamples],
        *,
        samples: SampleConfig,
        batch_size: int,
        encoder: str = "pointnet",
        image_size: int = 64,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        if len(shapes) == 0:
            raise ValueError("shapes is empty: a batch stream needs at least one shape")
        self.shapes = list(shapes)
        self.samples = samples
        self.batch_size = integer("batch_size", batch_size, at_least=1)
        self.encoder = one_of("encoder", encoder, ENCODERS)
        self.image_size = image_size
        self.seed = integer("seed", seed, at_least=0)
        self.rank = integer("rank", rank, at_least=0)
        self.step = 0

    def batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, self.rank, step])
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        picks = rng.integers(0, len(self.shapes), size=self.batch_size)
        s = self.samples
        inputs, surf, normals, vol, occ, w = [], [], [], [], [], []
        for i in picks:
            shape = self.shapes[int(i)]
            inputs.append(
                encoder_input(shape, self.encoder, s.n_input, rng, image_size=self.image_size)
            )
            idx = rng.choice(
                len(shape.surface), size=s.n_surface, replace=len(shape.surface) < s.n_surface
            )
            surf.append(shape.surface[idx])
            normals.append(shape.normals[idx])
            v, o, ww = balanced_volume(shape, s.n_volume, rng)
            vol.append(v)
            occ.append(o)
            w.append(ww)
        t = lambda xs: torch.from_numpy(np.stack(xs)).float()  # noqa: E731
        return Batch(
            inputs=t(inputs),
            directions=sphere_directions(s.n_sphere, generator=gen),
            surface=t(surf),
            normals=t(normals),
            volume=t(vol),
            occupancy=t(occ),
            weights=t(w),
            indices=torch.from_numpy(picks),
        )

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"the checkpoint's data seed {state.get('seed')} differs from this run's {self.seed}"
            )
        self.step = integer("step", state["step"], at_least=0)
