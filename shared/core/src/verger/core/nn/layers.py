"""The pieces of a block: RMSNorm, the SwiGLU MLP, and the pre-norm residual ``Block``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verger.core.kernels import rms_norm, swiglu
from verger.core.nn.config import TransformerConfig
from verger.core.nn.registry import get_attention


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale ``weight`` [dim], computed by the fused kernel."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(config: TransformerConfig) -> nn.Module:
    """Fused :class:`RMSNorm`, or ``nn.RMSNorm`` when ``config.fused`` is False.

    Both expose ``.weight`` [d_model].
    """
    if config.fused:
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.RMSNorm(config.d_model, eps=config.norm_eps)


class SwiGLU(nn.Module):
    """``w_down(silu(w_gate(x)) * w_up(x))`` with bias-free ``nn.Linear`` layers.

    ``hidden`` is the hidden width; slicing hidden units means taking rows of ``w_gate`` and
    ``w_up`` and the matching columns of ``w_down`` (then set ``hidden``).
    """

    def __init__(self, d_model: int, hidden: int, *, fused: bool = True) -> None:
        super().__init__()
        self.hidden, self.fused = hidden, fused
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return self.w_down(swiglu(self.w_gate(x), self.w_up(x)))
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, fused={self.fused}"


class Block(nn.Module):
    """Pre-norm block: ``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))``."""

    def __init__(self, config: TransformerConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.attn_norm = make_norm(config)
        self.attn = get_attention(config.attention)(config, layer_index)
        self.mlp_norm = make_norm(config)
        self.mlp = SwiGLU(config.d_model, config.hidden_size, fused=config.fused)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, *, cache: Any = None, use_cache: bool = False, start_pos: int = 0
    ) -> tuple[Tensor, Any]:
        a, cache = self.attn(
            self.attn_norm(x), cache=cache, use_cache=use_cache, start_pos=start_pos
        )
        x = x + self.dropout(a)
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x, cache
