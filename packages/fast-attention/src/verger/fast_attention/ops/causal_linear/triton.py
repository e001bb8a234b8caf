"""Chunk-parallel Triton kernels for the causal product (forward and, reused three times, backward).

``out_i = Σ_{j≤i} (a_i·b_j) c_j`` (``j≥i`` when reversed) in three steps, each parallel over
(batch·head, chunk, blocks) so that even batch 1 fills the GPU:

1. ``_chunk_state_kernel``: every chunk's local state ``H_c = B_cᵀ C_c`` (Dk, Dv) in fp32;
2. an exclusive prefix sum of the states over chunks (``torch.cumsum``; O(N/T·Dk·Dv) memory,
   still linear in N, and no per-position state);
3. ``_chunk_output_kernel``: every chunk's output ``A_c S_c + mask(A_c B_cᵀ) C_c``.

16-bit inputs feed the tensor cores with fp32 accumulation for the intra-chunk products; the
inter-chunk product ``A_c S_c`` always reads the fp32 state (a 16-bit copy would overflow at
long lengths and bias the result), with ``state_precision`` dots.
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
PRECISIONS = ("ieee", "tf32x3", "tf32")

if HAS_TRITON:

    @triton.jit
    def _chunk_state_kernel(
        b_ptr,
        c_ptr,
        h_ptr,
        n,
        dk,
        dv,
        n_chunks,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_kv = tl.program_id(0)
        chunk = tl.program_id(1)
        pid_bh = tl.program_id(2)
        n_vblocks = tl.cdiv(dv, BV)
        offs_k = (pid_kv // n_vblocks) * BK + tl.arange(0, BK)
        offs_v = (pid_kv % n_vblocks) * BV + tl.arange(0, BV)
        rows = chunk * BT + tl.arange(0, BT)
        mask_t = rows < n
        mask_k = offs_k < dk
        mask_v = offs_v < dv
        # B_cᵀ is loaded directly as a (BK, BT) tile.
        bt = tl.load(
            b_ptr + pid_bh * n * dk + rows[None, :] * dk + offs_k[:, None],
            mask=mask_k[:, None] & mask_t[None, :],
            other=0.0,
        )
        c = tl.load(
            c_ptr + pid_bh * n * dv + rows[:, None] * dv + offs_v[None, :],
            mask=mask_t[:, None] & mask_v[None, :],
            other=0.0,
        )
        h = tl.dot(bt, c, input_precision=PRECISION)
        h_base = h_ptr + (pid_bh * n_chunks + chunk) * dk * dv
        tl.store(
            h_base + offs_k[:, None] * dv + offs_v[None, :],
            h,
            mask=mask_k[:, None] & mask_v[None, :],
        )

    @triton.jit
    def _chunk_output_kernel(
        a_ptr,
        b_ptr,
        c_ptr,
        s_ptr,
        out_ptr,
        n,
        dk,
        dv,
        n_chunks,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        REVERSE: tl.constexpr,
        PRECISION: tl.constexpr,
        STATE_PRECISION: tl.constexpr,
    ):
        pid_v = tl.program_id(0)
        chunk = tl.program_id(1)
        pid_bh = tl.program_id(2)
        offs_t = tl.arange(0, BT)
        offs_k = tl.arange(0, BK)
        offs_v = pid_v * BV + tl.arange(0, BV)
        rows = chunk * BT + offs_t
        mask_t = rows < n
        mask_k = offs_k < dk
        mask_v = offs_v < dv
        mk = mask_t[:, None] & mask_k[None, :]
        mv = mask_t[:, None] & mask_v[None, :]
        a = tl.load(
            a_ptr + pid_bh * n * dk + rows[:, None] * dk + offs_k[None, :], mask=mk, other=0.0
        )
        b = tl.load(
            b_ptr + pid_bh * n * dk + rows[:, None] * dk + offs_k[None, :], mask=mk, other=0.0
        )
        c = tl.load(
            c_ptr + pid_bh * n * dv + rows[:, None] * dv + offs_v[None, :], mask=mv, other=0.0
        )
        s = tl.load(
            s_ptr + (pid_bh * n_chunks + chunk) * dk * dv + offs_k[:, None] * dv + offs_v[None, :],
            mask=mask_k[:, None] & mask_v[None, :],
            other=0.0,
        )
        if REVERSE:  # noqa: SIM108 (constexpr branches)
            keep = offs_t[:, None] <= offs_t[None, :]
        else:
            keep = offs_t[:, None] >= offs_t[None, :]
        scores = tl.dot(a, tl.trans(b), input_precision=PRECISION)
        scores = tl.where(keep, scores, 0.0)
        out = tl.dot(scores.to(c.dtype), c, input_precision=PRECISION)
        out += tl.dot(a.to(tl.float32), s, input_precision=STATE_PRECISION)
        tl.store(out_ptr + pid_bh * n * dv + rows[:, None] * dv + offs_v[None, :], out, mask=mv)


def _next_pow2(x: int) -> int:
    return 1 << (max(x, 1) - 1).bit_length()


def _exclusive_scan(h: torch.Tensor, reverse: bool) -> torch.Tensor:
    """State before each chunk: Σ of the chunk states strictly before it (after it if reversed)."""
    s = torch.zeros_like(h)
    if h.shape[1] > 1:
        if reverse:
            s[:, :-1] = h[:, 1:].flip(1).cumsum(1).flip(1)
        else:
            s[:, 1:] = h[:, :-1].cumsum(1)
    return s


@torch.compiler.disable
def causal_product_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    reverse: bool = False,
    chunk_size: int = 64,
    precision: str | None = None,
    state_precision: str | None = None,
) -> torch.Tensor:
    """Triton version of ``causal_product_chunked``; returns float32 (..., N, Dv).

    ``precision`` sets the fp32 dots (fp32 inputs; ignored for 16-bit inputs, which use the
    tensor cores): ``ieee`` (default, matches the reference to 1e-5), ``tf32x3`` (tensor cores,
    near fp32) or ``tf32`` (~1e-3, truncating). ``state_precision`` (inter-chunk product on the
    fp32 state) defaults to ``ieee`` for fp32 inputs and ``tf32x3`` for 16-bit inputs.
    """
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    for name, value in (("precision", precision), ("state_precision", state_precision)):
        if value is not None and value not in PRECISIONS:
            raise ValueError(f"{name}={value!r} is not one of {PRECISIONS}")
    *batch, n, dk = a.shape
    dv = c.shape[-1]
    if dk > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(f"the triton kernel supports head dims <= {MAX_HEAD_DIM}, got {dk}/{dv}")
    low = a.dtype in (torch.float16, torch.bfloat16)
    dtype = a.dtype if low else torch.float32
    a3, b3, c3 = (t.to(dtype).reshape(-1, n, t.shape[-1]).contiguous() for t in (a, b, c))
    bh = a3.shape[0]
    out = torch.empty(bh, n, dv, device=a.device, dtype=torch.float32)
    if n == 0 or bh == 0:
        return out.view(*batch, n, dv)
    prec = "tf32" if low else (precision or "ieee")  # 16-bit dots: the setting is unused
    state_prec = state_precision or ("tf32x3" if low else prec)
    bt = max(16, min(_next_pow2(chunk_size), 128))
    bk = max(16, _next_pow2(dk))
    bv = max(16, min(_next_pow2(dv), 64))
    bk_state = min(bk, 64)
    n_chunks = triton.cdiv(n, bt)
    h = torch.empty(bh, n_chunks, dk, dv, device=a.device, dtype=torch.float32)
    grid1 = (triton.cdiv(dk, bk_state) * triton.cdiv(dv, bv), n_chunks, bh)
    _chunk_state_kernel[grid1](
        b3, c3, h, n, dk, dv, n_chunks, BT=bt, BK=bk_state, BV=bv, PRECISION=prec
    )
    s = _exclusive_scan(h, reverse)
    del h
    grid2 = (triton.cdiv(dv, bv), n_chunks, bh)
    _chunk_output_kernel[grid2](
        a3,
        b3,
        c3,
        s,
        out,
        n,
        dk,
        dv,
        n_chunks,
        BT=bt,
        BK=bk,
        BV=bv,
        REVERSE=reverse,
        PRECISION=prec,
        STATE_PRECISION=state_prec,
    )
    return out.view(*batch, n, dv)
