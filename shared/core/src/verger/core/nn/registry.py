"""The attention registry: how a package plugs a new attention into ``TransformerLM``.

A plug-in is a factory ``(config, layer_index) -> nn.Module`` registered under a name and
selected with ``TransformerConfig(attention=name, attention_options={...})``. The module's
forward must be::

    forward(x: Tensor[B, T, D], *, cache: object | None = None, use_cache: bool = False,
            start_pos: int = 0) -> tuple[Tensor[B, T, D], object | None]

It attends causally, treats ``x`` as positions ``start_pos .. start_pos + T - 1``, continues
from ``cache`` (what it returned on the previous call, or None) and returns its new cache
when ``use_cache`` (else None). The cache is opaque to the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    from verger.core.nn.config import TransformerConfig


class AttentionModule(Protocol):
    """What a registered factory must build (an ``nn.Module`` with this forward)."""

    def __call__(
        self, x: Tensor, *, cache: Any = None, use_cache: bool = False, start_pos: int = 0
    ) -> tuple[Tensor, Any]: ...


AttentionFactory = Callable[["TransformerConfig", int], nn.Module]
_REGISTRY: dict[str, AttentionFactory] = {}


def register_attention(
    name: str, *, replace: bool = False
) -> Callable[[AttentionFactory], AttentionFactory]:
    """Decorator registering an attention factory under ``name``.

    Registering a taken name raises ``ValueError`` unless ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_attention: name={name!r} must be a non-empty str")

    def decorator(factory: AttentionFactory) -> AttentionFactory:
        if not callable(factory):
            raise TypeError(f"register_attention({name!r}): {factory!r} is not callable")
        if name in _REGISTRY and not replace and _REGISTRY[name] is not factory:
            raise ValueError(
                f"register_attention: {name!r} is already registered; pass replace=True to override"
            )
        _REGISTRY[name] = factory
        return factory

    return decorator


def get_attention(name: str) -> AttentionFactory:
    """The factory registered under ``name``; ``ValueError`` lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"attention={name!r} is not registered; available: {available_attentions()} "
            "(import the package that registers it first)"
        ) from None


def available_attentions() -> list[str]:
    """Registered attention names, sorted."""
    return sorted(_REGISTRY)
