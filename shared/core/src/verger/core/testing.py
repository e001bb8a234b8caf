"""Helpers shared by every package's tests: tolerant comparisons, the Triton interpreter,
tiny model configs (``tiny_config``), skip markers (``requires_cuda``, ``requires_triton``),
``limit_torch_threads``, and ``run_readme_python`` (a README's quickstart, executed).

Import this module from a ``conftest.py`` *before* anything that defines a Triton kernel:
``setup_triton_interpreter()`` must run before ``@triton.jit`` executes.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
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
    from verger.core.kernels import triton_unusable

    return triton_unusable("cuda" if torch.cuda.is_available() else "cpu") is None


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


_FENCE = re.compile(r"(<!--\s*not run\s*-->\s*\n)?[ \t]*```python\n(.*?)```", re.DOTALL)


def readme_python_blocks(readme: str | os.PathLike[str]) -> list[str]:
    """The ```python code blocks of a Markdown file, in order.

    A block right after an ``<!-- not run -->`` comment is left out (say why in the README:
    a GPU-only or multi-host snippet).
    """
    text = Path(readme).read_text(encoding="utf-8")
    return [textwrap.dedent(m.group(2)) for m in _FENCE.finditer(text) if not m.group(1)]


def run_readme_python(
    readme: str | os.PathLike[str], *, cwd: str | os.PathLike[str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run a README's python blocks, one after the other as one script, in a fresh process.

    Raises ``AssertionError`` with the script and its stderr when it fails, so that a
    quickstart that no longer runs fails the package's tests instead of a user.
    """
    blocks = readme_python_blocks(readme)
    if not blocks:
        raise AssertionError(f"{readme} has no python code block to run")
    script = "\n".join(blocks)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"the python blocks of {readme} failed (exit {proc.returncode}):\n{script}\n"
            f"--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc
