"""A toy regression task (residual SwiGLU MLP net): seconds to train, for tests and examples.

Its blocks use verger.core's SwiGLU naming (``mlp.w_gate``, ``mlp.w_up``, ``mlp.w_down``), so
`SubsetPlan.mlp_slices` finds them exactly as in the transformer LM. Everything is importable
by module path, which spawned worker processes need.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ToySwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class ToyBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = ToySwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.mlp_norm(x))


class ToyNet(nn.Module):
    """inputs -> Linear -> ``depth`` residual SwiGLU blocks -> Linear -> outputs."""

    def __init__(
        self, *, in_dim: int = 8, dim: int = 16, hidden: int = 32, depth: int = 2, out_dim: int = 4
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim, hidden) for _ in range(depth))
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class ToyData:
    """Batches of y = teacher(x) + noise; batch (worker, step) is a pure function of the seed."""

    def __init__(self, *, seed: int = 0, batch_size: int = 16, in_dim: int = 8, out_dim: int = 4):
        gen = torch.Generator().manual_seed(seed)
        self.seed, self.batch_size, self.in_dim = seed, batch_size, in_dim
        self.teacher = torch.randn(in_dim, out_dim, generator=gen) / in_dim**0.5

    def batch(self, worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + worker * 100_003 + step)
        x = torch.randn(self.batch_size, self.in_dim, generator=gen)
        y = torch.tanh(x @ self.teacher) + 0.05 * torch.randn(
            self.batch_size, self.teacher.shape[1], generator=gen
        )
        return x, y


def toy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def toy_model(seed: int = 0, **kwargs: int) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet(**kwargs)
