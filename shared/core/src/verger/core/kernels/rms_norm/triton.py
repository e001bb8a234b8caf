"""RMSNorm Triton kernels: one row per program forward; row blocks with partial dW backward."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from verger.core.kernels._common import next_power_of_2, num_warps_for


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL, M, N, ROWS_PER_PROGRAM, BLOCK_N: tl.constexpr
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * ROWS_PER_PROGRAM
    n_rows = (tl.minimum(row_start + ROWS_PER_PROGRAM, M) - row_start).to(tl.int32)
    for i in range(0, n_rows):
        row = row_start + i
        offs = row * N + cols
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        # d/dx of x*rstd: the projection of g off xhat, scaled by rstd.
        dx = (g - xhat * (tl.sum(g * xhat, axis=0) / N)) * rstd
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


def bwd_num_warps_for(block: int) -> int:
    """Warps of the backward kernel, which needs ~9 registers per element a thread holds.

    At ``BLOCK_N=8192`` the 16 warps of :func:`num_warps_for` give each thread 16 elements
    under a 128-register cap (512 threads), and ptxas spills (sm_80: 128 regs, 132 B spill
    stores without 16-divisible N; 115-123 regs with it, little margin). 32 warps halve the
    elements per thread: ~64 regs, no spills on sm_80/sm_90.
    """
    return 32 if block >= 8192 else num_warps_for(block)


@torch.compiler.disable
def rms_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor, eps: float):
    """Forward on a contiguous [M, N] input: returns (y, rstd[M] fp32)."""
    m, n = x2d.shape
    y = torch.empty_like(x2d)
    rstd = torch.empty(m, device=x2d.device, dtype=torch.float32)
    if m:
        block = next_power_of_2(n)
        _rms_norm_fwd_kernel[(m,)](
            x2d, weight, y, rstd, n, eps, BLOCK_N=block, num_warps=num_warps_for(block)
        )
    return y, rstd


@torch.compiler.disable
def rms_norm_bwd(dy: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Backward: returns (dx like x, dweight fp32 [N])."""
    m, n = x2d.shape
    dx = torch.empty_like(x2d)
    if x2d.is_cuda:
        programs = min(m, 4 * torch.cuda.get_device_properties(x2d.device).multi_processor_count)
    else:
        programs = min(m, 4)
    programs = max(programs, 1)
    rows_per_program = -(-m // programs) if m else 1
    partial = torch.zeros(programs, n, device=x2d.device, dtype=torch.float32)
    if m:
        block = next_power_of_2(n)
        _rms_norm_bwd_kernel[(programs,)](
            dy, x2d, weight, rstd, dx, partial, m, n, rows_per_program,
            BLOCK_N=block, num_warps=bwd_num_warps_for(block),
        )  # fmt: skip
    return dx, partial.sum(0)
