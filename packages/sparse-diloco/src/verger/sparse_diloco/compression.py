"""Wire format of pseudo-gradients: raw fp32 or blockwise low-bit integers, as bytes.

A payload is always a 1-D ``uint8`` tensor, so transports move bytes and count them exactly.
Low-bit mode (Streaming DiLoCo's 4-bit outer gradients) stores, per block of ``block_size``
values, one fp32 absmax scale and symmetric integers in [-(2^(b-1)-1), 2^(b-1)-1] rounded to
nearest; 4-bit values are packed two per byte. Decoding is deterministic, so every receiver
(and the single-process simulator) reconstructs the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (4, 8, 32)


@dataclass(frozen=True, kw_only=True)
class Codec:
    """Encode/decode a flat fp32 vector; ``bits=32`` is lossless."""

    bits: int = 32
    block_size: int = 256

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits!r} must be one of {SUPPORTED_BITS}")
        if not isinstance(self.block_size, int) or self.block_size < 2 or self.block_size % 2:
            raise ValueError(f"block_size={self.block_size!r} must be an even int >= 2")

    def nbytes(self, numel: int) -> int:
        """Payload size in bytes for ``numel`` values."""
        if self.bits == 32:
            return 4 * numel
        blocks = -(-numel // self.block_size)
        padded = blocks * self.block_size
        return 4 * blocks + (padded if self.bits == 8 else padded // 2)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """fp32 vector -> uint8 payload of ``nbytes(values.numel())`` bytes."""
        flat = values.detach().reshape(-1).to(torch.float32)
        if self.bits == 32:
            return flat.contiguous().view(torch.uint8).clone()
        n, bs = flat.numel(), self.block_size
        blocks = -(-n // bs)
        padded = torch.zeros(blocks * bs, dtype=torch.float32, device=flat.device)
        padded[:n] = flat
        padded = padded.view(blocks, bs)
        qmax = 2 ** (self.bits - 1) - 1
        scale = padded.abs().amax(dim=1) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(padded / safe[:, None]).clamp_(-qmax, qmax).to(torch.int16)
        if self.bits == 8:
            body = q.to(torch.int8).view(torch.uint8).reshape(-1)
        else:  # two's-complement nibbles, low nibble first
            nib = (q & 0xF).to(torch.uint8).reshape(-1, 2)
            body = nib[:, 0] | (nib[:, 1] << 4)
        return torch.cat([scale.contiguous().view(torch.uint8), body])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """uint8 payload -> fp32 vector of ``numel`` values."""
        if payload.dtype != torch.uint8 or payload.numel() != self.nbytes(numel):
            raise ValueError(
                f"payload of {payload.numel()} {payload.dtype} bytes does not hold {numel} "
                f"values at {self.bits} bits ({self.nbytes(numel)} bytes expected)"
            )
        if self.bits == 32:
            return payload.view(torch.float32).clone()
        bs = self.block_size
        blocks = -(-numel // bs)
        scale = payload[: 4 * blocks].view(torch.float32)
        body = payload[4 * blocks :]
        if self.bits == 8:
            q = body.view(torch.int8).to(torch.float32)
        else:
            lo = (body & 0xF).to(torch.int16)
            hi = (body >> 4).to(torch.int16)
            q = torch.stack([lo, hi], dim=1).reshape(-1)
            q = torch.where(q > 7, q - 16, q).to(torch.float32)
        return (q.view(blocks, bs) * scale[:, None]).reshape(-1)[:numel]
