"""Rotary position embedding as a module, reusable by attention plug-ins."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from verger.core.kernels.rotary import apply_rotary_emb, rotary_reference, rotary_tables


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, fused: bool = True) -> Tensor:
    """Rotate ``x`` ``[B, T, H, Dh]`` by fp32 tables ``[T, Dh/2]``.

    ``fused=True`` uses :func:`verger.core.kernels.apply_rotary_emb` (validated, Triton on
    CUDA); ``fused=False`` the plain-autograd reference.
    """
    if fused:
        return apply_rotary_emb(x, cos, sin)
    return rotary_reference(x, cos, sin)


class RotaryEmbedding(nn.Module):
    """Rotary tables for ``max_seq_len`` positions; ``forward(x, start_pos)`` rotates ``x``.

    The tables are computed in float64, kept in fp32 per device, and are not part of the
    state dict (they are a function of the config), so ``model.half()`` cannot degrade them.
    """

    def __init__(
        self, head_dim: int, max_seq_len: int, *, base: float = 10000.0, fused: bool = True
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim={head_dim} must be even")
        self.head_dim, self.max_seq_len, self.base, self.fused = head_dim, max_seq_len, base, fused
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def tables(self, seq_len: int, start_pos: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos/sin ``[seq_len, head_dim/2]`` for positions ``start_pos..start_pos+seq_len-1``."""
        if start_pos < 0 or start_pos + seq_len > self.max_seq_len:
            raise ValueError(
                f"RotaryEmbedding: positions {start_pos}..{start_pos + seq_len - 1} exceed "
                f"max_seq_len={self.max_seq_len}"
            )
        if device not in self._tables:
            cos, sin = rotary_tables(self.max_seq_len, self.head_dim, base=self.base)
            self._tables[device] = (cos.to(device), sin.to(device))
        cos, sin = self._tables[device]
        return cos[start_pos : start_pos + seq_len], sin[start_pos : start_pos + seq_len]

    def forward(self, x: Tensor, start_pos: int = 0) -> Tensor:
        """Rotate ``x`` ``[B, T, H, head_dim]`` as positions ``start_pos .. start_pos+T-1``."""
        cos, sin = self.tables(x.shape[1], start_pos, x.device)
        return apply_rotary(x, cos, sin, fused=self.fused)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, base={self.base}"
