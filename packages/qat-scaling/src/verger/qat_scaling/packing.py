"""Bit packing of integer codes: ``bits`` bits per code, several codes per byte.

Codes form one little-endian bit stream: code ``i`` occupies stream bits
``[i * bits, (i + 1) * bits)``, and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``.
So 4-bit codes pack two per byte (``c0 | c1 << 4``), 2-bit codes four per byte, 1-bit
codes eight, and 3- or 6-bit codes straddle bytes. ``n`` codes take ``ceil(n / 8) * bits``
bytes (``n * bits / 8`` when ``n`` is a multiple of 8).
"""

from __future__ import annotations

import torch

from verger.core.validation import integer


def _check_bits(bits: object) -> int:
    return integer("bits", bits, at_least=1, at_most=8)


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by ``n`` packed codes of ``bits`` bits."""
    return -(-n // 8) * _check_bits(bits)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of codes < 2**bits into ``packed_size(len, bits)`` bytes."""
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() != 1:
        raise TypeError("codes must be a 1-D uint8 tensor")
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes hold {int(codes.max())}, which does not fit in {bits} bits")
    n = codes.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=codes.device)
    padded[:n] = codes
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    # [chunks of 8 codes, 8 codes, bits] -> the stream of 8 * bits bits -> bytes of 8 bits
    stream = (padded.view(-1, 8, 1) >> shifts[:bits]) & 1
    byte_bits = stream.reshape(-1, bits, 8)
    return (byte_bits << shifts).sum(dim=-1, dtype=torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Invert :func:`pack_codes`: the first ``n`` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError("packed must be a 1-D uint8 tensor")
    if packed.numel() != packed_size(n, bits):
        raise ValueError(
            f"{packed.numel()} packed bytes do not hold {n} codes of {bits} bits "
            f"(expected {packed_size(n, bits)})"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = (packed.view(-1, bits, 1) >> shifts) & 1  # [chunks, bytes, 8 bits]
    code_bits = stream.reshape(-1, 8, bits)
    codes = (code_bits << shifts[:bits]).sum(dim=-1, dtype=torch.uint8).reshape(-1)
    return codes[:n]
