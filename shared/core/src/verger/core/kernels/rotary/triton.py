"""Rotary Triton kernel: one program per (batch, position) row, all heads at once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from verger.core.kernels._common import next_power_of_2


@triton.jit
def _rotary_kernel(
    X, COS, SIN, Y, T, H, HALF,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    t = row % T
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < H) & (d < HALF)
    offs = row * H * 2 * HALF + h * 2 * HALF + d
    x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(COS + t * HALF + d, mask=d < HALF, other=0.0)
    s = tl.load(SIN + t * HALF + d, mask=d < HALF, other=0.0)
    if INVERSE:  # the backward pass rotates by the opposite angle (the transpose)
        s = -s
    tl.store(Y + offs, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + offs + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


@torch.compiler.disable
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool):
    """Rotate a contiguous x [..., T, H, D] by fp32 contiguous cos/sin [T, D/2]."""
    t, h, d = x.shape[-3:]
    y = torch.empty_like(x)
    rows = x.numel() // (h * d)
    if rows:
        _rotary_kernel[(rows,)](
            x, cos, sin, y, t, h, d // 2,
            BLOCK_H=next_power_of_2(h), BLOCK_HALF=next_power_of_2(d // 2), INVERSE=inverse,
        )  # fmt: skip
    return y
