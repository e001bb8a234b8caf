"""Guided sampling: DDPM / DDIM with guidance gradients of any loss of the clean estimate.

At each step t -> s (``x0_hat = alpha_t x_t - sigma_t v_theta(x_t, t)``):

- DDPM: ``x_s = posterior sample(x0_hat, x_t) - xi * g``;
- DDIM: ``eps_hat = sigma_t x_t + alpha_t v`` then ``eps_hat -= xi * sigma_t * g`` and
  ``x_s = alpha_s x0_hat + sigma_s eps_hat`` (eta = 0), or with eta > 0 part of the noise
  redrawn;
- then, with ``project``, every linear observation is projected onto (``"clean"``: the
  observed y itself, as the paper writes it; ``"noised"``: y noised to level s, RePaint-style);
  the decoded audio is projected once more, so the observed samples come out exact.

The guidance gradient g of ``sum_i w_i d_i(decode(x0_hat))`` is taken

- ``gradient="x_t"`` (default, the paper's and DPS's): with respect to x_t, through the
  denoiser (one backward pass per step, weights frozen so only the input gradient is built);
- ``gradient="x0_hat"``: with respect to x0_hat itself (no backward through the denoiser:
  cheaper, a cruder direction);
- ``gradient="noisy"``: of ``d(y, A(decode(x_t)))``, the loss of the noisy sample itself.

With no guidance terms, or ``xi = 0``, the random draws and the arithmetic are those of the
unguided sampler, so a sample with ``xi = 0`` equals the unguided one bit for bit.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from verger.core.progress import progress
from verger.music_guidance.guidance import Guidance, total_guidance_loss
from verger.music_guidance.model import AudioDiffusion
from verger.music_guidance.samplers import StepCoefficients, ddim_step, ddpm_step, step_coefficients
from verger.music_guidance.schedule import NoiseSchedule, eps_from_v, x0_from_v
from verger.music_guidance.validation import finite_number, integer, one_of

__all__ = [
    "GRADIENT_MODES",
    "PROJECTIONS",
    "SAMPLERS",
    "SamplerSettings",
    "ddim_invert",
    "denoise",
    "denoise_step",
    "guidance_gradient",
    "sample",
]

SAMPLERS = ("ddpm", "ddim")
GRADIENT_MODES = ("x_t", "x0_hat", "noisy")
PROJECTIONS = ("none", "clean", "noised")


@dataclass(kw_only=True)
class SamplerSettings:
    """How to sample: sampler, steps, eta (DDIM), guidance step size and mode, projection."""

    sampler: str = "ddpm"
    steps: int = 50
    eta: float = 0.0
    xi: float = 0.0
    gradient: str = "x_t"
    project: str = "none"
    clip_x0: bool = False

    def __post_init__(self) -> None:
        one_of("sampler", self.sampler, SAMPLERS)
        integer("steps", self.steps, at_least=1)
        self.eta = finite_number("eta", self.eta, at_least=0)
        self.xi = finite_number("xi", self.xi, at_least=0)
        one_of("gradient", self.gradient, GRADIENT_MODES)
        one_of("project", self.project, PROJECTIONS)
        if not isinstance(self.clip_x0, bool):
            raise ValueError(f"clip_x0={self.clip_x0!r} must be a bool")


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter gradients while sampling: backward then builds only the input gradient."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _alpha_sigma(schedule: NoiseSchedule, t: float) -> tuple[Tensor, Tensor]:
    return schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64))


def guidance_gradient(
    model: AudioDiffusion,
    x_t: Tensor,
    t: float,
    guidance: Sequence[Guidance],
    *,
    mode: str = "x_t",
    schedule: NoiseSchedule | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(g, v, loss)``: the guidance gradient at ``x_t``, the model's v and the loss value.

    ``g`` is the gradient of ``total_guidance_loss(guidance, decode(...))`` for ``mode`` (see
    the module docstring); ``v`` is detached.
    """
    one_of("mode", mode, GRADIENT_MODES)
    schedule = schedule or model.schedule
    a, s = _alpha_sigma(schedule, t)
    a_, s_ = a.to(x_t.dtype), s.to(x_t.dtype)
    tt = torch.full((x_t.shape[0],), t, dtype=x_t.dtype, device=x_t.device)
    with torch.enable_grad():
        if mode == "x_t":
            x = x_t.detach().requires_grad_(True)
            v = model(x, tt)
            loss = total_guidance_loss(guidance, model.decode(x0_from_v(x, v, a_, s_)))
            (g,) = torch.autograd.grad(loss, x)
            return g, v.detach(), loss.detach()
        with torch.no_grad():
            v = model(x_t, tt)
        if mode == "x0_hat":
            x = x0_from_v(x_t, v, a_, s_).detach().requires_grad_(True)
        else:
            x = x_t.detach().requires_grad_(True)
        loss = total_guidance_loss(guidance, model.decode(x))
        (g,) = torch.autograd.grad(loss, x)
        return g, v, loss.detach()


