"""Our DDPM/DDIM steps equal diffusers' schedulers (v-prediction) on a shared discrete schedule."""

import itertools

import pytest
import torch

from verger.core.testing import assert_close
from verger.music_guidance.samplers import ddim_step, ddpm_step, step_coefficients
from verger.music_guidance.schedule import DiscreteSchedule, eps_from_v, x0_from_v

diffusers = pytest.importorskip("diffusers")


def _fake_v(x, k):
    # any fixed function of (x, timestep) stands in for the network
    return torch.tanh(0.7 * x) * (0.5 + k / 2000) + 0.1 * torch.sin(3 * x)


def _our_loop(schedule, steps, x, sampler, generator, eta=0.0):
    times = schedule.times(steps)
    for t, s in itertools.pairwise(times):
        k = int(schedule.timestep(t))
        a_t, s_t = schedule.alpha_sigma(t)
        a_s, s_s = schedule.alpha_sigma(s)
        coef = step_coefficients(a_t, s_t, a_s, s_s)
        v = _fake_v(x, k)
        x0 = x0_from_v(x, v, float(a_t), float(s_t))
        last = float(s) == 0.0
        if sampler == "ddpm":
            noise = None if last else torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = ddpm_step(x, x0, coef, noise)
        else:
            eps = eps_from_v(x, v, float(a_t), float(s_t))
            noise = (
                torch.randn(x.shape, generator=generator, dtype=x.dtype)
                if eta > 0 and not last
                else None
            )
            x = ddim_step(x0, eps, coef, eta=eta if noise is not None else 0.0, noise=noise)
    return x


@pytest.mark.parametrize("steps", [10, 25])
def test_ddpm_matches_diffusers(steps):
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        variance_type="fixed_small",
    )
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.one = sched.one.double()
    sched.set_timesteps(steps)
    ours = DiscreteSchedule(sched.alphas_cumprod)
    assert ours.timestep(ours.times(steps)[:-1]).tolist() == sched.timesteps.tolist()
    x_init = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = x_init.clone()
    for k in sched.timesteps:
        x = sched.step(_fake_v(x, int(k)), k, x, generator=g).prev_sample
    mine = _our_loop(ours, steps, x_init.clone(), "ddpm", torch.Generator().manual_seed(1))
    assert_close(mine, x, rtol=1e-9)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers(eta):
    steps = 20
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    sched.set_timesteps(steps)
    ours = DiscreteSchedule(sched.alphas_cumprod)
    x_init = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = x_init.clone()
    for i, k in enumerate(sched.timesteps):
        last = i == len(sched.timesteps) - 1
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype) if eta > 0 and not last else None
        x = sched.step(
            _fake_v(x, int(k)), k, x, eta=eta if not last else 0.0, variance_noise=noise
        ).prev_sample
    mine = _our_loop(ours, steps, x_init.clone(), "ddim", torch.Generator().manual_seed(1), eta)
    assert_close(mine, x, rtol=1e-9)
