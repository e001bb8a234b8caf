"""Shape metrics: volumetric IoU, Chamfer-L1 and normal consistency, and their evaluation.

- IoU: |pred ∩ gt| / |pred ∪ gt| over uniform points of the padded cube (inside = G <= 0).
- Chamfer-L1: ½ (mean_p min_g ||p - g|| + mean_g min_p ||g - p||) with Euclidean distances
  on area-weighted surface samples (Occupancy Networks' definition, as the paper's tables).
- Normal consistency: ½ (mean_p |<n_p, n_nn(p)>| + mean_g |<n_g, n_nn(g)>|).
The predicted surface is the union's: area-weighted samples of every part's mesh that no
other part contains.
- Part use (does the abstraction use its parts, or collapse into one blob?): each part's
  volume as a share of the union's (``part_shares``), the largest share (``max_part_share``,
  1 when one part holds everything) and ``parts_used``, the parts holding at least
  :data:`PART_USE_SHARE` of the union's volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import trimesh
from scipy.spatial import cKDTree

from verger.neural_parts.data.batches import encoder_input
from verger.neural_parts.data.samples import ShapeSamples
from verger.neural_parts.mesh import PartMeshes, extract_meshes
from verger.neural_parts.model import NeuralParts

PART_USE_SHARE = 0.05


def part_shares(part_inside: np.ndarray) -> np.ndarray:
    """Each part's volume over the union's, from ``part_inside [Q, M]`` (bool) at uniform points.

    Shares add up to more than 1 where parts overlap; all zero when the union is empty.
    """
    inside = np.asarray(part_inside, bool)
    if inside.ndim != 2 or inside.shape[1] == 0:
        raise ValueError(f"part_inside must be a [Q, M] array with M >= 1, got {inside.shape}")
    union = inside.any(axis=1).sum()
    return inside.sum(axis=0) / max(int(union), 1)


def part_use(part_inside: np.ndarray) -> dict[str, float]:
    """``parts_used`` (shares >= PART_USE_SHARE) and ``max_part_share`` of one shape."""
    shares = part_shares(part_inside)
    return {
        "parts_used": float((shares >= PART_USE_SHARE).sum()),
        "max_part_share": float(shares.max()),
    }


def volumetric_iou(pred_inside: np.ndarray, gt_inside: np.ndarray) -> float:
    """IoU of two boolean occupancy arrays over the same points (1.0 when both are empty)."""
    pred, gt = np.asarray(pred_inside, bool), np.asarray(gt_inside, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred_inside {pred.shape} and gt_inside {gt.shape} differ in shape")
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def _check_cloud(name: str, cloud: np.ndarray) -> np.ndarray:
    cloud = np.asarray(cloud, dtype=np.float64)
    if cloud.ndim != 2 or cloud.shape[1] != 3 or len(cloud) == 0:
        raise ValueError(f"{name} must be a non-empty [N, 3] array, got shape {cloud.shape}")
    if not np.isfinite(cloud).all():
        raise ValueError(f"{name} holds NaN or infinite coordinates")
    return cloud


def chamfer_l1(pred: np.ndarray, gt: np.ndarray) -> float:
    """½ (mean pred->gt + mean gt->pred) nearest-neighbour Euclidean distance."""
    p, g = _check_cloud("pred", pred), _check_cloud("gt", gt)
    d_pg = cKDTree(g).query(p)[0]
    d_gp = cKDTree(p).query(g)[0]
    return float(0.5 * (d_pg.mean() + d_gp.mean()))


def normal_consistency(
    pred: np.ndarray, pred_normals: np.ndarray, gt: np.ndarray, gt_normals: np.ndarray
) -> float:
    """½ (mean |<n_p, n_nn>| + mean |<n_g, n_nn>|) between nearest neighbours."""
    p, g = _check_cloud("pred", pred), _check_cloud("gt", gt)
    np_, ng = np.asarray(pred_normals, np.float64), np.asarray(gt_normals, np.float64)
    if np_.shape != p.shape or ng.shape != g.shape:
        raise ValueError("normals must have the shape of their points")
    np_ = np_ / np.linalg.norm(np_, axis=1, keepdims=True).clip(1e-12)
    ng = ng / np.linalg.norm(ng, axis=1, keepdims=True).clip(1e-12)
    to_g = cKDTree(g).query(p)[1]
    to_p = cKDTree(p).query(g)[1]
    a = np.abs((np_ * ng[to_g]).sum(1)).mean()
    b = np.abs((ng * np_[to_p]).sum(1)).mean()
    return float(0.5 * (a + b))


@torch.no_grad()
def union_surface_samples(
    model: NeuralParts,
    cond: torch.Tensor,
    meshes: PartMeshes,
    n: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` area-weighted points (and normals) of the union's surface, for one shape.

    ``cond`` is that shape's ``[1, M, D]`` condition. Points inside another part (by its
    implicit function) are dropped and the draw repeated until ``n`` remain.
    """
    combined = trimesh.Trimesh(
        meshes.vertices.reshape(-1, 3),
        np.concatenate(
            [meshes.faces + i * meshes.vertices.shape[1] for i in range(meshes.n_parts)]
        ),
        process=False,
    )
    labels = meshes.part_labels()
    pts_all, nrm_all = [], []
    have, tries = 0, 0
    while have < n and tries < 20:
        pts, faces = trimesh.sample.sample_surface(combined, 2 * n, seed=rng)
        x = torch.as_tensor(pts, dtype=cond.dtype, device=cond.device)[None]
        g = model.implicit(cond, x)[0].cpu().numpy()  # [P, M]
        g[np.arange(len(pts)), labels[faces]] = np.inf
        keep = g.min(1) > 0
        pts_all.append(pts[keep])
        nrm_all.append(combined.face_normals[faces[keep]])
        have += int(keep.sum())
        tries += 1
    if have == 0:
        raise RuntimeError("no point of the predicted surface lies outside the other parts")
    return np.concatenate(pts_all)[:n], np.concatenate(nrm_all)[:n]


