import math

import pytest
import torch

from verger.core.testing import assert_close
from verger.music_guidance.schedule import (
    CosineSchedule,
    DiscreteSchedule,
    eps_from_v,
    noise_level_for_mix,
    v_target,
    x0_from_v,
)


def test_cosine_schedule_is_variance_preserving_and_matches_the_paper():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    a, s = CosineSchedule().alpha_sigma(t)
    assert_close(a, torch.cos(math.pi * t / 2), rtol=1e-6)
    assert_close(a**2 + s**2, torch.ones_like(t), rtol=1e-6)
    assert a[0] == 1 and s[0] == 0 and abs(float(a[-1])) < 1e-15


def test_v_prediction_identities_recover_x0_and_eps():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 64, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 64, generator=g, dtype=torch.float64)
    t = torch.rand(4, generator=g, dtype=torch.float64)
    a, s = CosineSchedule().alpha_sigma(t)
    x_t = a.view(-1, 1, 1) * x0 + s.view(-1, 1, 1) * eps
    v = v_target(x0, eps, a, s)
    assert_close(x0_from_v(x_t, v, a, s), x0, rtol=1e-6)
    assert_close(eps_from_v(x_t, v, a, s), eps, rtol=1e-6)
    # and at the two ends, where eps = (x_t - alpha x0) / sigma would divide by zero
    for tt in (0.0, 1.0):
        a1, s1 = CosineSchedule().alpha_sigma(torch.tensor(tt, dtype=torch.float64))
        x1 = a1 * x0 + s1 * eps
        v1 = v_target(x0, eps, a1, s1)
        assert_close(x0_from_v(x1, v1, a1, s1), x0, rtol=1e-6)
        assert_close(eps_from_v(x1, v1, a1, s1), eps, rtol=1e-6)


def test_times_grid_descends_to_zero():
    times = CosineSchedule().times(10, 0.8)
    assert times.shape == (11,)
    assert times[0] == pytest.approx(0.8) and times[-1] == 0
    assert bool((times[1:] < times[:-1]).all())
    with pytest.raises(ValueError, match="steps"):
        CosineSchedule().times(0)
    with pytest.raises(ValueError, match="t_start"):
        CosineSchedule().times(4, 1.5)


def test_noise_level_for_mix_has_the_mix_signal_to_noise_ratio():
    k = 0.85
    t = noise_level_for_mix(k)
    a, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
    assert (a / s) == pytest.approx((1 - k) / k)
    assert noise_level_for_mix(1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k="):
        noise_level_for_mix(1.5)


def test_discrete_schedule_maps_times_to_table_entries():
    acp = torch.linspace(0.99, 0.01, 10, dtype=torch.float64)
    sched = DiscreteSchedule(acp)
    a, s = sched.alpha_sigma(torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64))
    assert_close(a**2, torch.tensor([1.0, 0.99, 0.01], dtype=torch.float64), rtol=1e-6)
    assert_close(a**2 + s**2, torch.ones(3, dtype=torch.float64), rtol=1e-6)
    times = sched.times(5)  # leading spacing: timesteps 8, 6, 4, 2, 0 then the clean end
    assert sched.timestep(times).tolist() == [8, 6, 4, 2, 0, -1]
    with pytest.raises(ValueError, match="non-increasing"):
        DiscreteSchedule(torch.tensor([0.5, 0.9]))
