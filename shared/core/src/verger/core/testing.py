"""Helpers shared by every package's tests: tolerant comparisons, the Triton interpreter,
tiny model configs (``tiny_config``), skip markers (``requires_cuda``, ``requires_triton``)
and ``limit_torch_threads``.

Import this module from a ``conftest.py`` *before* anything that defines a Triton kernel:
``setup_triton_interpreter()`` must run before ``@triton.jit`` executes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from verger.core.nn import TransformerConfig


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


@contextlib.contextmanager
def limit_torch_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous count.

    Tiny models on a shared 2-core machine run several times faster single-threaded.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _triton_usable() -> bool:
    import importlib.util

    has_triton = importlib.util.find_spec("triton") is not None
    return has_triton and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _skipif(condition: bool, reason: str):  # pytest is a test-time dependency only
    import pytest

    return pytest.mark.skipif(condition, reason=reason)


def __getattr__(name: str):
    # Markers are built on first access so importing this module never needs pytest.
    if name == "requires_cuda":
        return _skipif(not _cuda_available(), "needs a CUDA device")
    if name == "requires_triton":
        return _skipif(not _triton_usable(), "needs triton and a CUDA device or TRITON_INTERPRET=1")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tiny_config(**overrides: Any) -> TransformerConfig:
    """A tiny :class:`~verger.core.nn.TransformerConfig` for tests (about 30k parameters).

    Sizes are deliberately not powers of two (vocab 61, hidden 88) so kernels meet ragged
    shapes. Any field can be overridden: ``tiny_config(n_layers=1, fused=False)``.
    """
    from verger.core.nn import TransformerConfig

    fields: dict[str, Any] = dict(
        vocab_size=61,
        d_model=32,
        n_layers=2,
        n_heads=4,
        mlp_hidden=88,
        max_seq_len=64,
        dropout=0.0,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)
