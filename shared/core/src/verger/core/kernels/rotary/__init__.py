"""Fused rotary embedding: ``apply_rotary_emb(x, cos, sin)`` (half-split layout)."""

from __future__ import annotations

import importlib

import torch

from verger.core.kernels._common import Backend, check_same_device, check_tensor, resolve_backend
from verger.core.kernels.rotary.reference import rotary_reference, rotary_tables

__all__ = ["apply_rotary_emb", "rotary_reference", "rotary_tables"]

_OP = "apply_rotary_emb"


class _RotaryTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):  # type: ignore[override]
        impl = importlib.import_module(__name__ + ".triton")
        ctx.save_for_backward(cos, sin)
        return impl.rotary(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        impl = importlib.import_module(__name__ + ".triton")
        cos, sin = ctx.saved_tensors
        return impl.rotary(dy.contiguous(), cos, sin, inverse=True), None, None


class _RotaryTorch(torch.autograd.Function):
    """Pure torch path that saves only the tables (autograd of the reference keeps x too)."""

    @staticmethod
    def forward(ctx, x, cos, sin):  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return rotary_reference(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return rotary_reference(dy, cos, -sin), None, None


def apply_rotary_emb(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: Backend = "auto"
) -> torch.Tensor:
    """Apply rotary position embedding to ``x`` of shape ``[..., T, H, D]`` (D even).

    ``cos``/``sin`` are fp32 tables ``[T, D/2]`` for the T positions of ``x`` (slice them for
    an offset, see :func:`rotary_tables`). They are constants: only ``x`` gets a gradient, and
    tables that require grad are rejected rather than silently given none.
    """
    check_tensor(x, "x", op=_OP, min_ndim=3)
    check_tensor(cos, "cos", op=_OP, ndim=2, dtypes=(torch.float32,))
    check_tensor(sin, "sin", op=_OP, ndim=2, dtypes=(torch.float32,))
    check_same_device(_OP, x=x, cos=cos, sin=sin)
    t, _, d = x.shape[-3:]
    if d % 2:
        raise ValueError(f"{_OP}: the head dim (x.shape[-1]={d}) must be even")
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != (t, d // 2):
            raise ValueError(
                f"{_OP}: {name} has shape {tuple(table.shape)}; expected (T, D/2) = {(t, d // 2)}"
            )
        if table.requires_grad:
            raise ValueError(f"{_OP}: {name} requires grad; the tables are constants (detach)")
    if resolve_backend(backend, x, op=_OP) == "triton":
        return _RotaryTriton.apply(x, cos, sin)
    return _RotaryTorch.apply(x, cos, sin)
