"""Checks of user-given numbers, shared by every package's configs and APIs."""

from __future__ import annotations

import math
import numbers


def finite_number(
    name: str, value: object, *, at_least: float | None = None, above: float | None = None
) -> float:
    """``value`` as a float once it is a real, finite number (not a bool) within the bound.

    ``at_least`` / ``above`` add ``value >= at_least`` / ``value > above``. Raises a
    ``ValueError`` naming ``name``, the value and what is allowed. A plain ``value < 0`` test
    lets NaN through, and inf passes it only to surface as a NaN loss mid-training.
    """
    number = (
        float(value)
        if isinstance(value, numbers.Real) and not isinstance(value, bool)
        else math.nan
    )
    ok = (
        math.isfinite(number)
        and (at_least is None or number >= at_least)
        and (above is None or number > above)
    )
    if not ok:
        bound = (f" >= {at_least:g}" if at_least is not None else "") + (
            f" > {above:g}" if above is not None else ""
        )
        raise ValueError(f"{name}={value!r} must be a finite number{bound}")
    return number
