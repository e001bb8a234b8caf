"""Triton kernels for softmax attention of query blocks over gathered keys (forward, backward).

One program per (block, query sub-block): the block's key and value rows are gathered straight
from the (M, D) / (M, Dv) tensors by index, 32 keys at a time (no gathered copy in memory),
with an online softmax as in flash attention, and the forward saves the row log-sum-exp. The
backward recomputes the probabilities per key block, accumulates dq, and adds dk / dv into the
gathered rows with atomics (blocks share keys, so the order of those adds is not fixed).
"""

from __future__ import annotations

import torch

from verger.core.kernels import next_power_of_2, require_triton

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional at import
    HAS_TRITON = False

MAX_KEYS = 4096  # loops over key blocks: registers do not grow with K
MAX_DIM = 256

if HAS_TRITON:

    @triton.jit
    def _key_block(
        k_ptr, rows_ptr, ok_ptr, blk, j0, n_keys, dim,
        BKB: tl.constexpr, BD: tl.constexpr, HAS_MASK: tl.constexpr,
    ):  # fmt: skip
        """Rows, keep mask and gathered (BKB, BD) key tile of one block of the block's keys."""
        offs_j = j0 + tl.arange(0, BKB)
        offs_d = tl.arange(0, BD)
        mask_j = offs_j < n_keys
        idx = tl.load(rows_ptr + blk * n_keys + offs_j, mask=mask_j, other=0).to(tl.int64)
        keep = mask_j
        if HAS_MASK:
            keep = keep & (tl.load(ok_ptr + blk * n_keys + offs_j, mask=mask_j, other=0) != 0)
        k = tl.load(
            k_ptr + idx[:, None] * dim + offs_d[None, :],
            mask=keep[:, None] & (offs_d < dim)[None, :],
            other=0.0,
        )
        return idx, keep, k, offs_j

    @triton.jit
    def _allowed(kpos_ptr, blk, offs_j, n_keys, keep, qpos, CAUSAL: tl.constexpr):
        """(BW, BKB) mask: allowed keys, and with ``CAUSAL`` only those at or before the query."""
        if CAUSAL:
            kpos = tl.load(kpos_ptr + blk * n_keys + offs_j, mask=offs_j < n_keys, other=0)
            return keep[None, :] & (kpos[None, :] <= qpos[:, None])
        return keep[None, :] & (qpos[:, None] >= 0)

    @triton.jit
    def _gathered_fwd_kernel(
        q_ptr, k_ptr, v_ptr, rows_ptr, ok_ptr, qpos_ptr, kpos_ptr, out_ptr, lse_ptr,
        n_w, n_keys, dim, dim_v, scale,
        BW: tl.constexpr, BKB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
        HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Online softmax over blocks of ``BKB`` gathered keys (registers bounded in K)."""
        blk = tl.program_id(0).to(tl.int64)
        offs_w = tl.program_id(1) * BW + tl.arange(0, BW)
        offs_d = tl.arange(0, BD)
        offs_v = tl.arange(0, BDV)
        mask_w = offs_w < n_w
        rows = blk * n_w + offs_w
        qpos = tl.load(qpos_ptr + rows, mask=mask_w, other=-1) if CAUSAL else rows
        q = tl.load(
            q_ptr + rows[:, None] * dim + offs_d[None, :],
            mask=mask_w[:, None] & (offs_d < dim)[None, :],
            other=0.0,
        )
        m = tl.full([BW], -1e30, dtype=tl.float32)  # finite: fully masked key blocks add 0
        total = tl.zeros([BW], dtype=tl.float32)
        acc = tl.zeros([BW, BDV], dtype=tl.float32)
        for j0 in range(0, n_keys, BKB):
            idx, keep, k, offs_j = _key_block(
                k_ptr, rows_ptr, ok_ptr, blk, j0, n_keys, dim, BKB, BD, HAS_MASK
            )
            live = _allowed(kpos_ptr, blk, offs_j, n_keys, keep, qpos, CAUSAL)
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            logits = tl.where(live, logits, float("-inf"))
            m_new = tl.maximum(m, tl.max(logits, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(logits - m_new[:, None])
            v = tl.load(
                v_ptr + idx[:, None] * dim_v + offs_v[None, :],
                mask=keep[:, None] & (offs_v < dim_v)[None, :],
                other=0.0,
            )
            total = total * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        has_key = total > 0  # a row with no allowed key gets zeros, not 0/0
        tl.store(
            out_ptr + rows[:, None] * dim_v + offs_v[None, :],
            acc / tl.where(has_key, total, 1.0)[:, None],
            mask=mask_w[:, None] & (offs_v < dim_v)[None, :],
        )
        tl.store(lse_ptr + rows, m + tl.log(tl.where(has_key, total, 1.0)), mask=mask_w)

    @triton.jit
    def _gathered_bwd_kernel(
        q_ptr, k_ptr, v_ptr, rows_ptr, ok_ptr, qpos_ptr, kpos_ptr, out_ptr, lse_ptr, do_ptr,
        dq_ptr, dk_ptr, dv_ptr, n_w, n_keys, dim, dim_v, scale,
        BW: tl.constexpr, BKB: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
        HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Per block of gathered keys: recompute p from the saved lse, accumulate dq, and add
        dk / dv into the gathered rows with atomics (other blocks share those keys)."""
        blk = tl.program_id(0).to(tl.int64)
        offs_w = tl.program_id(1) * BW + tl.arange(0, BW)
        offs_d = tl.arange(0, BD)
        offs_v = tl.arange(0, BDV)
        mask_w = offs_w < n_w
        mask_d = offs_d < dim
        mask_v = offs_v < dim_v
        rows = blk * n_w + offs_w
        qpos = tl.load(qpos_ptr + rows, mask=mask_w, other=-1) if CAUSAL else rows
        mq = mask_w[:, None] & mask_d[None, :]
        mv = mask_w[:, None] & mask_v[None, :]
        q = tl.load(q_ptr + rows[:, None] * dim + offs_d[None, :], mask=mq, other=0.0)
        do = tl.load(do_ptr + rows[:, None] * dim_v + offs_v[None, :], mask=mv, other=0.0)
        out = tl.load(out_ptr + rows[:, None] * dim_v + offs_v[None, :], mask=mv, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=mask_w, other=0.0)
        delta = tl.sum(do.to(tl.float32) * out, axis=1)
        dq = tl.zeros([BW, BD], dtype=tl.float32)
        for j0 in range(0, n_keys, BKB):
            idx, keep, k, offs_j = _key_block(
                k_ptr, rows_ptr, ok_ptr, blk, j0, n_keys, dim, BKB, BD, HAS_MASK
            )
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            live = _allowed(kpos_ptr, blk, offs_j, n_keys, keep, qpos, CAUSAL) & mask_w[:, None]
            p = tl.exp(tl.where(live, logits - lse[:, None], float("-inf")))
            v = tl.load(
                v_ptr + idx[:, None] * dim_v + offs_v[None, :],
                mask=keep[:, None] & mask_v[None, :],
                other=0.0,
            )
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None]) * scale
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
            dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            tl.atomic_add(
                dk_ptr + idx[:, None] * dim + offs_d[None, :],
                dk,
                mask=keep[:, None] & mask_d[None, :],
            )
            tl.atomic_add(
                dv_ptr + idx[:, None] * dim_v + offs_v[None, :],
                dv,
                mask=keep[:, None] & mask_v[None, :],
            )
        tl.store(dq_ptr + rows[:, None] * dim + offs_d[None, :], dq, mask=mq)


