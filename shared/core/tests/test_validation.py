"""``finite_number``: the shared check of user-given numbers."""

from __future__ import annotations

import numpy as np
import pytest

from verger.core.validation import finite_number


@pytest.mark.parametrize(
    ("value", "bounds"),
    [(0, {"at_least": 0}), (0.5, {"above": 0}), (np.float32(2.0), {})],
)
def test_accepts_real_finite_numbers_within_the_bound(value, bounds) -> None:
    got = finite_number("x", value, **bounds)
    assert type(got) is float and got == float(value)


@pytest.mark.parametrize(
    ("value", "bounds", "message"),
    [
        (float("nan"), {"at_least": 0}, "x=nan must be a finite number >= 0"),
        (float("inf"), {"above": 0}, "x=inf must be a finite number > 0"),
        (-1e-9, {"at_least": 0}, "must be a finite number >= 0"),
        (0.0, {"above": 0}, "x=0.0 must be a finite number > 0"),
        (True, {}, "x=True must be a finite number"),
        ("1e-3", {}, "x='1e-3' must be a finite number"),
        (None, {}, "x=None must be a finite number"),
    ],
)
def test_refuses_with_the_name_value_and_allowed_range(value, bounds, message) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        finite_number("x", value, **bounds)
