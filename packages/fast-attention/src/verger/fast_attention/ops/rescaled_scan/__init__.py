"""Exclusive prefix over chunks of softmax sums with a running max (causal clustered attention).

``rescaled_prefix(m, s, z)`` turns per-chunk (max, Σ e^(ℓ−max) v, Σ e^(ℓ−max)) triples into the
triples of all earlier chunks. ``reference.py`` is the spec (a loop over chunks, also the CPU
path); on CUDA ``triton.py`` does the whole scan in one launch and its backward in another
(torch would launch ~10 ops per chunk, or per step of a log-depth scan).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from verger.core.kernels import pick_backend
from verger.fast_attention.ops.rescaled_scan.reference import (
    NEG_INF,
    rescaled_prefix_reference,
    rescaled_sum,
    safe_shift,
)
from verger.fast_attention.ops.rescaled_scan.triton import (
    rescaled_prefix_backward_triton,
    rescaled_prefix_forward_triton,
)

__all__ = [
    "NEG_INF",
    "rescaled_prefix",
    "rescaled_prefix_reference",
    "rescaled_sum",
    "safe_shift",
]


class _RescaledPrefix(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, m: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> Any:
        out_m, out_s, out_z = rescaled_prefix_forward_triton(m, s, z)
        ctx.save_for_backward(m, out_m)
        ctx.dim_v = s.shape[-1]
        ctx.mark_non_differentiable(out_m)
        return out_m, out_s, out_z

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable themselves
    def backward(ctx: Any, _: Any, d_out_s: torch.Tensor | None, d_out_z: Any) -> Any:
        m, out_m = ctx.saved_tensors
        g, nb, c = m.shape
        if d_out_s is None:
            d_out_s = m.new_zeros(g, nb, c, ctx.dim_v)
        if d_out_z is None:
            d_out_z = torch.zeros_like(m)
        d_s, d_z = rescaled_prefix_backward_triton(m, out_m, d_out_s, d_out_z)
        return None, d_s, d_z


def rescaled_prefix(
    m: torch.Tensor, s: torch.Tensor, z: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exclusive prefixes over chunks (dim 1) of ``m`` (G, nb, C) chunk maxima (no gradient:
    they are shifts), ``s`` (G, nb, C, Dv) and ``z`` (G, nb, C) sums relative to them.

    Returns the prefix maxima (−inf at b = 0) and the sums relative to them, differentiable
    in ``s`` and ``z``. ``backend``: ``auto`` (Triton on CUDA for float32/float64),
    ``torch`` (the reference loop) or ``triton``.
    """
    if m.dim() != 3 or s.dim() != 4 or z.shape != m.shape or s.shape[:3] != m.shape:
        raise ValueError(
            "rescaled_prefix needs m (G, nb, C), s (G, nb, C, Dv) and z (G, nb, C); got "
            f"{tuple(m.shape)}, {tuple(s.shape)}, {tuple(z.shape)}"
        )
    fits = s.dtype in (torch.float32, torch.float64)
    if pick_backend(backend, s.device, op="rescaled_scan", fits=fits) == "torch":
        return rescaled_prefix_reference(m.detach(), s, z)
    return _RescaledPrefix.apply(m.detach(), s, z)  # type: ignore[no-any-return]
