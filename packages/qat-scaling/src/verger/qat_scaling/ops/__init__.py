"""Fused ops of verger-qat-scaling, one folder per op: ``reference.py`` (pure torch, the
specification), ``triton.py`` (the kernel), ``__init__.py`` (autograd Function + dispatch)."""

from verger.qat_scaling.ops.fake_quant import (
    LevelSpec,
    codes_from_weights,
    dequantize_codes,
    fake_quant,
    fake_quant_reference,
    level_spec,
)

__all__ = [
    "LevelSpec",
    "codes_from_weights",
    "dequantize_codes",
    "fake_quant",
    "fake_quant_reference",
    "level_spec",
]
