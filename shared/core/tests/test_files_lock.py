"""FileLock and build_once: one holder at a time, released by the OS when the holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from verger.core.files import FileLock, build_once, lock_path_for

HOLD = textwrap.dedent(
    """
    import sys, time
    from verger.core.files import FileLock
    lock = FileLock(sys.argv[1]); lock.acquire()
    print("held", flush=True)
    time.sleep(60)
    """
)


def _holder(path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_is_refused_with_the_holders_pid_and_freed_when_it_is_killed(tmp_path) -> None:
    path = tmp_path / "run.lock"
    proc = _holder(path)
    try:
        lock = FileLock(path)
        assert lock.acquire(blocking=False) is False
        assert lock.holder() == proc.pid
        t0 = time.monotonic()
        assert lock.acquire(timeout=0.3) is False and time.monotonic() - t0 >= 0.3
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock.acquire(blocking=False) is True  # no stale lock after a SIGKILL
    assert lock.holder() == os.getpid()
    lock.release()
    assert not lock.held


def test_two_locks_in_one_process_exclude_each_other(tmp_path) -> None:
    first, second = FileLock(tmp_path / "x.lock"), FileLock(tmp_path / "x.lock")
    with first:
        assert second.acquire(blocking=False) is False
        with pytest.raises(RuntimeError, match="already held"):
            first.acquire()
    assert second.acquire(blocking=False) is True
    second.release()


def test_build_once_builds_under_the_lock_and_rechecks_after_waiting(tmp_path) -> None:
    target = tmp_path / "cache"
    built: list[int] = []
    barrier = threading.Barrier(3)
    results: list[str] = []

    def load():
        return target.read_text() if target.exists() else None

    def build():
        built.append(1)
        time.sleep(0.2)  # the others are waiting on the lock meanwhile
        target.write_text("payload")
        return "payload"

    def worker():
        barrier.wait()
        results.append(build_once(target, load, build))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["payload"] * 3 and built == [1]
    assert lock_path_for(target) == tmp_path / ".cache.lock"
