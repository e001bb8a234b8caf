"""Settings: one validated dataclass per command; --quick preset; identity; CLI parsing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from verger.core.settings import Settings, SettingsError, option, parse_cli_value


@dataclass(kw_only=True)
class Demo(Settings):
    steps: int = option(400, quick=40, at_least=1, help="optimizer steps")
    lr: float = option(3e-3, above=0.0, at_most=1.0, help="peak learning rate")
    attention: str = option("linear", choices=("softmax", "linear"), help="attention kind")
    mode: Literal["a", "b"] = option("a", help="a literal")
    sizes: tuple[int, ...] = option((1, 2), quick=(1,), at_least=1, help="sizes")
    data: Path | None = option(None, help="data folder")
    fused: bool = option(False, help="fused kernels")
    log_every: int = option(10, at_least=1, identity=False, help="log cadence")

    def validate(self) -> None:
        if self.steps < len(self.sizes):
            raise SettingsError(f"steps={self.steps} must be >= len(sizes)={len(self.sizes)}")


def test_preset_applies_quick_values_then_overrides() -> None:
    assert Demo.preset() == Demo()
    quick = Demo.preset(quick=True)
    assert (quick.steps, quick.sizes, quick.lr) == (40, (1,), 3e-3)
    assert Demo.preset(quick=True, steps=7).steps == 7


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, r"steps=0 must be an int >= 1"),
        ({"steps": True}, r"steps=True must be an int"),
        ({"steps": 2.0}, r"steps=2.0 must be an int"),
        ({"lr": 0.0}, r"lr=0.0 must be a number > 0"),
        ({"lr": float("nan")}, r"lr=nan must be a finite number"),
        ({"lr": 2}, r"lr=2.0 must be a number > 0 and <= 1"),
        ({"attention": "rnn"}, r"attention='rnn' must be one of 'softmax', 'linear'"),
        ({"mode": "c"}, r"mode='c' must be one of 'a', 'b'"),
        ({"sizes": (1, 0)}, r"sizes=0 must be an int >= 1"),
        ({"sizes": 3}, r"sizes=3 must be a sequence"),
        ({"fused": 1}, r"fused=1 must be True or False"),
        ({"steps": 1, "sizes": (1, 2)}, r"steps=1 must be >= len\(sizes\)=2"),
        ({"nope": 1}, r"has no setting\(s\) \['nope'\]"),
    ],
)
def test_bad_values_are_errors_naming_the_field(changes, message) -> None:
    with pytest.raises(SettingsError, match=message):
        Demo.preset(**changes)


def test_round_trip_and_differences_over_identity_fields() -> None:
    s = Demo.preset(data=Path("/tmp/x"), sizes=(3, 4))
    recorded = s.to_dict()
    assert recorded["data"] == "/tmp/x" and recorded["sizes"] == [3, 4]
    assert Demo.from_dict(recorded) == s
    assert s.differences(recorded) == []
    other = s.replace(steps=90, log_every=1)  # log_every is not part of the run's identity
    assert other.differences(recorded) == ["steps: 400 (recorded) -> 90 (now)"]
    assert "log_every" not in Demo.identity_fields()


def test_cli_values_parse_to_the_field_types() -> None:
    assert parse_cli_value("3,4", tuple[int, ...]) == (3, 4)
    assert parse_cli_value("none", Path | None) is None
    assert parse_cli_value("x/y", Path | None) == Path("x/y")
    assert parse_cli_value("b", Literal["a", "b"]) == "b"
    with pytest.raises(ValueError, match="is not an int"):
        parse_cli_value("four", int)
    with pytest.raises(ValueError, match="is not one of a, b"):
        parse_cli_value("c", Literal["a", "b"])


def test_mutable_defaults_are_refused() -> None:
    with pytest.raises(TypeError, match="immutable"):
        option([1, 2], help="a list")
