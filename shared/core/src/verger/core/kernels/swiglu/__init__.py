"""Fused SwiGLU gating: ``swiglu(gate, up) = silu(gate) * up``."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from verger.core.kernels._common import Backend, check_same_device, check_tensor, resolve_backend
from verger.core.kernels.swiglu.reference import swiglu_reference

__all__ = ["swiglu", "swiglu_reference"]

_OP = "swiglu"


class _SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return importlib.import_module(__name__ + ".triton").swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        impl = importlib.import_module(__name__ + ".triton")
        return impl.swiglu_bwd(dy.contiguous(), gate, up)


def _swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # Plain autograd is the fastest CPU path measured (a recomputing autograd.Function that
    # saves less memory ran ~2.5x slower: many small elementwise passes). Low precision is
    # upcast to match the fp32 specification.
    if gate.dtype == torch.float32:
        return F.silu(gate) * up
    return swiglu_reference(gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: Backend = "auto") -> torch.Tensor:
    """``silu(gate) * up`` for same-shape, same-dtype tensors, math in fp32.

    Differentiable in both inputs. The Triton path keeps only the inputs for backward.
    """
    check_tensor(gate, "gate", op=_OP)
    check_tensor(up, "up", op=_OP)
    check_same_device(_OP, gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(
            f"{_OP}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape"
        )
    if gate.dtype != up.dtype:
        raise TypeError(f"{_OP}: gate ({gate.dtype}) and up ({up.dtype}) must share a dtype")
    if resolve_backend(backend, gate, op=_OP) == "triton":
        return _SwiGLUTriton.apply(gate, up)
    return _swiglu_torch(gate, up)
