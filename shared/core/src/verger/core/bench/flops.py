"""FLOP counting through ``torch.utils.flop_counter`` (matmuls, convolutions, attention)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (forward and any backward inside it).

    Counts what ``FlopCounterMode`` knows (matmul-like ops, convolutions, SDPA): elementwise
    ops count zero, which is the usual convention for model FLOPs (2 per multiply-add).
    """
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())
