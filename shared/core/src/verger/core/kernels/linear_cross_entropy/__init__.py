"""Chunked linear + cross-entropy that never materializes the [tokens, vocab] logits.

The tokens are processed ``chunk_size`` rows at a time: the chunk's fp32 logits are computed,
reduced to per-token losses and, in the same pass, overwritten by their gradient
``softmax - onehot``; two matmuls turn that into the chunk's ``dx`` rows and a contribution
to ``dweight``. For ``reduction="mean"|"sum"`` (a scalar loss) the gradients are therefore
ready at the end of the forward pass and the backward pass only scales them: three matmuls
per chunk in all, as many as the unfused ``x @ W.T`` + cross-entropy, with memory
O(chunk x vocab) instead of O(tokens x vocab). For ``reduction="none"`` the per-token
upstream gradients are unknown in forward, so backward recomputes each chunk.
The softmax step is a Triton kernel on CUDA and in-place torch ops on CPU.
"""

from __future__ import annotations

import importlib

import torch

from verger.core.kernels._common import Backend, check_same_device, check_tensor, resolve_backend
from verger.core.kernels.linear_cross_entropy.reference import linear_cross_entropy_reference

__all__ = ["auto_chunk_size", "linear_cross_entropy", "linear_cross_entropy_reference"]

_OP = "linear_cross_entropy"
_REDUCTIONS = ("mean", "sum", "none")
_INT_DTYPES = (torch.int64, torch.int32)


