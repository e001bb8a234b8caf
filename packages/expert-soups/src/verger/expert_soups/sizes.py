"""Named model sizes: byte-level tiny models for CPU miniatures, the papers' sizes for GPUs."""

from __future__ import annotations

from typing import Any

from verger.core.nn import TransformerConfig

LM_SIZES: dict[str, dict[str, Any]] = {
    # CPU miniatures (byte vocabulary): small enough to train far past saturation
    "nano": dict(d_model=32, n_layers=2, n_heads=2, mlp_hidden=64),
    "micro": dict(d_model=48, n_layers=2, n_heads=2, mlp_hidden=128),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden=192),
    "mini": dict(d_model=96, n_layers=3, n_heads=4, mlp_hidden=256),
    "small": dict(d_model=128, n_layers=4, n_heads=4, mlp_hidden=384),
    # the papers' models (GPU runs): Soup-of-Experts' 110M base, Plan Early's SLM and LLM
    "110m": dict(d_model=768, n_layers=12, n_heads=12, mlp_hidden=3072),
    "slm-126m": dict(d_model=1024, n_layers=7, n_heads=8, mlp_hidden=4096),
    "llm-771m": dict(d_model=2816, n_layers=7, n_heads=22, mlp_hidden=11264),
}


def lm_config(size: str, *, vocab_size: int, seq_len: int, **overrides: Any) -> TransformerConfig:
    """A ``TransformerConfig`` of a named size (``LM_SIZES``) for ``seq_len``-token windows."""
    if size not in LM_SIZES:
        raise ValueError(f"size={size!r} must be one of {sorted(LM_SIZES)}")
    fields: dict[str, Any] = dict(vocab_size=vocab_size, max_seq_len=seq_len, dropout=0.0)
    fields.update(LM_SIZES[size])
    fields.update(overrides)
    return TransformerConfig(**fields)
