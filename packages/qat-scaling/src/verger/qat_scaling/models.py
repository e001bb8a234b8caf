"""Named model sizes for sweeps: tiny verger-core ``TransformerLM``s (0.03M-1.6M quantized
parameters with byte tokens), so a CPU sweep covers a wide range of tokens per parameter
byte, plus helpers that count what the scaling law counts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from verger.core.nn import TransformerConfig, TransformerLM

# d_model, layers, heads, SwiGLU hidden: each size roughly triples the quantized parameters
SIZES: dict[str, dict[str, Any]] = {
    "xxs": dict(d_model=24, n_layers=2, n_heads=2, mlp_hidden=64),
    "xs": dict(d_model=32, n_layers=2, n_heads=2, mlp_hidden=96),
    "s": dict(d_model=48, n_layers=3, n_heads=4, mlp_hidden=128),
    "m": dict(d_model=64, n_layers=4, n_heads=4, mlp_hidden=176),
    "l": dict(d_model=96, n_layers=5, n_heads=4, mlp_hidden=256),
    "xl": dict(d_model=128, n_layers=8, n_heads=4, mlp_hidden=344),
}


def model_config(size: str, *, vocab_size: int, seq_len: int) -> TransformerConfig:
    """The ``TransformerConfig`` of a named size (no dropout: runs are deterministic)."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} must be one of {list(SIZES)}")
    return TransformerConfig(vocab_size=vocab_size, max_seq_len=seq_len, dropout=0.0, **SIZES[size])


def build_model(size: str, *, vocab_size: int, seq_len: int, seed: int) -> TransformerLM:
    """A freshly initialized model; the weights depend only on ``(size, vocab, seed)``."""
    config = model_config(size, vocab_size=vocab_size, seq_len=seq_len)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransformerLM(config)


def quantized_parameters(model: nn.Module) -> int:
    """N of the scaling law: the weights of the linear layers inside the blocks (the ones
    QAT quantizes at B bits), i.e. the non-embedding parameters minus the norms."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            total += module.weight.numel()
    return total
