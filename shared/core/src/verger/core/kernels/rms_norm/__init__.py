"""Fused RMSNorm: ``rms_norm(x, weight, eps)`` with Triton on CUDA and a torch path elsewhere."""

from __future__ import annotations

import importlib

import torch

from verger.core.kernels._common import (
    Backend,
    check_same_device,
    check_tensor,
    resolve_backend,
)
from verger.core.kernels.rms_norm.reference import rms_norm_reference

__all__ = ["rms_norm", "rms_norm_reference"]

_OP = "rms_norm"


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):  # type: ignore[override]
        impl = importlib.import_module(__name__ + ".triton")
        x2d = x.reshape(-1, x.shape[-1])
        y, rstd = impl.rms_norm_fwd(x2d, weight, eps)
        ctx.save_for_backward(x2d, weight, rstd)
        return y.view_as(x)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        impl = importlib.import_module(__name__ + ".triton")
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape).contiguous()
        dx, dw = impl.rms_norm_bwd(dy2d, x2d, weight, rstd)
        return dx.view(dy.shape), dw.to(weight.dtype), None


class _RMSNormTorch(torch.autograd.Function):
    """CPU path: a closed-form backward from the saved 1/rms, measured faster on CPU than
    both ``F.rms_norm`` and autograd through the reference (fewer elementwise passes)."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # type: ignore[override]
        xf, wf = x.float(), weight.float()
        rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd * wf).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        dyf = dy.float()
        g = dyf * weight.float()
        dx = (g - xhat * (g * xhat).mean(dim=-1, keepdim=True)) * rstd
        dw = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, backend: Backend = "auto"
) -> torch.Tensor:
    """RMS-normalize the last dimension of ``x`` and scale by ``weight`` (shape ``[D]``).

    Statistics are computed in fp32; the result has ``x``'s dtype. Differentiable in ``x``
    and ``weight``. ``backend``: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"``
    or ``"torch"``.
    """
    check_tensor(x, "x", op=_OP, min_ndim=1)
    check_tensor(weight, "weight", op=_OP, ndim=1)
    check_same_device(_OP, x=x, weight=weight)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{_OP}: weight has {weight.shape[0]} features but x's last dim is {x.shape[-1]}"
        )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"{_OP}: eps={eps!r} must be a positive float")
    if resolve_backend(backend, x, op=_OP) == "triton":
        return _RMSNormTriton.apply(x, weight, float(eps))
    return _RMSNormTorch.apply(x, weight, float(eps))
