"""Atomic file writes: write a temporary sibling, fsync, then ``os.replace`` it into place.

A crash or a kill midway leaves either the previous file or the new one, never a torn one.
Used for checkpoints, corpus caches, metrics and reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not supported on every platform (e.g. Windows).
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _default_mode(kind: int) -> int:
    """``kind`` (0o666 for files, 0o777 for folders) less the process umask.

    ``mkstemp``/``mkdtemp`` create private (0o600/0o700) entries; without this, every file
    written atomically would end up unreadable to the group and others, unlike a plain write.
    """
    return kind & ~_umask()


def _umask() -> int:
    # Linux exposes it read-only; os.umask can only be read by setting it, which briefly
    # changes it for every thread of the process.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def restore_moved_aside(path: str | os.PathLike[str]) -> bool:
    """Put back the previous ``path`` folder that a killed replacement left moved aside.

    :func:`atomic_directory` replaces a folder with two renames (old aside, new in place); a
    kill between them leaves ``path`` missing and its previous content in
    ``.<name>.old.tmp``. Returns True when it was restored. Writers call this before they
    sweep temporaries, so the only good copy is never swept.
    """
    target = Path(path)
    old = target.with_name(f".{target.name}.old.tmp")
    if old.is_dir() and not target.exists():
        os.replace(old, target)
        return True
    return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # The mode a plain write would give: the replaced file's, else 0o666 less the umask.
        mode = target.stat().st_mode & 0o7777 if target.exists() else _default_mode(0o666)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Serialize ``obj`` as JSON (NaN/inf rejected: they are not JSON) and write it atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it is renamed to ``path``.

    An existing ``path`` is replaced (moved aside, then deleted after the rename). On an
    exception, or a kill before the rename, ``path`` keeps its previous content; leftover
    ``.<name>.*.tmp`` directories are ignored by readers and removed by later writes, after
    a previous copy left moved aside by a kill between the two renames is put back
    (:func:`restore_moved_aside`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_moved_aside(target)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(0o777))  # mkdtemp makes it private (0o700)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
