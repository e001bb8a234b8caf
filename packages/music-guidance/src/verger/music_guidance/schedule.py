"""Noise schedules and the v-prediction identities.

A sample at noise level t is ``x_t = alpha_t x0 + sigma_t eps`` with ``alpha_t^2 + sigma_t^2 = 1``.
The network predicts ``v = alpha_t eps - sigma_t x0``; from it both the clean estimate and the
noise follow without any division, so every step is well defined at t = 0 and t = 1:

    x0  = alpha_t x_t - sigma_t v
    eps = sigma_t x_t + alpha_t v

Two schedules share one protocol: :class:`CosineSchedule` (the paper's continuous
``alpha_t = cos(pi t / 2)``) and :class:`DiscreteSchedule` (a table of cumulative alphas, as in
diffusers' schedulers, used to show that our sampler steps equal theirs).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from verger.core.validation import finite_number

__all__ = [
    "CosineSchedule",
    "DiscreteSchedule",
    "NoiseSchedule",
    "eps_from_v",
    "noise_level_for_mix",
    "v_target",
    "x0_from_v",
]


@runtime_checkable
class NoiseSchedule(Protocol):
    """Maps times ``t`` in [0, 1] (1 = pure noise) to ``(alpha_t, sigma_t)`` and sampler grids."""

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha_t`` and ``sigma_t`` for a tensor of times (same shape, float64 safe)."""
        ...

    def times(self, steps: int, t_start: float = 1.0) -> Tensor:
        """``steps + 1`` descending times from ``t_start`` to 0 (float64) for a sampler."""
        ...


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1")


class CosineSchedule:
    """``alpha_t = cos(pi t / 2)``, ``sigma_t = sin(pi t / 2)`` on continuous t in [0, 1]."""

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        angle = t * (math.pi / 2)
        return torch.cos(angle), torch.sin(angle)

    def times(self, steps: int, t_start: float = 1.0) -> Tensor:
        """Uniform in t (the paper does not state its spacing; uniform t is a cosine in SNR)."""
        _check_steps(steps)
        finite_number("t_start", t_start, above=0)
        if t_start > 1:
            raise ValueError(f"t_start={t_start!r} must be in (0, 1]")
        return torch.linspace(t_start, 0.0, steps + 1, dtype=torch.float64)

    def time_for_alpha_sigma(self, alpha: float, sigma: float) -> float:
        """The t whose (alpha_t, sigma_t) points the same way as ``(alpha, sigma)``."""
        return 2 / math.pi * math.atan2(sigma, alpha)

    def __repr__(self) -> str:
        return "CosineSchedule()"


class DiscreteSchedule:
    """A table of cumulative alphas ``alphas_cumprod[k]`` for integer timesteps k = 0..T-1.

    Time ``t = (k + 1) / T`` is timestep k; ``t = 0`` is the clean end (alpha 1), which is where
    diffusers' DDPM and DDIM (``set_alpha_to_one=True``) take their last step.
    :meth:`times` uses diffusers' default "leading" spacing.
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        table = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if table.numel() < 2:
            raise ValueError(f"alphas_cumprod needs >= 2 entries, got {table.numel()}")
        if not bool(((table > 0) & (table <= 1)).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        if not bool((table[1:] <= table[:-1]).all()):
            raise ValueError("alphas_cumprod must be non-increasing")
        self.alphas_cumprod = table
        self.num_train_timesteps = table.numel()

    def timestep(self, t: Tensor) -> Tensor:
        """The integer timestep k of each time (-1 for the clean end)."""
        return torch.round(t.to(torch.float64) * self.num_train_timesteps).long() - 1

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        k = self.timestep(t)
        table = self.alphas_cumprod.to(t.device)
        acp = torch.where(k < 0, torch.ones_like(table[0]), table[k.clamp_min(0)])
        acp = acp.to(t.dtype if t.is_floating_point() else torch.float64)
        return acp.sqrt(), (1 - acp).sqrt()

    def times(self, steps: int, t_start: float = 1.0) -> Tensor:
        _check_steps(steps)
        T = self.num_train_timesteps
        if steps > T:
            raise ValueError(f"steps={steps} must be <= num_train_timesteps={T}")
        ratio = T // steps
        last = round(t_start * T) - 1
        ks = [k for k in range(0, steps * ratio, ratio) if k <= last][::-1]
        return torch.tensor([(k + 1) / T for k in ks] + [0.0], dtype=torch.float64)

    def __repr__(self) -> str:
        return f"DiscreteSchedule(num_train_timesteps={self.num_train_timesteps})"


def _bcast(a: Tensor | float, like: Tensor) -> Tensor | float:
    """Per-example coefficients [B] broadcast over the remaining dims of ``like``."""
    if isinstance(a, Tensor) and a.ndim == 1 and like.ndim > 1:
        return a.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)
    if isinstance(a, Tensor):
        return a.to(like.dtype)
    return a


def v_target(x0: Tensor, eps: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The regression target ``v = alpha eps - sigma x0``."""
    return _bcast(alpha, x0) * eps - _bcast(sigma, x0) * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The clean estimate ``x0 = alpha x_t - sigma v``."""
    return _bcast(alpha, x_t) * x_t - _bcast(sigma, x_t) * v


def eps_from_v(x_t: Tensor, v: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> Tensor:
    """The noise estimate ``eps = sigma x_t + alpha v``."""
    return _bcast(sigma, x_t) * x_t + _bcast(alpha, x_t) * v


def noise_level_for_mix(k: float) -> float:
    """The cosine time whose signal-to-noise ratio equals that of ``k z + (1 - k) x``.

    The paper regenerates from ``k z + (1 - k) x`` (k = 0.85); on a variance-preserving
    schedule that mix is ``x_t`` at ``alpha : sigma = (1 - k) : k``, up to a scale.
    """
    k = finite_number("k", k, above=0)
    if k > 1:
        raise ValueError(f"k={k!r} must be in (0, 1]")
    return CosineSchedule().time_for_alpha_sigma(1 - k, k)
