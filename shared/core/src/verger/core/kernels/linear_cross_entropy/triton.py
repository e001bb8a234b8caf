"""Triton kernel of the chunked linear + cross-entropy: loss and logit gradient, in place.

The matmuls stay with cuBLAS (torch); the kernel does the memory-bound part: per row, an
online logsumexp over the vocabulary, the loss ``lse - logit[target]``, and then overwrites
the fp32 logits chunk with ``softmax - onehot`` (zero for ignored rows), the gradient w.r.t.
the logits. The chunk is never copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from verger.core.kernels._common import next_power_of_2, num_warps_for


@triton.jit
def _ce_loss_grad_kernel(
    LOGITS, TARGETS, LOSS, V, ignore_index, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * V
    target = tl.load(TARGETS + row).to(tl.int64)
    ignored = target == ignore_index
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(ptr + cols, mask=cols < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    safe_target = tl.where(ignored, 0, target)
    z_target = tl.load(ptr + safe_target)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - z_target))
    if COMPUTE_GRAD:
        keep = tl.where(ignored, 0.0, 1.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(ptr + cols, mask=cols < V, other=0.0)
            g = tl.exp(z - lse) - tl.where(cols == safe_target, 1.0, 0.0)
            tl.store(ptr + cols, g * keep, mask=cols < V)


def block_v_for(v: int) -> int:
    """Vocabulary tile of the kernel: the whole row up to 4096 columns, then a loop."""
    return min(next_power_of_2(v), 4096)


@torch.compiler.disable
def ce_loss_grad_(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, compute_grad: bool
) -> torch.Tensor:
    """Per-row losses of a contiguous fp32 [C, V] chunk; with compute_grad, logits become dL/dz."""
    c, v = logits.shape
    loss = torch.empty(c, device=logits.device, dtype=torch.float32)
    if c:
        block = block_v_for(v)
        _ce_loss_grad_kernel[(c,)](
            logits, targets, loss, v, ignore_index,
            COMPUTE_GRAD=compute_grad, BLOCK_V=block, num_warps=num_warps_for(block),
        )  # fmt: skip
    return loss
