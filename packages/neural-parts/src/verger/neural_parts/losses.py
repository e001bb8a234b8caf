"""The five Neural Parts losses, as plain functions of tensors, and their weighted sum.

Notation: g ``[B, Q, M]`` is every primitive's implicit value at Q query points (< 0
inside); o ``[B, Q]`` the ground-truth occupancy (1 inside) and w ``[B, Q]`` its importance
weights; ``sharpness`` = 250 turns g into an occupancy logit -sharpness·g.

- reconstruction: bidirectional Chamfer with Euclidean distances between the primitives'
  surface points (those inside another primitive are ignored: they are not on the union's
  surface) and the ground-truth surface points.
- normal: 1 - <n, ∇g_m/||∇g_m||> at the ground-truth surface points, m the primitive with
  the smallest g_m² there.
- occupancy: weighted binary cross-entropy of the union G = min_m g_m with logit -sharpness·G.
- coverage: for each primitive, -log(sigmoid(-sharpness·g_m) + 1e-6) averaged over the k
  ground-truth inside points where g_m is smallest (each primitive must hold some of the
  shape, so none collapses or drifts away).
- overlap: max(0, Σ_m sigmoid(-sharpness·g_m) - threshold) averaged over the query points.

The three volume losses read g at the occupancy points as the exact implicit, as the exact
implicit in Euclidean units (``"scaled"``) or, by default (as the released code), as
:func:`signed_surface_distance`: the Euclidean distance to each part's sampled surface
points with the exact implicit's sign.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from verger.neural_parts.config import LossConfig
from verger.neural_parts.model import NeuralParts


def reconstruction_loss(
    primitive_points: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Chamfer (Euclidean) between ``primitive_points [B, M, N, 3]`` and ``target [B, K, 3]``.

    ``valid [B, M, N]`` marks the primitive points on the union's surface; the others count
    in neither direction. mean_k min_p ||t_k - p|| + mean_p min_k ||p - t_k||, averaged over
    the batch.
    """
    b = primitive_points.shape[0]
    pred = primitive_points.reshape(b, -1, 3)
    keep = (
        torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device)
        if valid is None
        else valid.reshape(b, -1)
    )
    # A shape whose points all lie inside other parts (possible early on) keeps them all.
    keep = keep | ~keep.any(dim=1, keepdim=True)
    sq = torch.cdist(target, pred).square()  # [B, K, P]; squared then sqrt: finite grads
    to_pred = sq.masked_fill(~keep.unsqueeze(1), float("inf")).min(dim=2).values
    gt_to_pred = to_pred.clamp_min(1e-12).sqrt().mean(dim=1)
    to_gt = sq.min(dim=1).values.clamp_min(1e-12).sqrt()  # [B, P]
    pred_to_gt = (to_gt * keep).sum(1) / keep.sum(1)
    return (gt_to_pred + pred_to_gt).mean()


def signed_surface_distance(
    x: torch.Tensor, primitive_points: torch.Tensor, inside: torch.Tensor
) -> torch.Tensor:
    """± the distance from ``x [B, Q, 3]`` to each part's nearest surface point: ``[B, Q, M]``.

    ``primitive_points [B, M, N, 3]`` are points on each part, ``inside [B, Q, M]`` (bool)
    says which query points each part contains; those get the negative distance. The
    gradient flows into the surface points (the INN's forward pass), never into ``inside``.
    """
    b, m, n, _ = primitive_points.shape
    sq = torch.cdist(x, primitive_points.reshape(b, m * n, 3)).square()  # [B, Q, M*N]
    d = sq.reshape(b, -1, m, n).min(dim=-1).values.clamp_min(1e-12).sqrt()
    return torch.where(inside, -d, d)


