"""Interleaved A/B timing: every candidate is warmed up, then timed in alternating rounds.

Interleaving (A B C, B C A, C A B, ...) spreads slow drifts of a shared machine (other jobs,
thermal throttling, frequency scaling) over all candidates instead of penalizing whichever
ran last, so the ratio of medians is much more stable than back-to-back loops.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Wall-clock statistics of one candidate over ``repeats`` timed calls (seconds)."""

    name: str
    median_s: float
    mean_s: float
    min_s: float
    max_s: float
    iqr_s: float
    times_s: tuple[float, ...]

    @property
    def repeats(self) -> int:
        return len(self.times_s)

    def speedup_over(self, baseline: Timing) -> float:
        """How many times faster than ``baseline`` (ratio of medians; > 1 means faster)."""
        return baseline.median_s / self.median_s


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _summarize(name: str, times: list[float]) -> Timing:
    ordered = sorted(times)
    if len(ordered) >= 4:
        q = statistics.quantiles(ordered, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = ordered[-1] - ordered[0]
    return Timing(
        name=name,
        median_s=statistics.median(ordered),
        mean_s=statistics.fmean(ordered),
        min_s=ordered[0],
        max_s=ordered[-1],
        iqr_s=iqr,
        times_s=tuple(times),
    )


def time_call(fn: Callable[[], Any]) -> float:
    """Seconds taken by one call of ``fn``, with CUDA synchronized before and after."""
    _synchronize()
    start = time.perf_counter()
    fn()
    _synchronize()
    return time.perf_counter() - start


def compare(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    repeats: int = 10,
    inner: int = 1,
) -> dict[str, Timing]:
    """Time several zero-argument callables side by side.

    Each callable runs ``warmup`` times first (compilation, caches, allocator), then
    ``repeats`` rounds follow; each round calls every candidate once in a rotated order and
    records ``inner`` back-to-back calls divided by ``inner`` (use ``inner`` > 1 for calls
    shorter than ~1 ms). Returns ``{name: Timing}`` in the input order.
    """
    if not isinstance(fns, Mapping) or not fns:
        raise ValueError("fns must be a non-empty mapping of name -> zero-argument callable")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"fns[{name!r}] is {type(fn).__name__}, not a callable")
    for arg, value, low in (("warmup", warmup, 0), ("repeats", repeats, 1), ("inner", inner, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{arg}={value!r} must be an int >= {low}")

    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()

    def run(name: str) -> float:
        if inner == 1:
            return time_call(fns[name])

        def many() -> None:
            for _ in range(inner):
                fns[name]()

        return time_call(many) / inner

    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(run(name))
    return {name: _summarize(name, times[name]) for name in names}


def speedups(timings: Mapping[str, Timing], baseline: str) -> dict[str, float]:
    """``{name: baseline median / name median}`` for every timing (the baseline gives 1.0)."""
    if baseline not in timings:
        raise ValueError(f"baseline={baseline!r} is not one of the timed names {list(timings)}")
    base = timings[baseline]
    return {name: t.speedup_over(base) for name, t in timings.items()}
