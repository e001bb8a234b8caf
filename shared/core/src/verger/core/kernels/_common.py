"""Shared plumbing of the fused ops: backend choice, argument checks, Triton availability.

Every op picks a backend the same way: ``"auto"`` runs the Triton kernel on CUDA tensors and
the best pure-torch path elsewhere; ``"triton"`` forces the kernel (on CPU only under
``TRITON_INTERPRET=1``); ``"torch"`` forces the pure-torch path. Triton is imported lazily,
so importing ``verger.core`` never needs it and the interpreter flag can be set late.
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

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
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


def resolve_backend(backend: str, *tensors: torch.Tensor, op: str) -> Literal["triton", "torch"]:
    """Pick the implementation for these tensors; raise ``ValueError`` when it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    on_cuda = tensors[0].is_cuda
    if backend == "auto" and _AUTO_OVERRIDE.get() is not None:
        backend = _AUTO_OVERRIDE.get()  # type: ignore[assignment]
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise ValueError(f"{op}: backend='triton' needs the triton package (pip install triton)")
    if not on_cuda and not interpreter_on():
        raise ValueError(
            f"{op}: backend='triton' on {tensors[0].device.type} tensors needs TRITON_INTERPRET=1 "
            "(see verger.core.testing.setup_triton_interpreter); use backend='auto' or 'torch'"
        )
    return "triton"


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
