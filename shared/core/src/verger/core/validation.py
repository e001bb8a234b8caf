"""Checks of user-given values, shared by every package's configs, settings and APIs.

Each check returns the value (normalized) or raises a ``ValueError`` / ``TypeError`` whose
message names the argument, the value and what is allowed, so a bad input is explained before
any work starts:

>>> integer("steps", 0, at_least=1)
Traceback (most recent call last):
ValueError: steps=0 must be an int >= 1
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")

#: The floating dtypes every op accepts unless it says otherwise (float64 for references).
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
#: What kernels take: half precision for speed, fp32 for accuracy.
KERNEL_DTYPES: tuple[torch.dtype, ...] = FLOAT_DTYPES
#: Reference code and tests also take float64.
REFERENCE_DTYPES: tuple[torch.dtype, ...] = (*FLOAT_DTYPES, torch.float64)


def _bound_text(at_least: float | None, above: float | None, at_most: float | None) -> str:
    parts = []
    if at_least is not None:
        parts.append(f">= {at_least:g}")
    if above is not None:
        parts.append(f"> {above:g}")
    if at_most is not None:
        parts.append(f"<= {at_most:g}")
    return (" " + " and ".join(parts)) if parts else ""


def finite_number(
    name: str,
    value: object,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
) -> float:
    """``value`` as a float once it is a real, finite number (not a bool) within the bounds.

    ``at_least`` / ``above`` / ``at_most`` add ``value >= at_least`` / ``value > above`` /
    ``value <= at_most``. A plain ``value < 0`` test lets NaN through, and inf passes it only
    to surface as a NaN loss mid-training.
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
        and (at_most is None or number <= at_most)
    )
    if not ok:
        bound = _bound_text(at_least, above, at_most)
        raise ValueError(f"{name}={value!r} must be a finite number{bound}")
    return number


def probability(name: str, value: object, *, open_right: bool = False) -> float:
    """A finite number in [0, 1] (or [0, 1) with ``open_right``)."""
    number = finite_number(name, value, at_least=0.0, at_most=1.0)
    if open_right and number >= 1.0:
        raise ValueError(f"{name}={value!r} must be in [0, 1)")
    return number


def integer(
    name: str, value: object, *, at_least: int | None = None, at_most: int | None = None
) -> int:
    """``value`` once it is an int (not a bool, not a float) within the bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r} must be an int{_bound_text(at_least, None, at_most)}")
    number = int(value)
    if (at_least is not None and number < at_least) or (at_most is not None and number > at_most):
        raise ValueError(f"{name}={value!r} must be an int{_bound_text(at_least, None, at_most)}")
    return number


def positive_int(name: str, value: object) -> int:
    """A count or a size: an int >= 1 (bools refused)."""
    return integer(name, value, at_least=1)


def non_negative_int(name: str, value: object) -> int:
    """An int >= 0 (bools refused)."""
    return integer(name, value, at_least=0)


def one_of(name: str, value: T, choices: Collection[T]) -> T:
    """``value`` if it is one of ``choices``; the error lists them."""
    try:
        ok = value in choices
    except TypeError:  # unhashable value against a set
        ok = False
    if not ok:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} must be one of {allowed}")
    return value


def flag(name: str, value: object) -> bool:
    """A real bool (``0``/``1``/``"yes"`` refused: they are usually a mistake)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")
    return value


def check_dtype(
    name: str, tensor: torch.Tensor, allowed: Sequence[torch.dtype] = FLOAT_DTYPES
) -> torch.Tensor:
    """``tensor`` if it is a tensor whose dtype is one of ``allowed``; else a ``TypeError``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name}.dtype={tensor.dtype} is not one of {names}")
    return tensor


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int | str | None]) -> None:
    """Check ``tensor.shape`` against ``expected`` (an int must match; ``None``/a label: any).

    Labels name the dimensions in the message: ``check_shape("x", x, ("B", "T", 64))``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    wanted = tuple(expected)
    ok = tensor.dim() == len(wanted) and all(
        not isinstance(w, int) or w == s for w, s in zip(wanted, tensor.shape)
    )
    if not ok:
        spec = "[" + ", ".join("*" if w is None else str(w) for w in wanted) + "]"
        raise ValueError(f"{name} has shape {list(tensor.shape)}; expected {spec}")


def describe(value: Any) -> str:
    """A short description of a value for error messages (type and, for tensors, shape)."""
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)} {value.dtype}"
    return f"{type(value).__name__} {value!r}"[:80]
