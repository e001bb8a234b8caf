"""One backend choice for every op of this package (``auto`` / ``torch`` / ``triton``)."""

from __future__ import annotations

import torch

from verger.core.kernels import triton_available

BACKENDS = ("auto", "torch", "triton")


def pick_backend(
    backend: str, device: torch.device, *, fits: bool = True, choices: tuple[str, ...] = BACKENDS
) -> str:
    """``auto``: Triton on CUDA when it is installed and the shapes ``fit`` its kernels, the
    torch path otherwise; any other name in ``choices`` is returned as given."""
    if backend not in choices:
        raise ValueError(f"backend={backend!r} is not one of {choices}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() and fits else "torch"
    return backend
