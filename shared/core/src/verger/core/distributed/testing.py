"""Pytest plugin (auto-loaded through the ``pytest11`` entry point of verger-core).

Fixture ``multiprocess``: ``multiprocess(fn, world_size, *args, **kw)`` runs a module-level
``fn`` on ``world_size`` gloo processes and returns each rank's result::

    def _sum_ranks() -> float:
        t = torch.tensor([float(get_rank())])
        return float(all_reduce(t))

    def test_all_reduce(multiprocess):
        assert multiprocess(_sum_ranks, 4) == [6.0] * 4

Outside verger-core's installation (or with ``-p no:verger-core``), import the fixture in a
``conftest.py``: ``from verger.core.distributed.testing import multiprocess  # noqa: F401``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from verger.core.distributed.launch import run_multiprocess


@pytest.fixture
def multiprocess() -> Callable[..., list[Any]]:
    """:func:`verger.core.distributed.run_multiprocess` (gloo by default)."""
    return run_multiprocess
