"""Softmax attention of query blocks over per-block gathered keys (improved clustered's top-k).

Improved clustered attention groups the queries of a cluster into fixed-width blocks; every
block attends exactly to its cluster's top-k keys. ``gathered_attention`` is that product:
the Triton kernels on CUDA (keys gathered by index inside the kernel, softmax in registers,
dk / dv added back with atomics), the batched torch reference elsewhere (gathered copies +
``bmm``, the fastest CPU form measured).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from verger.core.kernels import pick_backend
from verger.fast_attention.ops.gathered_attention.reference import gathered_attention_reference
from verger.fast_attention.ops.gathered_attention.triton import (
    MAX_DIM,
    MAX_KEYS,
    gathered_attention_backward_triton,
    gathered_attention_forward_triton,
)

__all__ = ["gathered_attention", "gathered_attention_reference"]


class _GatheredAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_rows: torch.Tensor,
        key_ok: torch.Tensor | None,
        scale: float,
        query_pos: torch.Tensor | None,
        key_pos: torch.Tensor | None,
    ) -> torch.Tensor:
        positions = (query_pos, key_pos) if query_pos is not None and key_pos is not None else None
        out, lse = gathered_attention_forward_triton(q, k, v, key_rows, key_ok, scale, positions)
        ctx.save_for_backward(q, k, v, key_rows, key_ok, out, lse, query_pos, key_pos)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable themselves
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, key_rows, key_ok, out, lse, query_pos, key_pos = ctx.saved_tensors
        positions = (query_pos, key_pos) if query_pos is not None and key_pos is not None else None
        dq, dk, dv = gathered_attention_backward_triton(
            q, k, v, key_rows, key_ok, ctx.scale, out, lse, grad_out, positions
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def gathered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_rows: torch.Tensor,
    key_ok: torch.Tensor | None = None,
    *,
    scale: float,
    query_pos: torch.Tensor | None = None,
    key_pos: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``softmax(q[b] k[key_rows[b]]ᵀ · scale) v[key_rows[b]]`` for every block ``b``.

    ``q``: (B, W, D); ``k``: (M, D); ``v``: (M, Dv); ``key_rows``: (B, K) int64 in [0, M);
    ``key_ok``: optional (B, K) bool (False = masked key). Causal mask: with ``query_pos``
    (B, W) and ``key_pos`` (B, K) integer positions, row w uses key j only if
    ``key_pos[b, j] <= query_pos[b, w]``. A query row with no allowed key gets zeros.
    Returns (B, W, Dv) in q's dtype (float32 accumulation); differentiable in q, k and v.
    ``backend``: ``auto`` (Triton on CUDA when it fits: K ≤ 256, head dims ≤ 256), ``torch``
    or ``triton`` (also on CPU tensors under ``TRITON_INTERPRET=1``).
    """
    if q.dim() != 3 or k.dim() != 2 or v.dim() != 2 or key_rows.dim() != 2:
        raise ValueError(
            "expected q (B, W, D), k (M, D), v (M, Dv), key_rows (B, K); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(key_rows.shape)}"
        )
    if k.shape[-1] != q.shape[-1] or v.shape[0] != k.shape[0] or key_rows.shape[0] != q.shape[0]:
        raise ValueError(
            f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"key_rows {tuple(key_rows.shape)}"
        )
    if key_ok is not None and key_ok.shape != key_rows.shape:
        raise ValueError(
            f"key_ok {tuple(key_ok.shape)} must match key_rows {tuple(key_rows.shape)}"
        )
    if (query_pos is None) != (key_pos is None):
        raise ValueError("pass both query_pos and key_pos (the causal mask) or neither")
    if (
        query_pos is not None
        and key_pos is not None
        and (query_pos.shape != q.shape[:2] or key_pos.shape != key_rows.shape)
    ):
        raise ValueError(
            f"query_pos {tuple(query_pos.shape)} must be (B, W) = {tuple(q.shape[:2])} and "
            f"key_pos {tuple(key_pos.shape)} must match key_rows {tuple(key_rows.shape)}"
        )
    fits = key_rows.shape[-1] <= MAX_KEYS and max(q.shape[-1], v.shape[-1]) <= MAX_DIM
    backend = pick_backend(backend, q.device, op="gathered_attention", fits=fits)
    if backend == "torch":
        return gathered_attention_reference(q, k, v, key_rows, key_ok, scale, query_pos, key_pos)
    out = _GatheredAttention.apply(
        q, k, v, key_rows.long(), key_ok, float(scale), query_pos, key_pos
    )
    return out.to(q.dtype)