def denoise_step(
    model: AudioDiffusion,
    x_t: Tensor,
    t: float,
    s: float,
    *,
    settings: SamplerSettings,
    guidance: Sequence[Guidance] = (),
    generator: torch.Generator | None = None,
    schedule: NoiseSchedule | None = None,
) -> Tensor:
    """One (guided) sampler step from time ``t`` to ``s < t`` in diffusion space."""
    schedule = schedule or model.schedule
    a_t, s_t = _alpha_sigma(schedule, t)
    a_s, s_s = _alpha_sigma(schedule, s)
    coef: StepCoefficients = step_coefficients(a_t, s_t, a_s, s_s)
    if guidance:
        g, v, _ = guidance_gradient(
            model, x_t, t, guidance, mode=settings.gradient, schedule=schedule
        )
    else:
        tt = torch.full((x_t.shape[0],), t, dtype=x_t.dtype, device=x_t.device)
        with torch.no_grad():
            v = model(x_t, tt)
        g = None
    a_, s_ = a_t.to(x_t.dtype), s_t.to(x_t.dtype)
    x0_hat = x0_from_v(x_t, v, a_, s_)
    if settings.clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
    last = float(s_s) == 0.0
    xi = settings.xi
    if settings.sampler == "ddpm":
        noise = None if last else _randn(x_t, generator)
        x_s = ddpm_step(x_t, x0_hat, coef, noise)
        if g is not None:
            x_s = x_s - xi * g
    else:
        # eps from x0_hat (not from v) so that a clipped x0_hat stays consistent, as diffusers
        eps = eps_from_v(x_t, v, a_, s_) if not settings.clip_x0 else (x_t - a_ * x0_hat) / s_
        if g is not None:
            eps = eps - (xi * s_) * g
        noise = _randn(x_t, generator) if settings.eta > 0 and not last else None
        x_s = ddim_step(
            x0_hat, eps, coef, eta=settings.eta if noise is not None else 0.0, noise=noise
        )
    if settings.project != "none":
        x_s = _project(model, x_s, guidance, settings.project, a_s, s_s, generator)
    return x_s


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


