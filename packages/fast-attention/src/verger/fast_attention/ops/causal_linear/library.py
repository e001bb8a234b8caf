"""The Triton causal launchers behind one entry per direction: the schedule (``parallel``:
``triton.py``, ``sequential``: ``triton_sequential.py``) is picked here, and the launchers are
``torch.library`` custom ops so that ``torch.compile`` traces through the Triton path: no
graph break, ``fullgraph=True`` and CUDA graphs (``mode="reduce-overhead"``) work, with output
shapes from the ops' fake implementations.

Eager calls skip the ops and run the launchers directly: a custom op's dispatch costs ~10 µs
per call, and a training step at a few thousand tokens is bound by launch time on the host.
"""

from __future__ import annotations

import torch

from verger.fast_attention.ops.causal_linear.triton import (
    LOW_PRECISION,
    causal_linear_backward_triton,
    causal_linear_forward_triton,
)
from verger.fast_attention.ops.causal_linear.triton_sequential import (
    causal_linear_backward_sequential,
    causal_linear_forward_sequential,
)

__all__ = ["SCHEDULES", "triton_backward", "triton_forward"]

SCHEDULES = ("parallel", "sequential")  # triton.py / triton_sequential.py
_NONE = ""  # custom op schemas take no Optional[str] here: "" stands for "no fused feature map"


@torch.library.custom_op("verger_fast_attention::causal_linear_fwd", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    normalize: bool,
    chunk_size: int,
    feature_map: str,
    out_dtype: torch.dtype,
    schedule: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, d, res = triton_forward(  # runs the launchers: the op's body is never traced
        q, k, v, eps=eps, normalize=normalize, chunk_size=chunk_size,
        feature_map=feature_map or None, out_dtype=out_dtype, schedule=schedule,
    )  # fmt: skip
    empty = q.new_empty(0, dtype=torch.float32)
    return out, empty if d is None else d, out.new_empty(0) if res is None else res


@_forward_op.register_fake
def _(q, k, v, eps, normalize, chunk_size, feature_map, out_dtype, schedule):  # type: ignore[no-untyped-def]
    out = v.new_empty((*q.shape[:-1], v.shape[-1]), dtype=out_dtype)
    d = q.new_empty(q.shape[:-1] if normalize else (0,), dtype=torch.float32)
    return out, d, out.new_empty(out.shape if normalize and out_dtype in LOW_PRECISION else (0,))


@torch.library.custom_op("verger_fast_attention::causal_linear_bwd", mutates_args=())
def _backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    d: torch.Tensor,
    res: torch.Tensor,
    grad_out: torch.Tensor,
    normalize: bool,
    chunk_size: int,
    feature_map: str,
    grad_dtype: torch.dtype,
    schedule: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return triton_backward(
        q, k, v, out if normalize else None, d if normalize else None, grad_out,
        res=res if res.numel() else None, chunk_size=chunk_size,
        feature_map=feature_map or None, grad_dtype=grad_dtype, schedule=schedule,
    )  # fmt: skip


@_backward_op.register_fake
def _(q, k, v, out, d, res, grad_out, normalize, chunk_size, feature_map, grad_dtype, schedule):  # type: ignore[no-untyped-def]
    return tuple(t.new_empty(t.shape, dtype=grad_dtype) for t in (q, k, v))


def triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    eps: float,
    normalize: bool,
    chunk_size: int,
    feature_map: str | None,
    out_dtype: torch.dtype,
    schedule: str = "parallel",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The Triton forward of ``schedule`` (the sequential one is normalized only), through
    its custom op while compiling: ``(out, d, res)`` as ``causal_linear_forward_triton``
    returns them."""
    if torch.compiler.is_compiling():
        out, d, res = _forward_op(
            q, k, v, eps, normalize, chunk_size, feature_map or _NONE, out_dtype, schedule
        )
        return out, d if normalize else None, res if res.numel() else None
    if schedule == "sequential" and normalize:
        return causal_linear_forward_sequential(
            q, k, v, eps=eps, chunk_size=chunk_size, feature_map=feature_map, out_dtype=out_dtype
        )
    return causal_linear_forward_triton(
        q, k, v, eps=eps, normalize=normalize, chunk_size=chunk_size, feature_map=feature_map,
        out_dtype=out_dtype,
    )  # fmt: skip


def triton_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    d: torch.Tensor | None,
    grad_out: torch.Tensor,
    *,
    res: torch.Tensor | None = None,
    chunk_size: int,
    feature_map: str | None,
    grad_dtype: torch.dtype,
    schedule: str = "parallel",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton backward of ``schedule`` from the forward's ``out``, ``d`` and ``res``,
    through its custom op while compiling."""
    if torch.compiler.is_compiling():
        empty = q.new_empty(0)
        return _backward_op(
            q, k, v, *(empty if t is None else t for t in (out, d, res)), grad_out,
            d is not None, chunk_size, feature_map or _NONE, grad_dtype, schedule,
        )  # fmt: skip
    if schedule == "sequential" and out is not None and d is not None:
        return causal_linear_backward_sequential(
            q, k, v, out, d, grad_out, res=res, chunk_size=chunk_size, feature_map=feature_map,
            grad_dtype=grad_dtype,
        )  # fmt: skip
    return causal_linear_backward_triton(
        q, k, v, out, d, grad_out, res=res, chunk_size=chunk_size, feature_map=feature_map,
        grad_dtype=grad_dtype,
    )  # fmt: skip
