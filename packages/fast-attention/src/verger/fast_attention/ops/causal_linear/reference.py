"""The specification: naive O(N²) causal product, readable and in float64/float32, no Triton."""

from __future__ import annotations

import torch


def causal_product_reference(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, reverse: bool = False
) -> torch.Tensor:
    """``out_i = Σ_{j ≤ i} (a_i · b_j) c_j`` (``j ≥ i`` when ``reverse``), materializing N×N."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    scores = a.to(dtype) @ b.to(dtype).mT
    n = a.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool, device=a.device)
    keep = keep.triu() if reverse else keep.tril()
    return scores.masked_fill(~keep, 0.0) @ c.to(dtype)


def causal_linear_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``out_i = Σ_{j≤i} (q_i·k_j) v_j / (Σ_{j≤i} q_i·k_j + eps)`` on features ``q``, ``k``."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    n = q.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scores = (q.to(dtype) @ k.to(dtype).mT).masked_fill(~keep, 0.0)
    return (scores @ v.to(dtype)) / (scores.sum(-1, keepdim=True) + eps)