def _project(
    model: AudioDiffusion,
    x: Tensor,
    guidance: Sequence[Guidance],
    mode: str,
    a_s: Tensor,
    s_s: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    observations = [term.observation for term in guidance if term.observation is not None]
    if not observations:
        raise ValueError(f"project={mode!r} needs a guidance term with a linear observation")
    if model.is_latent:
        raise ValueError(
            "projection needs A to be linear in the diffused space; the latent model's "
            "decode is not linear: use project='none' (guidance alone) for the latent model"
        )
    for obs in observations:
        y = model.encode(obs.observed.to(x))  # the waveform codec is a linear scale
        if mode == "noised" and float(s_s) > 0:
            y = a_s.to(x.dtype) * y + s_s.to(x.dtype) * _randn(
                y.expand_as(x) if y.shape[0] == 1 else y, generator
            )
        x = obs.project(x, y)
    return x


def denoise(
    model: AudioDiffusion,
    x_start: Tensor,
    *,
    settings: SamplerSettings,
    guidance: Sequence[Guidance] = (),
    t_start: float = 1.0,
    generator: torch.Generator | None = None,
    schedule: NoiseSchedule | None = None,
    show_progress: bool | None = None,
) -> Tensor:
    """Run the sampler from ``x_start`` at time ``t_start`` to t = 0 (diffusion space)."""
    schedule = schedule or model.schedule
    times = schedule.times(settings.steps, t_start).tolist()
    x = x_start
    with _frozen(model):
        pairs = list(itertools.pairwise(times))
        for t, s in progress(pairs, desc=f"{settings.sampler} sampling", enabled=show_progress):
            x = denoise_step(
                model,
                x,
                t,
                s,
                settings=settings,
                guidance=guidance,
                generator=generator,
                schedule=schedule,
            )
    return x


def sample(
    model: AudioDiffusion,
    *,
    batch_size: int = 1,
    num_samples: int | None = None,
    guidance: Sequence[Guidance] = (),
    settings: SamplerSettings | None = None,
    x_start: Tensor | None = None,
    t_start: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    schedule: NoiseSchedule | None = None,
    show_progress: bool | None = None,
) -> Tensor:
    """Audio ``[B, C, num_samples]`` from the model, guided by ``guidance`` (any list of terms).

    ``x_start`` (diffusion space) replaces the initial Gaussian noise (tasks use it);
    ``num_samples`` defaults to the model's clip length; ``seed`` seeds a private generator
    (``generator`` may be given instead).
    """
    settings = settings or SamplerSettings()
    if not isinstance(settings, SamplerSettings):
        raise TypeError(f"settings must be SamplerSettings, got {type(settings).__name__}")
    for term in guidance:
        if not isinstance(term, Guidance):
            raise TypeError(
                f"guidance items must be Guidance terms (use e.g. MaskedL1(...).guidance()), "
                f"got {type(term).__name__}"
            )
    t_start = finite_number("t_start", t_start, above=0)
    if t_start > 1:
        raise ValueError(f"t_start={t_start!r} must be in (0, 1]")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)
    if x_start is None:
        integer("batch_size", batch_size, at_least=1)
        n = model.config.clip_samples if num_samples is None else num_samples
        shape = (batch_size, *model.diffusion_shape(n))
        x_start = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    elif x_start.ndim != 3:
        raise ValueError(
            f"x_start must be [B, C, N] in diffusion space, got {tuple(x_start.shape)}"
        )
    x0 = denoise(
        model,
        x_start,
        settings=settings,
        guidance=guidance,
        t_start=t_start,
        generator=generator,
        schedule=schedule,
        show_progress=show_progress,
    )
    with torch.no_grad():
        audio = model.decode(x0)
        if settings.project != "none":
            # once more in audio space: the codec's scale (x * c / c) may move y by an ulp
            for term in guidance:
                if term.observation is not None:
                    audio = term.observation.project(audio)
    return audio


def ddim_invert(
    model: AudioDiffusion,
    x0: Tensor,
    *,
    steps: int = 50,
    t_end: float = 1.0,
    schedule: NoiseSchedule | None = None,
) -> Tensor:
    """Deterministic DDIM encoding of clean ``x0`` (diffusion space) to time ``t_end``.

    Runs the eta = 0 update forward in time, with v evaluated at the current (less noisy)
    point; decoding the result with the eta = 0 sampler over the same grid gives ``x0`` back
    up to the discretisation error.
    """
    schedule = schedule or model.schedule
    times = schedule.times(steps, t_end).flip(0).tolist()  # 0 -> t_end
    x = x0
    with _frozen(model), torch.no_grad():
        for s, t in itertools.pairwise(times):
            a_s, s_s = (
                v.to(x.dtype) for v in schedule.alpha_sigma(torch.tensor(s, dtype=torch.float64))
            )
            a_t, s_t = (
                v.to(x.dtype) for v in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64))
            )
            v = model(x, torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device))
            x0_hat, eps = x0_from_v(x, v, a_s, s_s), eps_from_v(x, v, a_s, s_s)
            x = a_t * x0_hat + s_t * eps
    return x
