"""Small ``@triton.jit`` helpers shared by the kernels of every member.

``lane_flag(flag, lanes)`` turns a per-program condition (``tl.program_id(1) == 0``) into a
boolean vector shaped like ``lanes``. Compiled Triton broadcasts a scalar condition in a mask
by itself; Triton 3.9's interpreter (``TRITON_INTERPRET=1``, how the CPU tests run) instead
stores a scalar comparison as int32 data, so ``mask & (pid == 0)`` becomes an int32 mask that
``tl.store`` rejects ("mask has unsupported dtype"). Building the vector by arithmetic on the
lane indices gives a real boolean in both, at no cost once compiled.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional at import
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]

if HAS_TRITON:

    @triton.jit
    def lane_flag(flag, lanes):
        """``flag`` (a scalar condition) repeated over the shape of ``lanes`` (any int tensor)."""
        return (lanes * 0 + flag.to(tl.int32)) != 0

    __all__ += ["lane_flag"]
