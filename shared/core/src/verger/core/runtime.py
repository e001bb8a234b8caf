"""Device selection and seeding: the two things every training or benchmark run does first."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import torch

_DEVICE_KINDS = ("cpu", "cuda", "mps")


def default_device() -> torch.device:
    """The best device available here: CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"``, ``None``, ``"cpu"``, ``"cuda:1"`` or a device into a usable device.

    Raises ``ValueError`` naming the allowed values when the spec is malformed, and
    ``RuntimeError`` when a well-formed device is not available on this machine.
    """
    if spec is None or spec == "auto":
        return default_device()
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={spec!r} is not a device; use 'auto', one of {_DEVICE_KINDS} "
            "optionally with an index ('cuda:1'), or a torch.device"
        ) from exc
    if device.type not in _DEVICE_KINDS:
        raise ValueError(f"device={spec!r}: type {device.type!r} is not one of {_DEVICE_KINDS}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={spec!r} asked for CUDA but no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device={spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device={spec!r} asked for MPS but it is not available here")
    return device


def seed_everything(seed: int, *, deterministic: bool = False) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same.

    ``deterministic=True`` also asks torch for deterministic kernels (slower on GPU).
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r} must be an int in [0, 2**63)")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def package_version(distribution: str) -> str:
    """The installed version of ``distribution`` (its pyproject is the single source).

    Returns ``"0+unknown"`` when the code runs from a source tree that was never installed
    (e.g. through ``PYTHONPATH`` on a GPU host), instead of failing at import.
    """
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "0+unknown"


THREADS_ENV = "VERGER_THREADS"


def set_threads(threads: int | None = None) -> int:
    """The one thread policy: ``threads`` (else ``$VERGER_THREADS``, else torch's default).

    Sets torch's intra-op threads and exports ``VERGER_THREADS`` and ``OMP_NUM_THREADS`` so
    that worker processes started afterwards (which call this with no argument) use the same
    count. Returns the count in effect. Raises ``ValueError`` for a count < 1.
    """
    if threads is None:
        env = os.environ.get(THREADS_ENV, "").strip()
        if not env:
            return torch.get_num_threads()
        try:
            threads = int(env)
        except ValueError:
            raise ValueError(f"${THREADS_ENV}={env!r} must be an int >= 1") from None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r} must be an int >= 1")
    torch.set_num_threads(threads)
    os.environ[THREADS_ENV] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM while :func:`sigterm_raises` is active, so that
    ``finally`` blocks (which tear down worker processes) run as they do for Ctrl-C."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` in the main thread.

    A no-op outside the main thread, or when a handler other than the default one is already
    installed (the caller's own handling wins).
    """
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        current = signal.getsignal(signal.SIGTERM)
        if current not in (signal.SIG_DFL, None):
            yield
            return
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, current)


def exit_when_parent_dies(parent_pid: int, *, poll_s: float = 0.5) -> None:
    """Start a daemon thread that ends this process as soon as ``parent_pid`` is gone.

    Worker processes call it first, so that a parent killed with SIGKILL (which runs no
    cleanup) leaves no orphans, whatever the start method (forkserver children are not the
    parent's children, so the kernel's parent-death signal would not reach them).
    """
    import threading
    import time

    def watch() -> None:
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # the pid was reused by another user's process
                os._exit(1)
            time.sleep(poll_s)

    threading.Thread(target=watch, name="verger-parent-watch", daemon=True).start()
