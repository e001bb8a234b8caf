"""Fixtures for the tooling tests (helpers live in stubs.py beside this file)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # ci/ (the code under test) and the helpers

from stubs import Stub, make_workspace  # noqa: E402


@pytest.fixture(name="make_workspace")
def make_workspace_fixture(tmp_path: Path) -> Callable[..., Path]:
    """Build a workspace at tmp_path/ws from stub members (see stubs.make_workspace)."""

    def make(*stubs: Stub, git_init: bool = False) -> Path:
        return make_workspace(tmp_path / "ws", *stubs, git_init=git_init)

    return make
