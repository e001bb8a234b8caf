"""Progress bars (tqdm): shown on a terminal, silent in CI logs unless asked for."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    iterable: Iterable[T],
    *,
    desc: str = "",
    total: int | None = None,
    enabled: bool | None = None,
    **kwargs: Any,
) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar.

    ``enabled=None`` shows it only on a terminal (tqdm's ``disable=None``); ``False`` hides it;
    ``True`` forces it (e.g. in notebooks). Extra keyword arguments go to tqdm.
    """
    disable = None if enabled is None else not enabled
    return iter(
        tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, **kwargs)
    )


def progress_bar(*, total: int | None, desc: str = "", enabled: bool | None = None) -> Any:
    """A manual tqdm bar (``bar.update(n)``, ``bar.set_postfix(...)``, ``bar.close()``)."""
    disable = None if enabled is None else not enabled
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True)
