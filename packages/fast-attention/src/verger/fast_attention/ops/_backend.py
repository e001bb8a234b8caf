"""One backend choice for every op of this package (``auto`` / ``torch`` / ``triton``)."""

from __future__ import annotations

import torch

from verger.core.kernels import interpreter_on, triton_available

BACKENDS = ("auto", "torch", "triton")


def pick_backend(
    backend: str, device: torch.device, *, fits: bool = True, choices: tuple[str, ...] = BACKENDS
) -> str:
    """``auto``: Triton on CUDA when it is installed and the shapes ``fit`` its kernels, the
    torch path otherwise; any other name in ``choices`` is returned as given (``triton`` once
    ``require_triton`` allows it off CUDA)."""
    if backend not in choices:
        raise ValueError(f"backend={backend!r} is not one of {choices}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() and fits else "torch"
    if backend == "triton" and device.type != "cuda":
        require_triton(device)
    return backend


def require_triton(device: torch.device) -> None:
    """Raise ``RuntimeError`` unless a Triton kernel can run on ``device``: triton installed,
    and CUDA tensors (CPU ones only under the interpreter, ``TRITON_INTERPRET=1``). Skipped
    while ``torch.compile`` traces: the check is host-side and its cached lookup makes dynamo
    warn."""
    if torch.compiler.is_compiling():
        return
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    if device.type != "cuda" and not interpreter_on():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got {device} (on CPU it runs only under "
            "the Triton interpreter, TRITON_INTERPRET=1 set before import)"
        )
