"""Config checks: verger-core's validation helpers, plus a tuple-of-ints check core lacks."""

from __future__ import annotations

from verger.core.validation import finite_number, integer, one_of, probability

__all__ = ["finite_number", "int_tuple", "integer", "one_of", "probability"]


def int_tuple(name: str, value: object, *, at_least: int | None = None) -> tuple[int, ...]:
    """A tuple of ints (a list is accepted and converted), each ``>= at_least``."""
    if not isinstance(value, tuple | list):
        raise ValueError(f"{name}={value!r} must be a tuple of ints")
    return tuple(integer(f"{name}[{i}]", item, at_least=at_least) for i, item in enumerate(value))
