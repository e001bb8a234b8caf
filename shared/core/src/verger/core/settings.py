"""A command's settings as one validated dataclass: defaults, the ``--quick`` preset, the CLI.

Every ``demo``, ``bench`` or ``train`` command of a verger package takes its options as one
``@dataclass(kw_only=True)`` subclass of :class:`Settings`. Each field is declared once with
:func:`option`: its default, its ``--quick`` value, its bounds or choices and its help text.
The CLI flags are derived from the fields (``steps`` -> ``--steps``), ``--quick`` picks the
quick values, explicit flags win over both, and the run folder records the result in
``run.json`` so a resume can check it. Library code receives the dataclass, never argparse.

>>> @dataclass(kw_only=True)
... class DemoSettings(Settings):
...     steps: int = option(400, quick=40, at_least=1, help="optimizer steps")
...     lr: float = option(3e-3, above=0.0, help="peak learning rate")
...     attention: str = option("linear", choices=("softmax", "linear"), help="attention")
>>> DemoSettings.preset(quick=True, lr=1e-3)
DemoSettings(steps=40, lr=0.001, attention='linear')

Types a field may have: ``int``, ``float``, ``str``, ``bool``, ``pathlib.Path``, a
``Literal[...]``, ``tuple[int, ...]`` / ``tuple[float, ...]`` / ``tuple[str, ...]`` (comma
separated on the command line), and ``X | None`` of those (``none`` on the command line).
Cross-field checks go in :meth:`Settings.validate`; every check raises ``ValueError`` naming
the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

S = TypeVar("S", bound="Settings")
_MISSING = dataclasses.MISSING

__all__ = ["Settings", "SettingsError", "option"]


class SettingsError(ValueError):
    """A settings value is invalid; the message names the field and what is allowed."""


def option(
    default: Any,
    *,
    help: str,
    quick: Any = _MISSING,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    choices: tuple[Any, ...] | None = None,
    identity: bool = True,
    cli: bool = True,
) -> Any:
    """Declare a settings field.

    - ``quick``: the value ``--quick`` uses (default: the same as ``default``).
    - ``at_least`` / ``above`` / ``at_most``: numeric bounds (every element of a tuple).
    - ``choices``: allowed values (every element of a tuple).
    - ``identity=False``: the field does not change the run's results (log cadence, worker
      counts, progress): a resume with another value is allowed.
    - ``cli=False``: not exposed as a flag (set from code only).
    """
    if isinstance(default, list | dict | set):
        raise TypeError("settings defaults must be immutable: use a tuple")
    meta = {
        "help": help,
        "quick": quick,
        "at_least": at_least,
        "above": above,
        "at_most": at_most,
        "choices": choices,
        "identity": identity,
        "cli": cli,
    }
    return dataclasses.field(default=default, metadata={"verger": meta})


def _meta(field: dataclasses.Field[Any]) -> dict[str, Any]:
    return dict(field.metadata.get("verger", {}))


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(tp, False)``."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _element_type(tp: Any) -> tuple[Any, bool]:
    """``(element type, is_tuple)`` for ``tuple[X, ...]``, else ``(tp, False)``."""
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0], True
        raise TypeError(f"settings tuples must be tuple[X, ...], got {tp}")
    return tp, False


def _check_scalar(name: str, value: Any, tp: Any, meta: dict[str, Any]) -> Any:
    """Check (and normalize) one scalar against its type and bounds."""
    if get_origin(tp) is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise SettingsError(f"{name}={value!r} must be one of {', '.join(map(repr, allowed))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{name}={value!r} must be True or False")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise SettingsError(f"{name}={value!r} must be an int{_bounds(meta)}")
        value = int(value)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise SettingsError(f"{name}={value!r} must be a number{_bounds(meta)}")
        value = float(value)
        if not math.isfinite(value):
            raise SettingsError(f"{name}={value!r} must be a finite number{_bounds(meta)}")
    elif tp is str:
        if not isinstance(value, str):
            raise SettingsError(f"{name}={value!r} must be a string")
    elif tp is Path:
        if not isinstance(value, str | Path):
            raise SettingsError(f"{name}={value!r} must be a path")
        value = Path(value)
    else:
        raise TypeError(f"settings field {name}: unsupported type {tp}")
    if tp in (int, float):
        low, above, high = meta.get("at_least"), meta.get("above"), meta.get("at_most")
        if (
            (low is not None and value < low)
            or (above is not None and value <= above)
            or (high is not None and value > high)
        ):
            kind = "an int" if tp is int else "a number"
            raise SettingsError(f"{name}={value!r} must be {kind}{_bounds(meta)}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise SettingsError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")
    return value


def _bounds(meta: dict[str, Any]) -> str:
    parts = []
    for key, sign in (("at_least", ">="), ("above", ">"), ("at_most", "<=")):
        if meta.get(key) is not None:
            parts.append(f"{sign} {meta[key]:g}")
    return (" " + " and ".join(parts)) if parts else ""


def _to_json(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


@dataclasses.dataclass(kw_only=True)
class Settings:
    """Base class of a command's settings (see the module docstring)."""

    #: Shown as the command's title in reports; subclasses may override.
    title: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for field, tp in self._typed_fields():
            setattr(self, field.name, self._checked(field, tp, getattr(self, field.name)))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks of a subclass (raise :class:`SettingsError` naming the fields)."""

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def preset(cls: type[S], *, quick: bool = False, **overrides: Any) -> S:
        """The defaults, or the ``--quick`` values, with ``overrides`` on top (validated)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise SettingsError(
                f"{cls.__name__} has no setting(s) {unknown}; settings: {', '.join(sorted(names))}"
            )
        values: dict[str, Any] = {}
        if quick:
            for field in dataclasses.fields(cls):
                q = _meta(field).get("quick", _MISSING)
                if q is not _MISSING:
                    values[field.name] = q
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
        """Settings from :meth:`to_dict` output (JSON lists back to tuples)."""
        hints = typing.get_type_hints(cls)
        values = {}
        for field in dataclasses.fields(cls):
            if field.name not in data:
                continue
            value = data[field.name]
            inner, _ = _unwrap_optional(hints[field.name])
            if get_origin(inner) is tuple and isinstance(value, list):
                value = tuple(value)
            values[field.name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{field: value}`` (paths as strings, tuples as lists)."""
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: S, **changes: Any) -> S:
        """A validated copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    # --- identity -------------------------------------------------------------------------

    @classmethod
    def identity_fields(cls) -> list[str]:
        """The fields that define the run's results (a resume must match them)."""
        return [f.name for f in dataclasses.fields(cls) if _meta(f).get("identity", True)]

    def differences(self, recorded: Mapping[str, Any]) -> list[str]:
        """``["steps: 400 (recorded) -> 90 (now)", ...]`` over the identity fields."""
        now = self.to_dict()
        out = []
        for name in self.identity_fields():
            if name in recorded and recorded[name] != now[name]:
                out.append(f"{name}: {recorded[name]!r} (recorded) -> {now[name]!r} (now)")
            elif name not in recorded:
                out.append(f"{name}: (not recorded) -> {now[name]!r} (now)")
        return out

    # --- helpers for the CLI --------------------------------------------------------------

    @classmethod
    def cli_fields(cls) -> list[tuple[dataclasses.Field[Any], Any]]:
        """``(field, type)`` of the fields exposed as flags."""
        return [(f, tp) for f, tp in cls._typed_fields() if _meta(f).get("cli", True)]

    @classmethod
    def field_help(cls, field: dataclasses.Field[Any]) -> str:
        meta = _meta(field)
        text = meta.get("help") or ""
        default = field.default
        quick = meta.get("quick", _MISSING)
        shown = "none" if default is None else _format_cli(default)
        extra = f"default {shown}"
        if quick is not _MISSING and quick != default:
            extra += f"; --quick {'none' if quick is None else _format_cli(quick)}"
        return f"{text} ({extra})" if text else extra

    @classmethod
    def _typed_fields(cls) -> list[tuple[dataclasses.Field[Any], Any]]:
        hints = typing.get_type_hints(cls)
        return [(f, hints[f.name]) for f in dataclasses.fields(cls)]

    @classmethod
    def _checked(cls, field: dataclasses.Field[Any], tp: Any, value: Any) -> Any:
        name = field.name
        meta = _meta(field)
        inner, optional = _unwrap_optional(tp)
        if value is None:
            if optional:
                return None
            raise SettingsError(f"{name}=None is not allowed")
        element, is_tuple = _element_type(inner)
        if is_tuple:
            if not isinstance(value, tuple | list):
                raise SettingsError(f"{name}={value!r} must be a sequence")
            return tuple(_check_scalar(name, v, element, meta) for v in value)
        return _check_scalar(name, value, inner, meta)


def _format_cli(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def parse_cli_value(text: str, tp: Any) -> Any:
    """Turn one command-line string into a value of the field type ``tp`` (raises ValueError)."""
    inner, optional = _unwrap_optional(tp)
    if optional and text.strip().lower() == "none":
        return None
    element, is_tuple = _element_type(inner)
    if is_tuple:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return tuple(_parse_scalar(p, element) for p in parts)
    return _parse_scalar(text, inner)


def _parse_scalar(text: str, tp: Any) -> Any:
    if get_origin(tp) is Literal:
        for allowed in get_args(tp):
            if str(allowed) == text:
                return allowed
        raise ValueError(f"{text!r} is not one of {', '.join(map(str, get_args(tp)))}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an int") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if tp is Path:
        return Path(text)
    if tp is str:
        return text
    raise ValueError(f"cannot parse {text!r} as {tp}")
