"""Triton kernel for the chunked causal product (forward and, reused three times, backward).

One program owns one (batch·head, value block) pair and walks the chunks in order (or in
reverse), keeping the running state ``S = Σ bᵀ c`` of shape (Dk, BV) in fp32 registers:
``out_chunk = a·S + tril(a bᵀ)·c``, then ``S += bᵀ c``. Nothing of size N×N or N×Dk×Dv is ever
written. 16-bit inputs feed the tensor cores with fp32 accumulation; fp32 inputs use IEEE fp32
dots so that results match the reference to 1e-5.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional at import
    HAS_TRITON = False

MAX_HEAD_DIM = 256

if HAS_TRITON:

    @triton.jit
    def _causal_product_kernel(
        a_ptr,
        b_ptr,
        c_ptr,
        out_ptr,
        n,
        dk,
        dv,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        REVERSE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_v = tl.program_id(0)
        pid_bh = tl.program_id(1)
        a_ptr += pid_bh * n * dk
        b_ptr += pid_bh * n * dk
        c_ptr += pid_bh * n * dv
        out_ptr += pid_bh * n * dv
        offs_t = tl.arange(0, BT)
        offs_k = tl.arange(0, BK)
        offs_v = pid_v * BV + tl.arange(0, BV)
        mask_k = offs_k < dk
        mask_v = offs_v < dv
        if REVERSE:  # noqa: SIM108 (constexpr branches)
            keep = offs_t[:, None] <= offs_t[None, :]
        else:
            keep = offs_t[:, None] >= offs_t[None, :]
        state = tl.zeros((BK, BV), dtype=tl.float32)
        n_chunks = tl.cdiv(n, BT)
        for step in range(0, n_chunks):
            if REVERSE:  # noqa: SIM108 (constexpr branches)
                chunk = n_chunks - 1 - step
            else:
                chunk = step
            rows = chunk * BT + offs_t
            mask_t = rows < n
            mk = mask_t[:, None] & mask_k[None, :]
            mv = mask_t[:, None] & mask_v[None, :]
            a = tl.load(a_ptr + rows[:, None] * dk + offs_k[None, :], mask=mk, other=0.0)
            b = tl.load(b_ptr + rows[:, None] * dk + offs_k[None, :], mask=mk, other=0.0)
            c = tl.load(c_ptr + rows[:, None] * dv + offs_v[None, :], mask=mv, other=0.0)
            scores = tl.dot(a, tl.trans(b), input_precision=PRECISION)
            scores = tl.where(keep, scores, 0.0)
            out = tl.dot(a, state.to(a.dtype), input_precision=PRECISION)
            out += tl.dot(scores.to(c.dtype), c, input_precision=PRECISION)
            tl.store(
                out_ptr + rows[:, None] * dv + offs_v[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=mv,
            )
            state += tl.dot(tl.trans(b), c, input_precision=PRECISION)


def _next_pow2(x: int) -> int:
    return 1 << (max(x, 1) - 1).bit_length()


@torch.compiler.disable
def causal_product_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    reverse: bool = False,
    chunk_size: int = 64,
    tf32: bool = False,
) -> torch.Tensor:
    """Triton version of ``causal_product_chunked``; returns float32 (..., N, Dv).

    fp32 inputs use IEEE fp32 dots unless ``tf32=True`` (tensor cores, ~1e-3 relative error).
    """
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    *batch, n, dk = a.shape
    dv = c.shape[-1]
    if dk > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(f"the triton kernel supports head dims <= {MAX_HEAD_DIM}, got {dk}/{dv}")
    dtype = a.dtype if a.dtype in (torch.float16, torch.bfloat16) else torch.float32
    a3, b3, c3 = (t.to(dtype).reshape(-1, n, t.shape[-1]).contiguous() for t in (a, b, c))
    out = torch.empty(a3.shape[0], n, dv, device=a.device, dtype=torch.float32)
    if n == 0 or a3.shape[0] == 0:
        return out.view(*batch, n, dv)
    bt = max(16, min(_next_pow2(chunk_size), 128))
    bk = max(16, _next_pow2(dk))
    bv = max(16, min(_next_pow2(dv), 64))
    grid = (triton.cdiv(dv, bv), a3.shape[0])
    _causal_product_kernel[grid](
        a3,
        b3,
        c3,
        out,
        n,
        dk,
        dv,
        BT=bt,
        BK=bk,
        BV=bv,
        REVERSE=reverse,
        PRECISION="ieee" if dtype == torch.float32 and not tf32 else "tf32",
    )
    return out.view(*batch, n, dv)
