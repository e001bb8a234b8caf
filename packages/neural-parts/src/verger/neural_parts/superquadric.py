"""Superquadrics: the analytic inside-outside function, the radial distance, surface points.

A superquadric with sizes a = (a1, a2, a3) and shape exponents (ε1, ε2) is F(x) = 1 with

    F(x) = ((x/a1)^(2/ε2) + (y/a2)^(2/ε2))^(ε2/ε1) + (z/a3)^(2/ε1)        (|.| inside powers)

F is homogeneous: F(λx) = λ^(2/ε1) F(x), so the ray from the centre through direction u
meets the surface at u·F(u)^(-ε1/2). That gives the surface as a deformed sphere (the same
meshing as the Neural Parts primitives) and the radial distance
g(x) = ||x|| (1 - F(x)^(-ε1/2)), negative inside. F is evaluated in log space
(log-sum-exp), so exponents up to 2/0.1 = 20 neither overflow nor underflow.

Used by the superquadric baseline (:class:`SuperquadricPrimitives`) and by the procedural
training shapes (:mod:`verger.neural_parts.data.procedural`).
"""

from __future__ import annotations

import torch
from torch import nn

from verger.neural_parts.config import ModelConfig
from verger.neural_parts.geometry import quaternion_to_matrix, spread_points

EPS_MIN, EPS_MAX = 0.1, 1.9
SIZE_MIN, SIZE_MAX = 0.03, 0.53


def log_inside_outside(x: torch.Tensor, size: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """log F(x) for local points ``x [..., 3]``, ``size [..., 3]``, ``eps [..., 2]``."""
    e1, e2 = eps[..., 0], eps[..., 1]
    log_abs = torch.log((x / size).abs().clamp_min(1e-9))
    xy = torch.logaddexp(2 / e2 * log_abs[..., 0], 2 / e2 * log_abs[..., 1])
    return torch.logaddexp(e2 / e1 * xy, 2 / e1 * log_abs[..., 2])


def radial_distance(x: torch.Tensor, size: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Signed radial distance to the superquadric (negative inside), ``[...]``."""
    radius = x.norm(dim=-1)
    return radius * (1 - torch.exp(-0.5 * eps[..., 0] * log_inside_outside(x, size, eps)))


def surface_along(directions: torch.Tensor, size: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The surface point on the ray through each unit direction, ``[..., 3]``."""
    log_f = log_inside_outside(directions, size, eps)
    return directions * torch.exp(-0.5 * eps[..., 0] * log_f).unsqueeze(-1)


class SuperquadricPrimitives(nn.Module):
    """The baseline family: C_m -> a superquadric (size, shape, rotation, translation).

    Same interface as :class:`verger.neural_parts.primitives.INNPrimitives`: ``surface``
    pushes sphere directions onto the surface (radially), ``implicit`` is the radial distance.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, h = config.condition_dim, config.head_hidden
        self.head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, 12))
        last = self.head[-1]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():  # identity rotation, ellipsoid-ish start
            last.weight.mul_(0.1)
            last.bias.zero_()
            last.bias[8] = 1.0
        # the parts start spread apart, exactly as the INN primitives (ConditionalINN)
        self.part_offsets: torch.Tensor
        self.register_buffer(
            "part_offsets", spread_points(config.n_primitives, config.init_spread), persistent=False
        )

    def parameters_of(
        self, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """size ``[B, M, 3]``, eps ``[B, M, 2]``, rotation ``[B, M, 3, 3]``, translation."""
        raw = self.head(cond)
        size = SIZE_MIN + (SIZE_MAX - SIZE_MIN) * torch.sigmoid(raw[..., 0:3])
        eps = EPS_MIN + (EPS_MAX - EPS_MIN) * torch.sigmoid(raw[..., 3:5])
        translation = raw[..., 5:8] + self.part_offsets.to(raw.dtype)
        rotation = quaternion_to_matrix(raw[..., 8:12])
        return size, eps, rotation, translation

    def surface(self, cond: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Unit ``directions`` (``[N, 3]`` or ``[B, M, N, 3]``) -> surface ``[B, M, N, 3]``."""
        size, eps, rotation, translation = self.parameters_of(cond)
        b, m = cond.shape[:2]
        u = directions.expand(b, m, *directions.shape[-2:])
        local = surface_along(u, size.unsqueeze(-2), eps.unsqueeze(-2))
        return torch.einsum("bmij,bmnj->bmni", rotation, local) + translation.unsqueeze(-2)

    def implicit(
        self, cond: torch.Tensor, x: torch.Tensor, *, scaled: bool = False
    ) -> torch.Tensor:
        """Radial distance of ``x [B, Q, 3]`` to every part: ``[B, Q, M]``.

        Already in Euclidean units, so ``scaled`` changes nothing (accepted for the interface).
        """
        size, eps, rotation, translation = self.parameters_of(cond)
        rel = x.unsqueeze(1) - translation.unsqueeze(-2)  # [B, M, Q, 3]
        local = torch.einsum("bmji,bmnj->bmni", rotation, rel)
        g = radial_distance(local, size.unsqueeze(-2), eps.unsqueeze(-2))
        return g.transpose(1, 2)