def auto_chunk_size(n_tokens: int, vocab: int, dim: int) -> int:
    """Rows per chunk: a logits chunk about as large as the input, and at least 4M elements."""
    return max(1, min(n_tokens, max(n_tokens * dim, 1 << 22) // max(vocab, 1)))


def _loss_grad_torch_(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, compute_grad: bool
) -> torch.Tensor:
    # One exp pass, in place on the fp32 chunk (it is ours): z -> exp(z - max) -> softmax.
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).long()
    target_logit = logits.gather(1, safe[:, None]).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    denom = logits.sub_(row_max).exp_().sum(dim=1)
    loss = (row_max.squeeze(1) + denom.log() - target_logit) * valid
    if compute_grad:  # the chunk becomes softmax - onehot, zero on ignored rows
        logits.div_(denom[:, None])
        rows = torch.arange(logits.shape[0], device=logits.device)
        logits.index_put_((rows, safe), torch.full_like(denom, -1.0), accumulate=True)
        logits.mul_(valid[:, None])
    return loss


def _loss_grad_(logits, targets, ignore_index, compute_grad, use_triton):
    if use_triton:
        impl = importlib.import_module(__name__ + ".triton")
        return impl.ce_loss_grad_(logits, targets, ignore_index, compute_grad)
    return _loss_grad_torch_(logits, targets, ignore_index, compute_grad)


def _accumulate(g, xc, weight, dx_rows, dw):
    """dx_rows = g @ weight; dw += g.T @ xc (dw in fp32)."""
    g = g.to(xc.dtype)
    if dx_rows is not None:
        torch.mm(g, weight, out=dx_rows)
    if dw is not None:
        if xc.dtype == torch.float32:  # out= rather than addmm_: flop_counter sees it
            torch.addmm(dw, g.T, xc, out=dw)
        else:
            dw.add_(g.T @ xc)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk, ignore_index, reduction, use_triton):  # type: ignore[override]
        n = x.shape[0]
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        eager = reduction != "none" and (need_dx or need_dw)
        losses = torch.empty(n, device=x.device, dtype=torch.float32)
        dx = torch.empty_like(x) if eager and need_dx else None
        dw = (
            torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
            if eager and need_dw
            else None
        )
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            xc = x[s:e]
            logits = (xc @ weight.T).float()
            losses[s:e] = _loss_grad_(logits, targets[s:e], ignore_index, eager, use_triton)
            if eager:
                _accumulate(logits, xc, weight, None if dx is None else dx[s:e], dw)
        ctx.meta = (chunk, ignore_index, reduction, use_triton, eager, weight.dtype)
        if reduction == "none":
            ctx.save_for_backward(x, weight, targets)
            return losses
        if reduction == "sum":
            scale = torch.ones((), device=x.device)
        else:  # the mean over non-ignored tokens (NaN when none is left, as in torch)
            scale = 1.0 / (targets != ignore_index).sum().float()
        if eager:
            ctx.save_for_backward(dx, dw, scale)
        return losses.sum() * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        chunk, ignore_index, _, use_triton, eager, w_dtype = ctx.meta
        if eager:
            dx, dw, scale = ctx.saved_tensors
            factor = grad_out.float() * scale
            dx = None if dx is None else (dx.float() * factor).to(dx.dtype)
            dw = None if dw is None else (dw * factor).to(w_dtype)
            return dx, dw, None, None, None, None, None
        x, weight, targets = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = torch.empty_like(x) if need_dx else None
        dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32) if need_dw else None
        grad_out = grad_out.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            for s in range(0, x.shape[0], chunk):
                e = min(s + chunk, x.shape[0])
                logits = (x[s:e] @ weight.T).float()
                _loss_grad_(logits, targets[s:e], ignore_index, True, use_triton)
                logits.mul_(grad_out[s:e, None])
                _accumulate(logits, x[s:e], weight, None if dx is None else dx[s:e], dw)
        dw = None if dw is None else dw.to(w_dtype)
        return dx, dw, None, None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: Backend = "auto",
) -> torch.Tensor:
    """``F.cross_entropy(x @ weight.T, targets)`` without materializing the logits.

    ``x``: ``[..., D]`` (float), ``weight``: ``[V, D]`` (same dtype), ``targets``: ``x.shape[:-1]``
    (int64/int32, values in ``[0, V)`` or ``ignore_index``). ``reduction``: ``"mean"`` over
    non-ignored tokens, ``"sum"``, or ``"none"`` (fp32 losses shaped like ``targets``).
    ``chunk_size`` rows are processed at a time (default :func:`auto_chunk_size`). Logits
    and softmax are fp32 whatever the input dtype. Differentiable in ``x`` and ``weight``;
    ``targets`` may be a strided view. With a scalar loss the gradients are computed during
    the forward pass, so evaluate under ``torch.no_grad()`` to skip that work.
    """
    check_tensor(x, "x", op=_OP, min_ndim=1)
    check_tensor(weight, "weight", op=_OP, ndim=2)
    check_tensor(targets, "targets", op=_OP, dtypes=_INT_DTYPES, contiguous=False)
    check_same_device(_OP, x=x, weight=weight, targets=targets)
    if weight.dtype != x.dtype:
        raise TypeError(f"{_OP}: weight ({weight.dtype}) and x ({x.dtype}) must share a dtype")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{_OP}: weight {tuple(weight.shape)} must be [V, D] with D = x.shape[-1] = {x.shape[-1]}"
        )
    if targets.shape != x.shape[:-1]:
        raise ValueError(
            f"{_OP}: targets {tuple(targets.shape)} must have shape x.shape[:-1] = {tuple(x.shape[:-1])}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_OP}: reduction={reduction!r} is not one of {_REDUCTIONS}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{_OP}: ignore_index must be an int, got {ignore_index!r}")
    vocab = weight.shape[0]
    if 0 <= ignore_index < vocab:
        raise ValueError(
            f"{_OP}: ignore_index={ignore_index} collides with a class in [0, {vocab})"
        )
    out_of_range = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bool(out_of_range.any()):
        bad = targets[out_of_range][0].item()
        raise ValueError(
            f"{_OP}: targets holds {bad}; allowed: [0, {vocab}) or ignore_index={ignore_index}"
        )
    x2d = x.reshape(-1, x.shape[-1])
    flat_targets = targets.reshape(-1).contiguous()  # targets may be a strided slice
    if chunk_size is None:
        chunk = auto_chunk_size(x2d.shape[0], vocab, x.shape[-1])
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size={chunk_size!r} must be a positive int or None")
    else:
        chunk = chunk_size
    use_triton = resolve_backend(backend, x, op=_OP) == "triton"
    # The chunk loop manages its own precision (fp32 logits, out= matmuls): keep autocast out.
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = _LinearCrossEntropy.apply(
            x2d, weight, flat_targets, chunk, ignore_index, reduction, use_triton
        )
    return out.view(targets.shape) if reduction == "none" else out