@dataclass
class ShapeResult:
    """A shape's metrics and the predicted part meshes they were computed on."""

    metrics: dict[str, float]
    meshes: PartMeshes


@torch.no_grad()
def encode(
    model: NeuralParts,
    shape: ShapeSamples,
    *,
    device: torch.device | str = "cpu",
    n_input: int = 1024,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """The conditions ``[1, M, D]`` of one shape (its encoder input drawn with ``rng``)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    config = model.config
    inp = encoder_input(shape, config.encoder, n_input, rng, image_size=config.image_size)
    dtype = next(model.parameters()).dtype
    return model(torch.as_tensor(inp, dtype=dtype, device=device)[None])


@torch.no_grad()
def evaluate_shapes(
    model: NeuralParts,
    shapes: Sequence[ShapeSamples],
    *,
    device: torch.device | str = "cpu",
    n_points: int = 10_000,
    n_input: int = 1024,
    subdivisions: int = 4,
    seed: int = 0,
) -> list[ShapeResult]:
    """IoU, Chamfer-L1 and normal consistency of ``model`` on each shape, with its meshes."""
    model.eval()
    rng = np.random.default_rng(seed)
    results = []
    for shape in shapes:
        cond = encode(model, shape, device=device, n_input=n_input, rng=rng)
        volume = torch.as_tensor(shape.volume, dtype=cond.dtype, device=device)[None]
        part_inside = model.part_occupancy(cond, volume)[0].cpu().numpy()
        pred_inside = np.asarray(part_inside.any(axis=1))
        (meshes,) = extract_meshes(model, cond, subdivisions=subdivisions)
        pts, nrm = union_surface_samples(model, cond, meshes, n_points, rng)
        gi = rng.choice(len(shape.surface), size=min(n_points, len(shape.surface)), replace=False)
        metrics = {
            "iou": volumetric_iou(pred_inside, shape.occupancy),
            "chamfer_l1": chamfer_l1(pts, shape.surface[gi]),
            "normal_consistency": normal_consistency(
                pts, nrm, shape.surface[gi], shape.normals[gi]
            ),
            **part_use(part_inside),
        }
        results.append(ShapeResult(metrics, meshes))
    return results


def mean_metrics(results: Sequence[ShapeResult]) -> dict[str, float]:
    """Per-metric mean over shapes."""
    if not results:
        raise ValueError("results is empty")
    return {k: float(np.mean([r.metrics[k] for r in results])) for k in results[0].metrics}
