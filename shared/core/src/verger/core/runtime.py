"""Device selection and seeding: the two things every training or benchmark run does first."""

from __future__ import annotations

import os
import random
from importlib.metadata import PackageNotFoundError, version

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