def normal_loss(gradients: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """mean(1 - <n, ∇g/||∇g||>) for ``gradients`` and unit ``normals`` ``[B, K, 3]``."""
    unit = gradients / gradients.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (1 - (unit * normals).sum(-1)).mean()


def occupancy_loss(
    g: torch.Tensor, occupancy: torch.Tensor, weights: torch.Tensor, *, sharpness: float
) -> torch.Tensor:
    """Weighted BCE of the union: Σ w·BCE(-sharpness·min_m g_m, o) / Σ w, per shape, averaged."""
    union = g.min(dim=-1).values
    bce = F.binary_cross_entropy_with_logits(
        -sharpness * union, occupancy.to(union.dtype), reduction="none"
    )
    return ((weights * bce).sum(1) / weights.sum(1).clamp_min(1e-12)).mean()


def coverage_loss(
    g: torch.Tensor, occupancy: torch.Tensor, *, k: int, sharpness: float
) -> torch.Tensor:
    """Mean over shapes and primitives of the inside-loss on each primitive's k best inside points.

    A shape with fewer than k inside points uses those it has; one with none contributes 0.
    """
    inside = occupancy.bool().unsqueeze(-1).expand_as(g)  # [B, Q, M]
    masked = g.masked_fill(~inside, float("inf"))
    kk = min(k, g.shape[1])
    best, _ = masked.topk(kk, dim=1, largest=False)  # [B, k, M]
    present = torch.isfinite(best)
    nll = -torch.log(torch.sigmoid(-sharpness * best.masked_fill(~present, 0.0)) + 1e-6)
    per_primitive = (nll * present).sum(1) / present.sum(1).clamp_min(1)
    return per_primitive.mean()


def overlap_loss(g: torch.Tensor, *, sharpness: float, threshold: float) -> torch.Tensor:
    """mean(max(0, Σ_m sigmoid(-sharpness·g_m) - threshold))."""
    return F.relu(torch.sigmoid(-sharpness * g).sum(-1) - threshold).mean()


@dataclass
class LossTerms:
    """The weighted total and each unweighted loss (0 where its weight is 0)."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    normal: torch.Tensor
    occupancy: torch.Tensor
    coverage: torch.Tensor
    overlap: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        names = ("total", "reconstruction", "normal", "occupancy", "coverage", "overlap")
        return {n: float(getattr(self, n).detach()) for n in names}


def neural_parts_loss(
    model: NeuralParts,
    cond: torch.Tensor,
    *,
    directions: torch.Tensor,
    surface: torch.Tensor,
    normals: torch.Tensor,
    volume: torch.Tensor,
    occupancy: torch.Tensor,
    weights: torch.Tensor,
    config: LossConfig,
) -> LossTerms:
    """All five losses of ``model`` (a :class:`~verger.neural_parts.NeuralParts`) on one batch.

    ``directions [N, 3]`` are the unit sphere points pushed onto each primitive,
    ``surface``/``normals`` ``[B, K, 3]`` the ground-truth surface samples and
    ``volume [B, Q, 3]``/``occupancy``/``weights`` ``[B, Q]`` the occupancy samples.
    """
    zero = cond.new_zeros(())
    terms = dict.fromkeys(("reconstruction", "normal", "occupancy", "coverage", "overlap"), zero)
    volume_losses = bool(config.occupancy or config.coverage or config.overlap)
    points = None
    if config.reconstruction or (volume_losses and config.volume_distance == "surface"):
        points = model.surface(cond, directions)  # [B, M, N, 3]
    if config.reconstruction:
        assert points is not None
        b, m, n, _ = points.shape
        with torch.no_grad():  # which points are on the union's surface (not a loss path)
            g_self = model.implicit(cond, points.reshape(b, m * n, 3)).reshape(b, m, n, m)
            other = ~torch.eye(m, dtype=torch.bool, device=cond.device)
            inside_other = ((g_self < 0) & other[:, None, :]).any(-1)  # [B, M, N]
        terms["reconstruction"] = reconstruction_loss(points, surface, ~inside_other)
    if config.normal:
        at = surface.detach().requires_grad_(True)
        g_s = model.implicit(cond, at)  # [B, K, M]
        nearest = g_s.square().argmin(dim=-1, keepdim=True)
        chosen = g_s.gather(-1, nearest).sum()
        (grad,) = torch.autograd.grad(chosen, at, create_graph=True)
        terms["normal"] = normal_loss(grad, normals)
    if volume_losses:
        if points is not None and config.volume_distance == "surface":
            with torch.no_grad():  # only the sign: which part contains which point
                inside = model.implicit(cond, volume) < 0
            g = signed_surface_distance(volume, points, inside)
        else:
            g = model.implicit(cond, volume, scaled=config.volume_distance == "scaled")
        if config.occupancy:
            terms["occupancy"] = occupancy_loss(g, occupancy, weights, sharpness=config.sharpness)
        if config.coverage:
            terms["coverage"] = coverage_loss(
                g, occupancy, k=config.coverage_k, sharpness=config.sharpness
            )
        if config.overlap:
            terms["overlap"] = overlap_loss(
                g, sharpness=config.sharpness, threshold=config.overlap_threshold
            )
    total = sum((getattr(config, name) * value for name, value in terms.items()), zero)
    return LossTerms(total=total, **terms)
