"""Causal linear attention on features: dispatch between Triton and chunked torch.

``causal_linear`` (normalized) and ``causal_product`` (unnormalized ``Σ_{j≤i} (q_i·k_j) v_j``)
are differentiable with an O(N)-memory backward on every backend: the autograd Functions save
only (N, D)-sized tensors, and the backward recomputes chunk states.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from verger.core.kernels import pick_backend
from verger.fast_attention.feature_maps import compute_dtype, elu_plus_one
from verger.fast_attention.ops.causal_linear.chunked import (
    DEFAULT_CHUNK_SIZE,
    causal_linear_backward_chunked,
    causal_linear_forward_chunked,
    causal_product_backward_chunked,
    causal_product_chunked,
)
from verger.fast_attention.ops.causal_linear.library import (
    SCHEDULES,
    triton_backward,
    triton_forward,
)
from verger.fast_attention.ops.causal_linear.reference import (
    causal_linear_reference,
    causal_product_reference,
)
from verger.fast_attention.ops.causal_linear.triton import (
    FUSED_FEATURE_MAPS,
    KERNEL_DTYPES,
    MAX_GRID_Z,
    MAX_HEAD_DIM,
    causal_product_triton,
)

__all__ = [
    "BACKENDS",
    "FUSED_FEATURE_MAPS",
    "KERNEL_DTYPES",
    "SCHEDULES",
    "causal_linear",
    "causal_linear_fused",
    "causal_linear_reference",
    "causal_product",
    "causal_product_chunked",
    "causal_product_reference",
    "causal_product_triton",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "triton", "reference")


def resolve_backend(
    backend: str,
    device: torch.device,
    head_dim: int = 0,
    batch_heads: int = 0,
    dtype: torch.dtype = torch.float32,
) -> str:
    """``auto`` picks Triton on CUDA when it is installed and the inputs fit its kernels
    (``head_dim`` <= 256, ``batch_heads`` <= 65535, not float64), the chunked torch path
    otherwise."""
    fits = head_dim <= MAX_HEAD_DIM and batch_heads <= MAX_GRID_Z and dtype != torch.float64
    return pick_backend(backend, device, op="causal_linear", fits=fits, choices=BACKENDS)


class _CausalProduct(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        backend: str,
        chunk_size: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.backend, ctx.chunk_size = backend, chunk_size
        if backend == "triton":
            return triton_forward(
                q, k, v, eps=0.0, normalize=False, chunk_size=chunk_size, feature_map=None,
                out_dtype=torch.float32,
            )[0]  # fmt: skip
        return causal_product_chunked(q, k, v, chunk_size=chunk_size)

    @staticmethod
    @once_differentiable  # a clear error on double backward, not one from inside the kernels
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v = ctx.saved_tensors
        if ctx.backend == "triton":
            dq, dk, dv = triton_backward(
                q, k, v, None, None, grad_out, chunk_size=ctx.chunk_size, feature_map=None,
                grad_dtype=torch.float32,
            )  # fmt: skip
        else:
            dq, dk, dv = causal_product_backward_chunked(
                q, k, v, grad_out, chunk_size=ctx.chunk_size
            )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def causal_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``out_i = Σ_{j≤i} (q_i·k_j) v_j`` for (..., N, Dk), (..., N, Dk), (..., N, Dv) inputs.

    Returns float32 (float64 for float64 inputs) with fp32 accumulation for 16-bit inputs.
    ``backend``: ``auto`` (Triton on CUDA, chunked torch elsewhere), ``torch``, ``triton``
    (also on CPU tensors under ``TRITON_INTERPRET=1``) or ``reference`` (naive O(N²)).
    """
    _check_shapes(q, k, v, chunk_size)
    resolved = resolve_backend(backend, q.device, *_launch_shape(q, v), q.dtype)
    if q.shape[-2] == 0:
        return _empty_output(v, compute_dtype(q.dtype))
    if resolved == "reference":
        return causal_product_reference(q, k, v)
    if resolved == "triton" and q.dtype == torch.float64:
        raise TypeError("backend='triton' supports float32/float16/bfloat16 inputs, not float64")
    size = chunk_size or (64 if resolved == "triton" else DEFAULT_CHUNK_SIZE)
    return _CausalProduct.apply(q, k, v, resolved, size)


