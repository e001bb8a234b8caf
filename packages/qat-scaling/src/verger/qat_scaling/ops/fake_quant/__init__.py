"""Fused weight fake quantization: ``fake_quant(w, s, spec, grad_scale)``.

Triton on CUDA (one kernel forward, one backward that also reduces the scale gradient),
a pure-torch path elsewhere; ``backend="triton"|"torch"`` forces one (the choice is
verger-core's, so ``verger.core.kernels.use_backend`` redirects it too).
"""

from __future__ import annotations

import importlib
from typing import Literal

import torch

from verger.core.kernels import pick_backend
from verger.core.validation import KERNEL_DTYPES, check_dtype, check_shape
from verger.qat_scaling.ops.fake_quant.reference import (
    LevelSpec,
    codes_from_weights,
    dequantize_codes,
    fake_quant_reference,
    level_of_codes,
    level_spec,
)

__all__ = [
    "LevelSpec",
    "codes_from_weights",
    "dequantize_codes",
    "fake_quant",
    "fake_quant_reference",
    "level_of_codes",
    "level_spec",
]

_OP = "fake_quant"
Backend = Literal["auto", "triton", "torch"]


class _FakeQuantTorch(torch.autograd.Function):
    """CPU path: the reference's math in fewer passes over the weights (a tiny model's step
    is dominated by per-op overhead). With ``c = clamp(v, lo, hi)``: lsq codes are
    ``round(c)`` (integer bounds), the straight-through mask is ``c == v``, and the scale
    gradient ``sum g r`` is ``sum g level - sum (g mask) c`` (``c == v`` inside, and the
    clipped ``level`` alone outside), so the backward reuses the forward's tensors."""

    @staticmethod
    def forward(ctx, w2d, s2d, spec, grad_scale):  # type: ignore[override]
        s = s2d.float()
        v = w2d.float() * s.reciprocal()
        if spec.scheme == "sign":
            level = (w2d >= 0).float() * 2.0 - 1.0
            c = inside = None
            inside = v.abs() <= 1.0
        else:
            c = v.clamp(spec.lo, spec.hi)
            if spec.scheme == "lsq":
                level = c.round()
            else:
                level = level_of_codes((c * spec.n_levels - spec.shift).round(), spec)
            inside = c == v
        ctx.save_for_backward(level, c, inside)
        ctx.spec, ctx.grad_scale, ctx.s_dtype, ctx.w_dtype = spec, grad_scale, s2d.dtype, w2d.dtype
        return (level * s).to(w2d.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        level, c, inside = ctx.saved_tensors
        g = grad_out.float()
        grad_w = g * inside
        gr = g * level if c is None else g * level - grad_w * c
        grad_s = gr.sum(dim=-1, keepdim=True) * ctx.grad_scale
        return grad_w.to(ctx.w_dtype), grad_s.to(ctx.s_dtype), None, None


class _FakeQuantTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w2d, s2d, spec, grad_scale):  # type: ignore[override]
        impl = importlib.import_module(__name__ + ".triton")
        s1d = s2d.reshape(-1).float().contiguous()
        ctx.save_for_backward(w2d, s1d)
        ctx.spec, ctx.grad_scale, ctx.s_dtype = spec, grad_scale, s2d.dtype
        return impl.fake_quant_fwd(w2d, s1d, spec)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        impl = importlib.import_module(__name__ + ".triton")
        w2d, s1d = ctx.saved_tensors
        dw, ds = impl.fake_quant_bwd(w2d, s1d, grad_out.contiguous(), ctx.spec, ctx.grad_scale)
        return dw, ds.view(-1, 1).to(ctx.s_dtype), None, None


def fake_quant(
    w: torch.Tensor,
    s: torch.Tensor,
    spec: LevelSpec,
    grad_scale: float = 1.0,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Fake-quantize ``w`` [rows, cols] with positive scales ``s`` [rows, cols / g].

    Each scale covers ``g`` consecutive columns of its row. The output has ``w``'s dtype
    and shape; gradients flow to ``w`` (straight-through) and ``s`` (LSQ, times
    ``grad_scale``) as specified in :mod:`.reference`.
    """
    check_dtype("fake_quant: w", w, KERNEL_DTYPES)
    check_dtype("fake_quant: s", s, (torch.float32,))
    check_shape("fake_quant: w", w, ("rows", "cols"))
    if not w.is_contiguous():
        raise ValueError("fake_quant: w must be contiguous; call .contiguous() first")
    if w.device != s.device:
        raise ValueError(f"fake_quant: w is on {w.device} but s on {s.device}")
    if not isinstance(spec, LevelSpec):
        raise TypeError(f"{_OP}: spec must be a LevelSpec, got {type(spec).__name__}")
    rows, cols = w.shape
    if s.dim() != 2 or s.shape[0] != rows or s.shape[1] < 1 or cols % s.shape[1]:
        raise ValueError(
            f"{_OP}: scales {tuple(s.shape)} do not fit weights {tuple(w.shape)}: need "
            f"[{rows}, groups] with groups dividing {cols}"
        )
    group = cols // s.shape[1]
    w2d = w.reshape(-1, group)
    s2d = s.reshape(-1, 1)
    if pick_backend(backend, w.device, op=_OP) == "triton":
        out = _FakeQuantTriton.apply(w2d, s2d, spec, float(grad_scale))
    else:
        out = _FakeQuantTorch.apply(w2d, s2d, spec, float(grad_scale))
    return out.view(rows, cols)
