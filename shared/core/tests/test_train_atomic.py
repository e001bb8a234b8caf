"""Atomic writes: a failure midway leaves the previous file or folder intact."""

from __future__ import annotations

import json

import pytest

from verger.core.train import atomic_directory, atomic_path, atomic_write_json


def test_atomic_write_replaces_and_rejects_nan(tmp_path) -> None:
    path = tmp_path / "m.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    with pytest.raises(ValueError):
        atomic_write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_interrupted_writes_keep_previous_copy(tmp_path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("good")
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text() == "good"

    folder = tmp_path / "d"
    with atomic_directory(folder) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(folder) as tmp:
        (tmp / "x").write_text("2")
        raise RuntimeError("killed")
    assert (folder / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt"]