def _launch_shape(q: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    """(widest head dim, batch*heads): what decides whether the Triton launch fits."""
    return max(q.shape[-1], v.shape[-1]), math.prod(q.shape[:-2])


def _empty_output(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (..., 0, Dv) output of an empty sequence, still attached to v's graph (no kernel
    and no chunk layout handles zero positions)."""
    return v.to(dtype) * 0


def _check_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int | None
) -> None:
    if q.shape[:-1] != k.shape[:-1] or q.shape[-1] != k.shape[-1] or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"expected q, k of shape (..., N, Dk) and v of shape (..., N, Dv); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be None or a positive int")


class _CausalLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        eps: float,
        backend: str,
        chunk_size: int,
        feature_map: str | None = None,
        schedule: str = "parallel",
    ) -> torch.Tensor:
        if backend == "triton":
            # Fused feature map: out and gradients in the inputs' dtypes (no conversions).
            # A 16-bit out comes with its rounding residual `res` for the backward.
            out, den, res = triton_forward(
                q, k, v, eps=eps, normalize=True, chunk_size=chunk_size, feature_map=feature_map,
                out_dtype=v.dtype if feature_map else torch.float32, schedule=schedule,
            )  # fmt: skip
        else:  # with a feature map, the raw q, k are saved: φ is formed again in the backward
            qf, kf = _chunked_features(q, k, feature_map)
            out, den = causal_linear_forward_chunked(qf, kf, v, eps, chunk_size=chunk_size)
            res = None
        ctx.save_for_backward(q, k, v, out, den, res)
        ctx.eps, ctx.backend, ctx.chunk_size = eps, backend, chunk_size
        ctx.feature_map, ctx.schedule = feature_map, schedule
        return out

    @staticmethod
    @once_differentiable  # a clear error on double backward, not one from inside the kernels
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, den, res = ctx.saved_tensors
        if ctx.backend == "triton":  # `den` holds den + eps here (what the kernels use)
            dq, dk, dv = triton_backward(
                q, k, v, out, den, grad_out, res=res, chunk_size=ctx.chunk_size,
                feature_map=ctx.feature_map, schedule=ctx.schedule,
                grad_dtype=q.dtype if ctx.feature_map else torch.float32,
            )  # fmt: skip
        else:
            qf, kf = _chunked_features(q, k, ctx.feature_map)
            dq, dk, dv = causal_linear_backward_chunked(
                qf, kf, v, out, den, grad_out, ctx.eps, chunk_size=ctx.chunk_size
            )
            if ctx.feature_map:  # through φ' = min(φ, 1), in place: every tensor here is ours
                dq, dk = dq.mul_(qf.clamp_(max=1.0)), dk.mul_(kf.clamp_(max=1.0))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _chunked_features(
    q: torch.Tensor, k: torch.Tensor, feature_map: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked path's features: q, k as given, or φ = elu + 1 of them in the compute
    dtype (the one map ``causal_linear_fused`` takes)."""
    if feature_map is None:
        return q, k
    dtype = compute_dtype(q.dtype)
    return elu_plus_one(q, dtype), elu_plus_one(k, dtype)


def causal_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    eps: float = 1e-6,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``out_i = Σ_{j≤i} (q_i·k_j) v_j / (Σ_{j≤i} q_i·k_j + eps)`` on (non-negative) features.

    Returns float32 (float64 for float64 inputs); see ``causal_product`` for ``backend``.
    """
    _check_shapes(q, k, v, chunk_size)
    resolved = resolve_backend(backend, q.device, *_launch_shape(q, v), q.dtype)
    if q.shape[-2] == 0:
        return _empty_output(v, compute_dtype(q.dtype))
    if resolved == "reference":
        return causal_linear_reference(q, k, v, eps)
    if resolved == "triton" and q.dtype == torch.float64:
        raise TypeError("backend='triton' supports float32/float16/bfloat16 inputs, not float64")
    size = chunk_size or (64 if resolved == "triton" else DEFAULT_CHUNK_SIZE)
    return _CausalLinear.apply(q, k, v, float(eps), resolved, size)


def causal_linear_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu",
    eps: float = 1e-6,
    chunk_size: int | None = None,
    schedule: str = "parallel",
    backend: str = "triton",
) -> torch.Tensor:
    """Causal linear attention on raw q, k: ``causal_linear(φ(q), φ(k), v)`` with φ applied
    inside one autograd node (``feature_map`` in ``FUSED_FEATURE_MAPS``; ``elu``: elu + 1).
    The output and gradients keep the inputs' dtypes (fp32 accumulation).

    ``backend="triton"`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``): the kernels map
    every tile as they load it, so no feature tensor and no dtype conversion is formed, which
    on a GPU removes some thirty elementwise launches per training step. ``schedule``:
    ``parallel`` (chunk-parallel kernels, any batch; 6 launches per training step) or
    ``sequential`` (one program per batch·head looping over the chunks; 3 launches, for short
    sequences and small batches where the step is bound by launch time; head dims <= 64, sm_90
    GPUs).

    ``backend="torch"``: the chunked path (any device, float64 too) with φ formed around it;
    the backward keeps the raw q, k rather than the features and forms φ again, so training
    holds two fewer (N, D) tensors than ``causal_linear`` on precomputed features.
    """
    _check_shapes(q, k, v, chunk_size)
    backend = pick_backend(backend, q.device, op="causal_linear", choices=("triton", "torch"))
    if backend == "triton" and q.dtype == torch.float64:
        raise TypeError(
            "causal_linear_fused(backend='triton') runs float32/float16/bfloat16 inputs, not "
            "float64 (backend='torch' takes it)"
        )
    if feature_map not in FUSED_FEATURE_MAPS:
        raise ValueError(f"feature_map={feature_map!r} is not one of {FUSED_FEATURE_MAPS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
    if q.shape[-2] == 0:
        return _empty_output(v, v.dtype)
    if backend == "torch":
        if schedule != "parallel":
            raise ValueError(
                f"schedule={schedule!r} is a Triton schedule; backend='torch' has none"
            )
        size = chunk_size or DEFAULT_CHUNK_SIZE
        out = _CausalLinear.apply(q, k, v, float(eps), "torch", size, feature_map, schedule)
        return out.to(v.dtype)
    size = chunk_size or 64
    return _CausalLinear.apply(q, k, v, float(eps), "triton", size, feature_map, schedule)
