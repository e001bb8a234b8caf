"""What to quantize and how: :class:`QuantConfig`, validated before any work starts.

Bit widths and the quantizer each one uses by default (ParetoQ's split, which the paper uses):

==========  ========  =======================================  ====================
bits        scheme    levels (times the scale)                 stored bits / weight
==========  ========  =======================================  ====================
1           sign      -1, +1 (zero maps to +1)                 1
"ternary"   seq       -2/3, 0, +2/3 (alpha = the clip range)   2
2           seq       -3/4, -1/4, +1/4, +3/4                   2
3,4,6,8     lsq       integers -2^(B-1) ... 2^(B-1) - 1        B
==========  ========  =======================================  ====================

``lsq`` is also allowed at 2 bits (levels -2..1) for comparison.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from verger.core.validation import finite_number, flag, integer, one_of

BITS: tuple[int | str, ...] = (1, "ternary", 2, 3, 4, 6, 8)
SCHEMES = ("lsq", "seq", "sign")
SCALE_INITS = ("paretoq", "lsq", "torchao")
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EMBEDDING_BITS = (4, 6, 8)
DEFAULT_SCHEME: dict[int | str, str] = {
    1: "sign",
    "ternary": "seq",
    2: "seq",
    3: "lsq",
    4: "lsq",
    6: "lsq",
    8: "lsq",
}
_ALLOWED_SCHEMES: dict[str, tuple[int | str, ...]] = {
    "sign": (1,),
    "seq": ("ternary", 2),
    "lsq": (2, 3, 4, 6, 8),
}


def check_bits(name: str, bits: object) -> int | str:
    """``bits`` once it is one of :data:`BITS` (an int, or the string ``"ternary"``)."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{name}={bits!r} is not a supported bit width; allowed: {BITS}")
    return bits  # type: ignore[return-value]


def effective_bits(bits: int | str) -> float:
    """Information bits per weight: ``bits``, or log2(3) ~ 1.585 for ternary.

    This is the B of the scaling law's S = D / (N B / 8); storage may round it up
    (:func:`storage_bits`)."""
    check_bits("bits", bits)
    return math.log2(3) if bits == "ternary" else float(bits)


def storage_bits(bits: int | str) -> int:
    """Bits each weight takes once packed: ternary codes are stored in 2 bits."""
    check_bits("bits", bits)
    return 2 if bits == "ternary" else int(bits)


@dataclass(kw_only=True, frozen=True)
class QuantConfig:
    """Weight fake quantization for QAT (weights only; activations stay in floating point).

    - ``bits``: one of :data:`BITS`. ``scheme`` (default from ``bits``, see the module
      table) picks the quantizer: ``"lsq"`` (learned step, LSQ gradient scaling), ``"seq"``
      (ParetoQ's stretched elastic quantization) or ``"sign"``.
    - ``group_size``: weights sharing one scale along the input dimension; ``None`` = one
      scale per output channel (a row of the weight). It must divide every quantized layer's
      input size (checked by :func:`verger.qat_scaling.prepare`).
    - ``scale_init``: how :func:`~verger.qat_scaling.enable_fake_quant` sets the scales from
      the weights at that moment. ``"paretoq"``: max|w| / Qp for lsq, max|w| for seq,
      mean|w| for sign (ParetoQ's choices); ``"lsq"``: 2 mean|w| / sqrt(Qp) (the LSQ paper,
      lsq only); ``"torchao"``: max|w| / ((Qp - Qn) / 2) (torchao's symmetric rule, lsq only).
    - ``learned_scale``: learn the scales (LSQ); ``False`` recomputes them from the weights
      at every forward with the ``scale_init`` rule and passes no gradient to them (torchao's
      dynamic fake quantization).
    - ``lsq_grad_scale``: multiply the scale gradient by 1 / sqrt(n Qp), n the weights that
      share the scale (LSQ's rule; ParetoQ counts the whole matrix instead, we count the
      group, which makes the factor independent of the granularity).
    - ``scale_dtype``: the dtype scales are stored in after :func:`~verger.qat_scaling.convert`;
      training rounds them to it in the forward pass so the exported model computes exactly
      what was trained.
    - ``embedding_bits``: ``None`` keeps the token embedding and the LM head in floating
      point; 4, 6 or 8 quantizes them (lsq, per row or per ``embedding_group_size``).
    """

    bits: int | str = 4
    scheme: str | None = None
    group_size: int | None = None
    scale_init: str = "paretoq"
    learned_scale: bool = True
    lsq_grad_scale: bool = True
    scale_dtype: str = "float32"
    embedding_bits: int | None = None
    embedding_group_size: int | None = None
    eps: float = field(default=1e-8, repr=False)

    def __post_init__(self) -> None:
        check_bits("bits", self.bits)
        scheme = DEFAULT_SCHEME[self.bits] if self.scheme is None else self.scheme
        one_of("scheme", scheme, SCHEMES)
        if self.bits not in _ALLOWED_SCHEMES[scheme]:
            raise ValueError(
                f"scheme={scheme!r} does not support bits={self.bits!r}; "
                f"it supports {_ALLOWED_SCHEMES[scheme]}"
            )
        object.__setattr__(self, "scheme", scheme)
        for name in ("group_size", "embedding_group_size"):
            if getattr(self, name) is not None:  # None: one scale per output channel
                integer(name, getattr(self, name), at_least=2)
        one_of("scale_init", self.scale_init, SCALE_INITS)
        if self.scale_init in ("lsq", "torchao") and scheme != "lsq":
            raise ValueError(
                f"scale_init={self.scale_init!r} applies to the lsq scheme only, not {scheme!r}; "
                "use 'paretoq'"
            )
        flag("learned_scale", self.learned_scale)
        flag("lsq_grad_scale", self.lsq_grad_scale)
        one_of("scale_dtype", self.scale_dtype, tuple(SCALE_DTYPES))
        if self.embedding_bits is not None and (
            isinstance(self.embedding_bits, bool) or self.embedding_bits not in EMBEDDING_BITS
        ):
            raise ValueError(
                f"embedding_bits={self.embedding_bits!r} must be None (full precision) or one "
                f"of {EMBEDDING_BITS}: the embedding and the head stay at >= 4 bits"
            )
        finite_number("eps", self.eps, above=0.0, at_most=1e-3)

    @property
    def effective_bits(self) -> float:
        """Bits per weight for the scaling law (log2(3) for ternary)."""
        return effective_bits(self.bits)

    @property
    def storage_bits(self) -> int:
        """Bits per weight once packed."""
        return storage_bits(self.bits)

    def embedding_config(self) -> QuantConfig | None:
        """The config quantizing the embedding / head, or None when they stay in FP."""
        if self.embedding_bits is None:
            return None
        return QuantConfig(
            bits=self.embedding_bits,
            scheme="lsq",
            group_size=self.embedding_group_size,
            scale_init="paretoq",
            learned_scale=self.learned_scale,
            lsq_grad_scale=self.lsq_grad_scale,
            scale_dtype=self.scale_dtype,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (``from_dict`` inverts it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a QuantConfig needs a dict of fields, got {type(data).__name__}")
        unknown = sorted(set(data) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {unknown}")
        return cls(**data)
