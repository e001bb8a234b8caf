"""Learning-rate schedules as multipliers of the peak LR: ``f(step) -> float`` in [0, 1].

Use them with ``torch.optim.lr_scheduler.LambdaLR(optimizer, f)`` (see :func:`lambda_lr`) or
call them directly. ``step`` counts optimizer steps from 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

Schedule = Callable[[int], float]
Cooldown = Literal["linear", "1-sqrt", "cosine"]
_COOLDOWNS = ("linear", "1-sqrt", "cosine")


def _check_int(name: str, value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    return value


def _check_ratio(name: str, value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
    return float(value)


def _warmup(step: int, warmup_steps: int) -> float:
    # (step + 1) so that the very first update already has a non-zero learning rate.
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def cosine_schedule(total_steps: int, *, warmup_steps: int = 0, min_ratio: float = 0.1) -> Schedule:
    """Linear warm-up, then cosine decay from 1 to ``min_ratio`` at ``total_steps``."""
    _check_int("total_steps", total_steps, 1)
    _check_int("warmup_steps", warmup_steps, 0)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be < total_steps={total_steps}")
    floor = _check_ratio("min_ratio", min_ratio)

    def f(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def wsd_schedule(
    total_steps: int,
    *,
    warmup_steps: int = 0,
    cooldown_fraction: float = 0.2,
    cooldown: Cooldown = "linear",
    min_ratio: float = 0.0,
) -> Schedule:
    """Warmup-stable-decay: warm up, hold the peak, then cool down over the last steps.

    The cooldown covers ``round(cooldown_fraction * total_steps)`` steps and ends at
    ``min_ratio`` on step ``total_steps``. Shapes (``p`` = cooldown progress in [0, 1]):
    ``"linear"`` 1 - p, ``"1-sqrt"`` 1 - sqrt(p) (drops fast, then slowly: Hägele et al. 2024),
    ``"cosine"`` (1 + cos(pi p)) / 2.
    """
    _check_int("total_steps", total_steps, 1)
    _check_int("warmup_steps", warmup_steps, 0)
    frac = _check_ratio("cooldown_fraction", cooldown_fraction)
    floor = _check_ratio("min_ratio", min_ratio)
    if cooldown not in _COOLDOWNS:
        raise ValueError(f"cooldown={cooldown!r} must be one of {_COOLDOWNS}")
    cooldown_steps = round(frac * total_steps)
    decay_start = total_steps - cooldown_steps
    if warmup_steps > decay_start:
        raise ValueError(
            f"warmup_steps={warmup_steps} overlaps the cooldown, which starts at step "
            f"{decay_start} (total_steps={total_steps}, cooldown_fraction={frac})"
        )

    def shape(p: float) -> float:
        if cooldown == "linear":
            return 1.0 - p
        if cooldown == "1-sqrt":
            return 1.0 - math.sqrt(p)
        return 0.5 * (1.0 + math.cos(math.pi * p))

    def f(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        if step < decay_start or cooldown_steps == 0:
            return 1.0
        p = min(1.0, (step - decay_start + 1) / cooldown_steps)
        return floor + (1.0 - floor) * shape(p)

    return f


def constant_schedule(*, warmup_steps: int = 0) -> Schedule:
    """Linear warm-up, then a constant multiplier of 1."""
    _check_int("warmup_steps", warmup_steps, 0)
    return lambda step: _warmup(step, warmup_steps)


def lambda_lr(
    optimizer: torch.optim.Optimizer, schedule: Schedule
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` driving every parameter group of ``optimizer`` with ``schedule``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
