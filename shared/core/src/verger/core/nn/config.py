"""``TransformerConfig``: every size and switch of a :class:`~verger.core.nn.TransformerLM`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from verger.core.validation import finite_number


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TransformerConfig.{name}={value!r} must be a positive int")


def _positive_float(name: str, value: object) -> None:
    finite_number(f"TransformerConfig.{name}", value, above=0)


@dataclass(kw_only=True)
class TransformerConfig:
    """A GPT-style decoder: pre-norm RMSNorm blocks, rotary attention, SwiGLU MLP.

    The SwiGLU hidden size is ``mlp_hidden`` when given, else ``mlp_ratio * d_model`` rounded
    up to a multiple of ``mlp_multiple_of`` (the default ratio 8/3 gives the parameter count
    of a 4x GELU MLP). ``attention`` names a factory in the attention registry
    (:func:`~verger.core.nn.register_attention`); ``attention_options`` are for that factory
    and must be JSON-serializable to save the model. ``fused=True`` uses the fused kernels of
    :mod:`verger.core.kernels` (RMSNorm, rotary, SwiGLU, chunked linear + cross-entropy);
    ``fused=False`` uses plain torch modules (``nn.RMSNorm``, ``F.silu(g) * u``,
    ``F.cross_entropy`` on full logits), the baseline of the benchmarks.
    """

    vocab_size: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 8 / 3
    mlp_hidden: int | None = None
    mlp_multiple_of: int = 64
    max_seq_len: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    attention: str = "softmax"
    attention_options: dict[str, Any] = field(default_factory=dict)
    fused: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _positive_int(name, getattr(self, name))
        _positive_int("mlp_multiple_of", self.mlp_multiple_of)
        if self.mlp_hidden is not None:
            _positive_int("mlp_hidden", self.mlp_hidden)
        for name in ("mlp_ratio", "rope_base", "norm_eps", "init_std"):
            _positive_float(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig.d_model={self.d_model} must be divisible by "
                f"n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"TransformerConfig: head_dim = d_model / n_heads = {self.head_dim} must be even "
                "(rotary embeddings rotate pairs)"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"TransformerConfig.dropout={self.dropout!r} must be a float")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout={self.dropout!r} must be in [0, 1)")
        for name in ("tie_embeddings", "fused"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TransformerConfig.{name}={getattr(self, name)!r} must be a bool")
        if not isinstance(self.attention, str) or not self.attention:
            raise ValueError(
                f"TransformerConfig.attention={self.attention!r} must be a registered name"
            )
        if not isinstance(self.attention_options, dict):
            raise ValueError(
                f"TransformerConfig.attention_options={self.attention_options!r} must be a dict"
            )

    @property
    def head_dim(self) -> int:
        """Per-head width ``d_model // n_heads``."""
        return self.d_model // self.n_heads

    @property
    def hidden_size(self) -> int:
        """The SwiGLU hidden width (see the class docstring)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        m = self.mlp_multiple_of
        # round() first: 8/3 * 96 is 256.00000000000003 in floating point
        return m * math.ceil(round(self.mlp_ratio * self.d_model, 6) / m)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-ready when ``attention_options`` is)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"TransformerConfig: unknown field(s) {unknown}; known: {sorted(known)}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> TransformerConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
