"""LR schedules: closed-form values at key steps, and argument validation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from verger.core.train import cosine_schedule, lambda_lr, wsd_schedule


def test_cosine_closed_form() -> None:
    f = cosine_schedule(110, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


@pytest.mark.parametrize(
    ("cooldown", "shape"),
    [
        ("linear", lambda p: 1 - p),
        ("1-sqrt", lambda p: 1 - math.sqrt(p)),
        ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
    ],
)
def test_wsd_closed_form(cooldown: str, shape) -> None:
    f = wsd_schedule(100, warmup_steps=5, cooldown_fraction=0.2, cooldown=cooldown, min_ratio=0.0)
    assert f(0) == pytest.approx(0.2)
    assert all(f(s) == 1.0 for s in range(5, 80))
    for s in range(80, 100):
        assert f(s) == pytest.approx(shape((s - 80 + 1) / 20))
    assert f(99) == pytest.approx(0.0)


def test_wsd_1sqrt_drops_faster_than_linear_early() -> None:
    lin = wsd_schedule(100, cooldown="linear")
    sq = wsd_schedule(100, cooldown="1-sqrt")
    assert sq(84) < lin(84)


def test_schedule_validation() -> None:
    with pytest.raises(ValueError, match="cooldown"):
        wsd_schedule(10, cooldown="exp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(10, warmup_steps=10)
    with pytest.raises(ValueError, match="min_ratio"):
        cosine_schedule(10, min_ratio=2.0)
    with pytest.raises(ValueError, match="overlaps"):
        wsd_schedule(10, warmup_steps=9, cooldown_fraction=0.5)
    with pytest.raises(ValueError, match="total_steps"):
        wsd_schedule(0)


def test_lambda_lr_drives_the_optimizer() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = lambda_lr(opt, wsd_schedule(10, warmup_steps=2, cooldown_fraction=0.5))
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == [1.0, 2.0] and lrs[4] == 2.0 and lrs[9] == pytest.approx(0.0)
