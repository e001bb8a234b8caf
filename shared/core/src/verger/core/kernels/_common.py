"""Shared plumbing of every member's kernels: backend choice, argument checks, Triton checks.

Every op of every package picks its backend here, the same way: ``"auto"`` runs the Triton
kernel on CUDA tensors (when it fits the shapes) and the best pure-torch path elsewhere;
``"triton"`` forces the kernel (on CPU only under ``TRITON_INTERPRET=1``); ``"torch"`` forces
the pure-torch path; ``with use_backend("torch"):`` redirects ``"auto"`` for every op of every
package inside the block. :func:`triton_unusable` is the one answer to "can a Triton kernel
run on this device?". Triton is imported lazily, so importing ``verger.core`` never needs it
and the interpreter flag can be set late.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal

import torch

from verger.core.validation import KERNEL_DTYPES

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
FLOAT_DTYPES = KERNEL_DTYPES
_AUTO_OVERRIDE: ContextVar[str | None] = ContextVar("verger_kernel_backend", default=None)


@contextlib.contextmanager
def use_backend(backend: Literal["triton", "torch"]) -> Iterator[None]:
    """Make ``backend="auto"`` mean ``backend`` inside the block (e.g. to run a whole model
    through the Triton kernels under the interpreter, or through torch on a GPU)."""
    if backend not in ("triton", "torch"):
        raise ValueError(f"use_backend: backend={backend!r} must be 'triton' or 'torch'")
    token = _AUTO_OVERRIDE.set(backend)
    try:
        yield
    finally:
        _AUTO_OVERRIDE.reset(token)


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreter_on() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonUnavailableError(ValueError):
    """``backend="triton"`` was asked for where no Triton kernel can run; says why."""


def triton_unusable(device: torch.device | str) -> str | None:
    """Why a Triton kernel cannot run on ``device`` here (None when it can).

    Triton must be installed, and the tensors on CUDA (on CPU only through the interpreter,
    ``TRITON_INTERPRET=1`` set before the kernels are defined).
    """
    kind = torch.device(device).type
    if not triton_available():
        return "backend='triton' needs the triton package (pip install triton)"
    if kind != "cuda" and not interpreter_on():
        return (
            f"backend='triton' on {kind} tensors needs TRITON_INTERPRET=1 (the Triton "
            "interpreter, set before import: verger.core.testing.setup_triton_interpreter) or "
            "CUDA tensors; use backend='auto' or 'torch'"
        )
    return None


def require_triton(device: torch.device | str, *, op: str = "") -> None:
    """Raise :class:`TritonUnavailableError` unless a Triton kernel can run on ``device``.

    Skipped while ``torch.compile`` traces (a host-side check that dynamo need not see).
    """
    if torch.compiler.is_compiling():
        return
    why = triton_unusable(device)
    if why is not None:
        raise TritonUnavailableError(f"{op}: {why}" if op else why)


def pick_backend(
    backend: str,
    device: torch.device | str,
    *,
    op: str,
    fits: bool = True,
    choices: tuple[str, ...] = BACKENDS,
) -> str:
    """The implementation to run for tensors on ``device``.

    ``backend`` must be one of ``choices`` (an op may offer more than triton/torch, e.g. a
    library path). ``"auto"`` follows :func:`use_backend` when set, else Triton on CUDA when
    it is installed and the shapes ``fit`` the kernels, else the torch path. ``"triton"`` is
    checked with :func:`require_triton`; any other choice is returned as given.
    """
    if backend not in choices:
        raise ValueError(f"{op}: backend={backend!r} is not one of {choices}")
    if backend == "auto":
        override = _AUTO_OVERRIDE.get()
        if override == "torch" or (override == "triton" and not fits):
            return "torch"
        if override == "triton":
            backend = "triton"
        else:
            kind = torch.device(device).type
            return "triton" if kind == "cuda" and triton_available() and fits else "torch"
    if backend == "triton":
        require_triton(device, op=op)
    return backend


def resolve_backend(backend: str, *tensors: torch.Tensor, op: str) -> Literal["triton", "torch"]:
    """:func:`pick_backend` for the device of ``tensors[0]``, among ``auto|triton|torch``."""
    return pick_backend(backend, tensors[0].device, op=op)  # type: ignore[return-value]


def check_tensor(
    t: object,
    name: str,
    *,
    op: str,
    ndim: int | None = None,
    min_ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    contiguous: bool = True,
) -> torch.Tensor:
    """Validate one tensor argument and return it (typed), naming it in any error."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes and t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; allowed: {allowed}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.ndim < min_ndim:
        raise ValueError(f"{op}: {name} needs at least {min_ndim} dims, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous; call .contiguous() first")
    return t


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` when the named tensors are not all on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device; got {listed}")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def num_warps_for(block: int) -> int:
    """Warps for a row-wise kernel with a ``block``-wide tile (more warps for wider rows)."""
    return 4 if block < 2048 else 8 if block < 8192 else 16
