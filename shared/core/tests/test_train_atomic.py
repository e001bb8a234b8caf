"""Atomic writes: a failure midway leaves the previous file or folder intact."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from verger.core.train import Checkpointer, atomic_directory, atomic_path, atomic_write_json


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


def test_written_files_get_the_mode_of_a_plain_write(tmp_path) -> None:
    """mkstemp/mkdtemp are private (0o600/0o700); results must stay readable like open()."""
    mask = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == stat.S_IMODE(
            plain.stat().st_mode
        )
        os.chmod(tmp_path / "m.json", 0o640)  # a chosen mode survives a rewrite
        atomic_write_json(tmp_path / "m.json", {"a": 2})
        assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o640
        (tmp_path / "plain_dir").mkdir()
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "x").write_text("1")
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == stat.S_IMODE(
            (tmp_path / "plain_dir").stat().st_mode
        )
    finally:
        os.umask(mask)


def test_kill_between_the_two_renames_keeps_the_previous_folder(tmp_path) -> None:
    """Replacing a folder moves the old one aside first: a kill right then must not lose it."""
    script = textwrap.dedent(
        f"""
        import os, sys, torch
        from verger.core.train import Checkpointer, atomic_directory
        folder = {str(tmp_path / "d")!r}
        ckpt = Checkpointer({str(tmp_path / "ckpt")!r})
        model = torch.nn.Linear(2, 2)
        if sys.argv[1] == "dir":
            with atomic_directory(folder) as tmp:
                (tmp / "x").write_text("1")
        else:
            ckpt.save(1, model=model)
            ckpt.save(2, model=model)
        real_replace = os.replace
        calls = []
        def dying_replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:  # the old copy is aside, the new one not yet in place
                os._exit(9)
            real_replace(src, dst)
        os.replace = dying_replace
        if sys.argv[1] == "dir":
            with atomic_directory(folder) as tmp:
                (tmp / "x").write_text("2")
        else:
            ckpt.save(2, model=model)  # a re-save of the same step
        """
    )
    for which in ("dir", "ckpt"):
        proc = subprocess.run([sys.executable, "-c", script, which], capture_output=True, text=True)
        assert proc.returncode == 9, proc.stderr
    assert not (tmp_path / "d").exists()  # the window really was hit
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "d"):
        raise RuntimeError("the next rebuild fails too")
    assert (tmp_path / "d" / "x").read_text() == "1"

    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.steps() == [1]
    ckpt.save(3, model=torch.nn.Linear(2, 2))
    assert ckpt.steps() == [2, 3]
    assert ckpt.load(2, model=torch.nn.Linear(2, 2)).step == 2
