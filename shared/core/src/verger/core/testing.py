"""Helpers shared by every package's tests: tolerant comparisons and the Triton interpreter.

Import this module from a ``conftest.py`` *before* anything that defines a Triton kernel:
``setup_triton_interpreter()`` must run before ``@triton.jit`` executes.
"""

from __future__ import annotations

import os

import torch


def setup_triton_interpreter() -> bool:
    """Run Triton kernels through the interpreter when no CUDA device is visible.

    Returns True when the interpreter is on. Respects an explicit ``TRITON_INTERPRET`` setting.
    """
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET") == "1"


def relative_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / max(||expected||_2, tiny), computed in float64."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    denom = e.norm().clamp_min(torch.finfo(torch.float64).tiny)
    return float((a - e).norm() / denom)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float = 1e-5,
    name: str = "tensor",
) -> None:
    """Assert two tensors agree in relative RMS error, with shape and NaN/inf checks.

    A relative RMS bound is robust to the few large-but-harmless elementwise differences that
    low-precision kernels produce, yet fails on any systematic error.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.isfinite(expected).all():
        raise AssertionError(f"{name}: the expected tensor has NaN/inf")
    if not torch.isfinite(actual).all():
        bad = int((~torch.isfinite(actual)).sum())
        raise AssertionError(f"{name}: {bad} NaN/inf value(s) in the result")
    err = relative_rms_error(actual, expected)
    if err > rtol:
        raise AssertionError(f"{name}: relative RMS error {err:.3e} > {rtol:.1e}")
