"""Safe files: atomic writes, and locks for what several processes build or own.

- Atomic writes (:func:`atomic_path`, :func:`atomic_write_json`, :func:`atomic_directory`...):
  write a temporary sibling, fsync, then ``os.replace`` it into place. A crash or a kill
  midway leaves either the previous file or the new one, never a torn one. Used for
  checkpoints, corpus caches, metrics and reports.
- :class:`FileLock`: an exclusive advisory lock (``flock``) on a lock file that records the
  holder's pid; the OS releases it when the holder dies, so a killed process never leaves a
  stale lock. :func:`build_once` uses it for shared caches (the corpus, fetched sources): when
  several processes ask for the same missing cache at once, one builds it and the others
  wait, then read what it built.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

T = TypeVar("T")


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


class LockHeldError(RuntimeError):
    """A :class:`FileLock` is held by another process (``pid`` names it when known)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path, self.pid = path, pid
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"{path} is locked by {holder}")


class FileLock:
    """An exclusive lock on ``path`` (created if needed), held until :meth:`release`.

    ``with FileLock(p):`` waits for the lock; ``FileLock(p).acquire(blocking=False)`` returns
    False at once when another process holds it (:meth:`holder` then names its pid). The lock
    is the OS's (``flock`` on POSIX), so it goes away with a killed holder: nothing to clean up.
    The lock file itself is left in place, since removing it would race with a new holder.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self, *, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; False when ``blocking=False`` (or ``timeout`` s pass) and it is held."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this FileLock is already held")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if _try_lock(fd):
                break
            if not blocking or (deadline is not None and time.monotonic() >= deadline):
                os.close(fd)
                return False
            time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        """Give the lock up (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            _unlock(fd)
            os.close(fd)

    def holder(self) -> int | None:
        """The pid written by the process that holds (or last held) the lock, if readable."""
        try:
            return int(self.path.read_text(encoding="ascii").split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:  # pragma: no cover - Windows
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def lock_path_for(path: str | os.PathLike[str]) -> Path:
    """The lock file that guards ``path``: ``.<name>.lock`` beside it."""
    target = Path(path)
    return target.with_name(f".{target.name}.lock")


def build_once(
    path: str | os.PathLike[str], load: Callable[[], T | None], build: Callable[[], T]
) -> T:
    """``load()`` the cache at ``path``, or ``build()`` it while holding its lock.

    ``load`` returns None when the cache is missing or stale (and raises on a corrupt one);
    ``build`` writes it atomically and returns it. The check runs again once the lock is
    held, so of several processes that find the cache missing, one builds and the others
    read its result.
    """
    found = load()
    if found is not None:
        return found
    with FileLock(lock_path_for(path)):
        found = load()
        return found if found is not None else build()
