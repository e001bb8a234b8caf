"""Triton kernels of the weighted sum: one pass over the experts per block of elements.

Forward: each program owns ``BLOCK`` elements of the flattened tensor, loads ``base`` once and
accumulates ``alpha_j * experts[j]`` over the n experts in fp32 registers, then stores once.
Backward: the same tiling writes ``d experts[j] = alpha_j * grad`` and a per-program partial
dot product ``sum(experts[j] * grad)`` for ``d alpha_j``; the partials are summed in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _weighted_sum_fwd_kernel(BASE, EXPERTS, ALPHA, OUT, P, N_EXPERTS, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    acc = tl.load(BASE + offs, mask=mask, other=0.0).to(tl.float32)
    for j in range(0, N_EXPERTS):
        a = tl.load(ALPHA + j).to(tl.float32)
        e = tl.load(EXPERTS + j * P + offs, mask=mask, other=0.0).to(tl.float32)
        acc += a * e
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _weighted_sum_bwd_kernel(
    GRAD, EXPERTS, ALPHA, D_EXPERTS, D_ALPHA_PARTIAL, P, N_EXPERTS, N_BLOCKS, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    g = tl.load(GRAD + offs, mask=mask, other=0.0).to(tl.float32)
    for j in range(0, N_EXPERTS):
        a = tl.load(ALPHA + j).to(tl.float32)
        e = tl.load(EXPERTS + j * P + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(D_EXPERTS + j * P + offs, (a * g).to(D_EXPERTS.dtype.element_ty), mask=mask)
        tl.store(D_ALPHA_PARTIAL + j * N_BLOCKS + pid, tl.sum(e * g, axis=0))


def weighted_sum_fwd(
    base: torch.Tensor, experts: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """``base + alpha @ experts`` for contiguous tensors (flattened views)."""
    out = torch.empty_like(base)
    numel = base.numel()
    grid = (triton.cdiv(numel, BLOCK),)
    _weighted_sum_fwd_kernel[grid](
        base, experts, alpha, out, numel, experts.shape[0], BLOCK=BLOCK, num_warps=4
    )
    return out


def weighted_sum_bwd(
    grad: torch.Tensor, experts: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d experts, d alpha)`` for an upstream ``grad`` shaped like the output."""
    numel = grad.numel()
    n_blocks = triton.cdiv(numel, BLOCK)
    d_experts = torch.empty_like(experts)
    partial = torch.empty(experts.shape[0], n_blocks, device=grad.device, dtype=torch.float32)
    _weighted_sum_bwd_kernel[(n_blocks,)](
        grad, experts, alpha, d_experts, partial, numel, experts.shape[0], n_blocks,
        BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip
    return d_experts, partial.sum(1).to(alpha.dtype)
