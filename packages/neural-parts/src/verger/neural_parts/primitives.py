"""Primitive families: how a condition C_m becomes a closed surface with an implicit function.

A family maps unit sphere directions onto each primitive's surface (``surface``, used for
the reconstruction loss and for meshes) and gives every part's implicit value at query
points (``implicit``: negative inside, zero on the surface, positive outside). Two families
share this interface: :class:`INNPrimitives` (Neural Parts) and
:class:`verger.neural_parts.superquadric.SuperquadricPrimitives` (the baseline).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from verger.neural_parts.config import ModelConfig
from verger.neural_parts.inn import ConditionalINN
from verger.neural_parts.superquadric import SuperquadricPrimitives


class PrimitiveFamily(Protocol):
    """What the model, the losses and the mesher need from a kind of primitive."""

    def surface(self, cond: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Unit ``directions`` (``[N, 3]`` or ``[B, M, N, 3]``) -> surface ``[B, M, N, 3]``."""
        ...

    def implicit(
        self, cond: torch.Tensor, x: torch.Tensor, *, scaled: bool = False
    ) -> torch.Tensor:
        """Query points ``[B, Q, 3]`` -> every part's implicit value ``[B, Q, M]``.

        ``scaled=True``: in (approximately) Euclidean units, comparable across parts.
        """
        ...


class INNPrimitives(nn.Module):
    """Neural Parts primitives: φ(r·u; C_m) on the surface, g_m(x) = ||φ^-1(x; C_m)|| - r."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.radius = float(config.sphere_radius)
        self.inn = ConditionalINN(config)

    def surface(self, cond: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        b, m = cond.shape[:2]
        y = self.radius * directions.expand(b, m, *directions.shape[-2:])
        return self.inn(y, cond)[0]

    def implicit(
        self, cond: torch.Tensor, x: torch.Tensor, *, scaled: bool = False
    ) -> torch.Tensor:
        """g_m(x) = ||φ^-1(x)|| - r ``[B, Q, M]``, measured in each part's sphere space.

        ``scaled=True`` divides by the map's local scale exp(log|det ∂y/∂x| / 3): a part
        the INN has grown by λ has its sphere-space values shrunk by λ, and the division
        undoes that, so a part is not favoured by the union's minimum merely for being large
        (for a sphere that is only scaled and moved this is exactly its signed distance).
        """
        m = cond.shape[1]
        y, logdet = self.inn.inverse(x.unsqueeze(1).expand(-1, m, -1, -1), cond)
        g = y.norm(dim=-1) - self.radius
        if scaled:
            g = g * torch.exp(-logdet / 3)
        return g.transpose(1, 2)


def build_family(config: ModelConfig) -> INNPrimitives | SuperquadricPrimitives:
    """The family ``config.primitive`` names."""
    if config.primitive == "inn":
        return INNPrimitives(config)
    return SuperquadricPrimitives(config)
