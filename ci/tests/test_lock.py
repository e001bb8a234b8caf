"""ci/lock.py: the lock's pins as a constraints file, re-made only when uv.lock changes."""

from __future__ import annotations

import shutil

import lock
import pytest

pytestmark = pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv on PATH")


def test_export_pins_the_locked_torch_and_is_reused_until_the_lock_changes(tmp_path) -> None:
    root = lock.Path(__file__).resolve().parents[2]
    out = tmp_path / "constraints.txt"
    path = lock.export_constraints(root, out)
    pins = lock.pinned_versions(path)
    locked = (root / "uv.lock").read_text()
    assert f'name = "torch"\nversion = "{pins["torch"]}"' in locked
    assert "verger-core" not in pins  # workspace members are installed from their folders
    stamp = out.stat().st_mtime_ns
    assert lock.export_constraints(root, out) == out and out.stat().st_mtime_ns == stamp
    out.write_text("# verger constraints from uv.lock sha256=stale\n")
    lock.export_constraints(root, out)
    assert lock.pinned_versions(out) == pins


def test_the_root_pins_torch_and_triton_for_the_lock() -> None:
    import tomllib

    root = lock.Path(__file__).resolve().parents[2]
    pins = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["uv"][
        "constraint-dependencies"
    ]
    locked = (root / "uv.lock").read_text()
    for pin in pins:
        name, version = pin.split("==")
        assert f'name = "{name}"\nversion = "{version}"' in locked, pin


def test_a_missing_lock_says_how_to_make_one(tmp_path) -> None:
    with pytest.raises(lock.LockError, match=r"uv\.lock is missing.*uv lock"):
        lock.export_constraints(tmp_path, tmp_path / "c.txt")
