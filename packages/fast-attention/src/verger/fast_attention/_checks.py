"""Input validation shared by the attention functions: clear errors before any work starts."""

from __future__ import annotations

import torch

from verger.core.validation import finite_number, positive_int

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, same_length: bool) -> None:
    """q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv), floating, on one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have shape (batch, heads, seq, dim), got {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}.dtype={t.dtype} is not one of {FLOAT_DTYPES}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k, v must share one dtype (as in scaled_dot_product_attention); got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q, k, v must share (batch, heads); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim; got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must share the sequence length; got {k.shape[2]}, {v.shape[2]}")
    if same_length and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"causal attention needs q and k of the same length; got {q.shape[2]}, {k.shape[2]}"
        )


def check_padding_mask(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """``key_padding_mask``: bool (batch, seq), True marks padding (as in nn.MultiheadAttention)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("key_padding_mask must be a bool tensor (batch, seq), True = padding")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"key_padding_mask has shape {tuple(mask.shape)}; expected (batch, seq) = "
            f"({batch}, {length})"
        )
    return mask


check_positive_int = positive_int  # verger.core.validation's (an int >= 1, bools refused)


def check_eps(eps: object) -> float:
    """The normalizer's ``eps``: a finite number >= 0."""
    return finite_number("eps", eps, at_least=0)