def launch_meta(
    n_w: int,
    dim: int,
    dim_v: int,
    dtype: torch.dtype,
    has_mask: bool,
    *,
    backward: bool,
    causal: bool = False,
) -> dict[str, object]:
    """Compile-time arguments and ``num_warps`` of one kernel (the resource tests use these).

    Keys are processed in blocks of 32 whatever K is; the query sub-block shrinks for wide
    heads and for the backward (which holds q, do, dq and the key tiles at once), so every
    tile stays in registers (tests/test_kernel_resources.py).
    """
    bd = max(16, next_power_of_2(dim))
    bdv = max(16, next_power_of_2(dim_v))
    widest = max(bd, bdv)
    fp32 = dtype == torch.float32  # 3xTF32 dots hold each operand twice
    cap = 16 if backward else (64 if widest <= 64 and not fp32 else (32 if widest <= 128 else 16))
    bw = max(16, min(next_power_of_2(n_w), cap))
    precision = "tf32x3" if fp32 else "tf32"
    return {"BW": bw, "BKB": 32 if widest <= 128 else 16, "BD": bd, "BDV": bdv, "HAS_MASK": has_mask,
            "CAUSAL": causal, "PRECISION": precision, "num_warps": 8 if backward or causal or widest > 64 else 4}  # fmt: skip


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_rows: torch.Tensor) -> None:
    require_triton(q.device, op="gathered_attention")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"backend='triton' supports float32/float16/bfloat16, not {q.dtype}")
    if key_rows.shape[-1] > MAX_KEYS or max(q.shape[-1], v.shape[-1]) > MAX_DIM:
        raise ValueError(
            f"the triton kernel supports <= {MAX_KEYS} keys per block and head dims <= "
            f"{MAX_DIM}; got {key_rows.shape[-1]} keys, dims {q.shape[-1]}/{v.shape[-1]}"
        )


