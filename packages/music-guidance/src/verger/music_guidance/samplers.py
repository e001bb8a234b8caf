"""One step of the DDPM and DDIM samplers from time t to an earlier time s, in v-prediction.

These are the plain formulas (the specification the guided loop in :mod:`sampling` runs);
with ``alpha``/``sigma`` read from a shared discrete table they equal diffusers'
``DDPMScheduler.step`` (``variance_type="fixed_small"``) and ``DDIMScheduler.step``
(tested in ``tests/test_diffusers_equivalence.py``).

DDPM draws from the posterior ``q(x_s | x_t, x0_hat)``::

    x_s = alpha_s (1 - alpha_t^2/alpha_s^2) / sigma_t^2 * x0_hat
        + alpha_t sigma_s^2 / (alpha_s sigma_t^2) * x_t
        + sqrt(sigma_s^2 / sigma_t^2 * (1 - alpha_t^2/alpha_s^2)) * z

DDIM moves along ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z`` with
``c = eta * sqrt(posterior variance)``; eta = 0 is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StepCoefficients", "ddim_step", "ddpm_step", "step_coefficients"]


@dataclass(frozen=True)
class StepCoefficients:
    """Scalars of one step t -> s (float64 tensors, broadcast by the caller)."""

    alpha_t: Tensor
    sigma_t: Tensor
    alpha_s: Tensor
    sigma_s: Tensor

    @property
    def posterior_variance(self) -> Tensor:
        """``sigma_s^2 / sigma_t^2 * (1 - alpha_t^2 / alpha_s^2)``: the DDPM step's variance."""
        beta = 1 - self.alpha_t**2 / self.alpha_s**2
        return (self.sigma_s**2 / self.sigma_t**2 * beta).clamp_min(0)


def step_coefficients(
    alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor
) -> StepCoefficients:
    """Validate one step: 0 < sigma_t, alpha_s > 0 and s no noisier than t."""
    a_t, s_t, a_s, s_s = (
        torch.as_tensor(v, dtype=torch.float64) for v in (alpha_t, sigma_t, alpha_s, sigma_s)
    )
    if not (float(s_t) > 0 and float(a_s) > 0):
        raise ValueError(
            f"a sampler step needs sigma_t > 0 and alpha_s > 0, got sigma_t={float(s_t):g}, "
            f"alpha_s={float(a_s):g}"
        )
    if float(s_s) > float(s_t) + 1e-12:
        raise ValueError(
            f"step goes to more noise: sigma_s={float(s_s):g} > sigma_t={float(s_t):g}"
        )
    return StepCoefficients(a_t, s_t, a_s, s_s)


def _scalar(value: Tensor, like: Tensor) -> Tensor:
    return value.to(device=like.device, dtype=like.dtype)


def ddpm_step(x_t: Tensor, x0_hat: Tensor, coef: StepCoefficients, noise: Tensor | None) -> Tensor:
    """Ancestral DDPM step t -> s given the clean estimate; ``noise`` None adds none."""
    c = coef
    beta = 1 - c.alpha_t**2 / c.alpha_s**2
    c_x0 = c.alpha_s * beta / c.sigma_t**2
    c_xt = c.alpha_t * c.sigma_s**2 / (c.alpha_s * c.sigma_t**2)
    out = _scalar(c_x0, x_t) * x0_hat + _scalar(c_xt, x_t) * x_t
    if noise is not None:
        # diffusers clamps the variance at 1e-20 before its square root; so do we
        std = c.posterior_variance.clamp_min(1e-20).sqrt()
        out = out + _scalar(std, x_t) * noise
    return out


def ddim_step(
    x0_hat: Tensor,
    eps_hat: Tensor,
    coef: StepCoefficients,
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """DDIM step t -> s: ``alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z``, c from ``eta``."""
    c = coef
    dev = eta * c.posterior_variance.sqrt()
    direction = (c.sigma_s**2 - dev**2).clamp_min(0).sqrt()
    out = _scalar(c.alpha_s, x0_hat) * x0_hat + _scalar(direction, x0_hat) * eps_hat
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        out = out + _scalar(dev, x0_hat) * noise
    return out
