"""The soup's weighted sum ``base + sum_j alpha_j experts[j]``: Triton on CUDA, torch elsewhere.

Used once per parameter tensor, both by the training forward (differentiable in all three
inputs) and by ``SoupOfExperts.instantiate``.
"""

from __future__ import annotations

import importlib

import torch

from verger.core.kernels import pick_backend  # the one backend dispatch of every kernel
from verger.core.validation import KERNEL_DTYPES, check_dtype
from verger.expert_soups.ops.weighted_sum.reference import weighted_sum_reference

__all__ = ["weighted_sum", "weighted_sum_reference"]

_OP = "weighted_sum"


class _WeightedSumTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base, experts, alpha):  # type: ignore[override]
        impl = importlib.import_module(__name__ + ".triton")
        ctx.save_for_backward(experts, alpha)
        return impl.weighted_sum_fwd(base, experts, alpha)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        impl = importlib.import_module(__name__ + ".triton")
        experts, alpha = ctx.saved_tensors
        d_experts, d_alpha = impl.weighted_sum_bwd(grad.contiguous(), experts, alpha)
        return grad, d_experts, d_alpha


def _weighted_sum_torch(
    base: torch.Tensor, experts: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    # One addmm per tensor: a [1, n] x [n, P] product that BLAS runs in a single pass, and
    # that torch.utils.flop_counter counts (2 n P forward, 4 n P backward), so the package's
    # FLOP accounts can be checked against it. Low precision is upcast like the reference.
    if base.dtype != torch.float32:
        return weighted_sum_reference(base, experts, alpha)
    n = experts.shape[0]
    flat = torch.addmm(base.reshape(1, -1), alpha.reshape(1, n).float(), experts.reshape(n, -1))
    return flat.view_as(base)


def weighted_sum(
    base: torch.Tensor,
    experts: torch.Tensor,
    alpha: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``base + sum_j alpha[j] * experts[j]`` with ``experts`` ``[n, *base.shape]``, ``alpha [n]``.

    Math in fp32, result in ``base.dtype``; differentiable in all three inputs. ``backend``:
    ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
    """
    for name, t in (("base", base), ("experts", experts), ("alpha", alpha)):
        check_dtype(f"{_OP}: {name}", t, KERNEL_DTYPES)
        if not t.is_contiguous():
            raise ValueError(f"{_OP}: {name} must be contiguous; call .contiguous() first")
    if alpha.ndim != 1:
        raise ValueError(f"{_OP}: alpha must be 1-D [n], got shape {tuple(alpha.shape)}")
    if len({base.device, experts.device, alpha.device}) > 1:
        raise ValueError(
            f"{_OP}: base ({base.device}), experts ({experts.device}) and alpha "
            f"({alpha.device}) must be on one device"
        )
    if tuple(experts.shape[1:]) != tuple(base.shape):
        raise ValueError(
            f"{_OP}: experts {tuple(experts.shape)} must be [n, *base.shape] with base "
            f"{tuple(base.shape)}"
        )
    if alpha.shape[0] != experts.shape[0]:
        raise ValueError(
            f"{_OP}: alpha has {alpha.shape[0]} entries for {experts.shape[0]} experts"
        )
    if experts.dtype != base.dtype:
        raise TypeError(
            f"{_OP}: experts ({experts.dtype}) and base ({base.dtype}) must share a dtype"
        )
    if pick_backend(backend, base.device, op=_OP) == "triton":
        return _WeightedSumTriton.apply(base, experts, alpha)
    return _weighted_sum_torch(base, experts, alpha)