def _operands(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_rows: torch.Tensor,
    key_ok: torch.Tensor | None,
    positions: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[list[torch.Tensor], tuple[int, int, int, int, int]]:
    """Contiguous kernel operands ``[q, k, v, rows, ok, qpos, kpos]`` and (blocks, W, K, D, Dv);
    the mask and positions are placeholders (never read) when absent."""
    rows = key_rows.contiguous()
    ok = key_ok.to(torch.int8).contiguous() if key_ok is not None else rows
    qpos, kpos = (p.long().contiguous() for p in positions) if positions else (rows, rows)
    operands = [q.contiguous(), k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous(), rows, ok,
                qpos, kpos]  # fmt: skip
    n_blocks, n_w, dim = q.shape
    return operands, (n_blocks, n_w, rows.shape[-1], dim, v.shape[-1])


@torch.compiler.disable
def gathered_attention_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_rows: torch.Tensor,
    key_ok: torch.Tensor | None,
    scale: float,
    positions: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out (B, W, Dv) float32, lse (B, W) float32)``; ``positions`` is
    ``(query_pos (B, W), key_pos (B, K))`` for the causal mask."""
    _check(q, k, v, key_rows)
    operands, (n_blocks, n_w, n_keys, dim, dim_v) = _operands(q, k, v, key_rows, key_ok, positions)
    out = torch.empty(n_blocks, n_w, dim_v, device=q.device, dtype=torch.float32)
    lse = torch.empty(n_blocks, n_w, device=q.device, dtype=torch.float32)
    if n_blocks and n_w:
        meta = launch_meta(
            n_w, dim, dim_v, q.dtype, key_ok is not None, backward=False, causal=bool(positions)
        )
        _gathered_fwd_kernel[(n_blocks, triton.cdiv(n_w, meta["BW"]))](
            *operands, out, lse, n_w, n_keys, dim, dim_v, float(scale), **meta
        )
    return out, lse


@torch.compiler.disable
def gathered_attention_backward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_rows: torch.Tensor,
    key_ok: torch.Tensor | None,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    positions: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: float32 ``(dq (B, W, D), dk (M, D), dv (M, Dv))``."""
    operands, (n_blocks, n_w, n_keys, dim, dim_v) = _operands(q, k, v, key_rows, key_ok, positions)
    dq = torch.zeros(n_blocks, n_w, dim, device=q.device, dtype=torch.float32)
    dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
    if n_blocks and n_w:
        meta = launch_meta(
            n_w, dim, dim_v, q.dtype, key_ok is not None, backward=True, causal=bool(positions)
        )
        _gathered_bwd_kernel[(n_blocks, triton.cdiv(n_w, meta["BW"]))](
            *operands, out.contiguous(), lse, grad_out.to(q.dtype).contiguous(),
            dq, dk, dv, n_w, n_keys, dim, dim_v, float(scale), **meta,
        )  # fmt: skip
    return dq, dk, dv
