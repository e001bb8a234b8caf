"""FLOP counting through ``torch.utils.flop_counter`` (matmuls, convolutions, attention)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

# FlopCounterMode knows addmm / baddbmm but not their in-place forms, which kernels use to
# accumulate a product into an existing result without a copy: count them the same.
# (Formulas take shapes, 2 FLOPs per multiply-add, as torch's own for addmm / baddbmm.)


def _addmm_flops(acc: Any, a: Any, b: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * a[0] * a[1] * b[-1]


def _baddbmm_flops(acc: Any, a: Any, b: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * a[0] * a[1] * a[2] * b[-1]


_IN_PLACE = {torch.ops.aten.addmm_: _addmm_flops, torch.ops.aten.baddbmm_: _baddbmm_flops}


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``fn`` (forward and any backward inside it).

    Counts what ``FlopCounterMode`` knows (matmul-like ops, convolutions, SDPA): elementwise
    ops count zero, which is the usual convention for model FLOPs (2 per multiply-add).
    In-place ``addmm_`` / ``baddbmm_`` count like their out-of-place forms.
    """
    counter = FlopCounterMode(display=False, custom_mapping=_IN_PLACE)
    with counter:
        fn()
    return int(counter.get_total_flops())
