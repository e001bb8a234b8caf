"""Rotary position embedding, the specification (half-split / GPT-NeoX layout), in fp32.

``x`` has shape ``[..., T, H, D]`` (sequence, heads, head dim); ``cos`` and ``sin`` have shape
``[T, D/2]``. With ``x1, x2 = x[..., :D/2], x[..., D/2:]`` the result is
``cat(x1*cos - x2*sin, x2*cos + x1*sin)``: each pair (i, i + D/2) is rotated by the angle of
position t and frequency i. The output has ``x``'s dtype.
"""

from __future__ import annotations

import torch


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., T, H, D] by the angles whose cos/sin are given as [T, D/2]."""
    xf = x.float()
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    c = cos.float()[:, None, :]  # broadcast over heads
    s = sin.float()[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rotary_tables(
    seq_len: int, head_dim: int, *, base: float = 10000.0, start: int = 0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 cos/sin tables [seq_len, head_dim/2] for positions start..start+seq_len-1."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    )
    pos = torch.arange(start, start + seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(pos, inv_freq)
    return angles.cos().float(), angles.sin().float()
