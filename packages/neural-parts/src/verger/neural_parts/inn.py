"""The conditional invertible network φ(·; C_m) that deforms a sphere into a primitive.

Sphere -> primitive (``forward``): four affine coupling layers, then a per-axis division by
a scale ELU(MLP(C))+1, a rotation by a predicted quaternion and a translation. Each coupling
layer keeps two coordinates and moves the third: x_j = y_j·exp(s) + t, where s (clamped to
±``scale_clip``) and t are MLPs of [C_m; MLP_{3->hidden->projection}(kept coordinates)].
Every step has a closed-form inverse (``inverse``) and a triangular Jacobian, so
log|det J| = Σ s - Σ log(scale).

Tensors: points ``[B, M, N, 3]`` (M primitives, each with its own N points), conditions
``[B, M, D]``. The first layer of each s/t network acts on [C; h] as W_C·C + W_h·h, and W_C·C
is computed once per primitive instead of once per point (the same function, cheaper).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from verger.neural_parts.config import ModelConfig
from verger.neural_parts.geometry import quaternion_to_matrix, spread_points


class ConditionedMLP(nn.Module):
    """MLP on [C; h] with two hidden layers; C is per primitive, h per point.

    ``zero_out=True`` starts the last layer at zero, so a coupling starts as the identity.
    """

    def __init__(
        self, in_dim: int, cond_dim: int, hidden: int, out_dim: int, *, zero_out: bool
    ) -> None:
        super().__init__()
        self.point = nn.Linear(in_dim, hidden)
        self.cond = nn.Linear(cond_dim, hidden, bias=False)
        self.hidden = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, out_dim)
        if zero_out:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # h [B, M, N, in], cond [B, M, D]
        z = F.relu(self.point(h) + self.cond(cond).unsqueeze(-2))
        return self.out(F.relu(self.hidden(z)))


class CouplingLayer(nn.Module):
    """Affine coupling that transforms coordinate ``axis`` given the other two."""

    mask: torch.Tensor

    def __init__(
        self, axis: int, cond_dim: int, hidden: int, projection_dim: int, scale_clip: float
    ) -> None:
        super().__init__()
        if axis not in (0, 1, 2):
            raise ValueError(f"axis={axis!r} must be 0, 1 or 2")
        self.axis = axis
        self.scale_clip = float(scale_clip)
        mask = torch.ones(3)
        mask[axis] = 0.0
        self.register_buffer("mask", mask)
        self.projection = nn.Sequential(
            nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, projection_dim)
        )
        self.s_net = ConditionedMLP(projection_dim, cond_dim, hidden, 1, zero_out=True)
        self.t_net = ConditionedMLP(projection_dim, cond_dim, hidden, 1, zero_out=True)

    def _scale_shift(
        self, fixed: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.projection(fixed)
        s = self.s_net(h, cond).clamp(-self.scale_clip, self.scale_clip)
        return s, self.t_net(h, cond)

    def forward(self, y: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sphere side -> primitive side; returns (x, log|det J| per point)."""
        mask = self.mask.to(y.dtype)
        fixed = y * mask
        s, t = self._scale_shift(fixed, cond)
        x = fixed + (1 - mask) * (y * torch.exp(s) + t)
        return x, s.squeeze(-1)

    def inverse(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Primitive side -> sphere side; returns (y, log|det J| of this inverse per point)."""
        mask = self.mask.to(x.dtype)
        fixed = x * mask
        s, t = self._scale_shift(fixed, cond)
        y = fixed + (1 - mask) * ((x - t) * torch.exp(-s))
        return y, -s.squeeze(-1)


def _head(cond_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cond_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class ConditionalINN(nn.Module):
    """φ(y; C): sphere points ``y`` -> primitive points, with its exact inverse."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cond_dim = config.condition_dim
        generator = torch.Generator().manual_seed(config.mask_seed)
        order = torch.randperm(3, generator=generator).tolist()
        # Cycle through a random order so that every coordinate is moved at least once
        # when n_blocks >= 3 (a purely random mask may leave one coordinate untouched).
        self.layers = nn.ModuleList(
            CouplingLayer(
                order[i % 3], cond_dim, config.hidden, config.projection_dim, config.scale_clip
            )
            for i in range(config.n_blocks)
        )
        self.scale_head = _head(cond_dim, config.head_hidden, 3)
        self.rotation_head = _head(cond_dim, config.head_hidden, 4)
        self.translation_head = _head(cond_dim, config.head_hidden, 3)
        # Start near the identity rotation, and with the parts spread apart (centred at the
        # same point they would take the same gradients; the one that grows first swallows
        # the shape while the others shrink inside it).
        rotation, translation = self.rotation_head[-1], self.translation_head[-1]
        assert isinstance(rotation, nn.Linear) and isinstance(translation, nn.Linear)
        with torch.no_grad():
            rotation.weight.mul_(0.1)
            rotation.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
            if config.init_spread > 0:
                translation.weight.mul_(0.1)
                translation.bias.zero_()
        self.part_offsets: torch.Tensor
        self.register_buffer(
            "part_offsets", spread_points(config.n_primitives, config.init_spread), persistent=False
        )

    def pose(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-primitive scale ``[B, M, 3]`` (> 0), rotation ``[B, M, 3, 3]``, translation."""
        scale = F.elu(self.scale_head(cond)) + 1 + 1e-4
        rotation = quaternion_to_matrix(self.rotation_head(cond))
        return scale, rotation, self.translation_head(cond) + self.part_offsets.to(cond.dtype)

    def forward(self, y: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``y [B, M, N, 3]`` -> (``x [B, M, N, 3]``, log|det ∂x/∂y| ``[B, M, N]``)."""
        logdet = y.new_zeros(y.shape[:-1])
        for layer in self.layers:
            y, ld = layer(y, cond)
            logdet = logdet + ld
        scale, rotation, translation = self.pose(cond)
        y = y / scale.unsqueeze(-2)
        logdet = logdet - scale.log().sum(-1, keepdim=True)
        x = torch.einsum("bmij,bmnj->bmni", rotation, y) + translation.unsqueeze(-2)
        return x, logdet

    def inverse(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, M, N, 3]`` -> (``y``, log|det ∂y/∂x| ``[B, M, N]``)."""
        scale, rotation, translation = self.pose(cond)
        y = torch.einsum("bmji,bmnj->bmni", rotation, x - translation.unsqueeze(-2))
        y = y * scale.unsqueeze(-2)
        logdet = scale.log().sum(-1, keepdim=True).expand(y.shape[:-1])
        layers: list[CouplingLayer] = list(self.layers)  # type: ignore[arg-type]
        for layer in reversed(layers):
            y, ld = layer.inverse(y, cond)
            logdet = logdet + ld
        return y, logdet
