"""The specification (and the CPU path): softmax attention of query blocks over gathered keys."""

from __future__ import annotations

import torch


def gathered_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_rows: torch.Tensor,
    key_ok: torch.Tensor | None,
    scale: float,
    query_pos: torch.Tensor | None = None,
    key_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[b] = softmax(q[b] k[key_rows[b]]ᵀ · scale, masked) v[key_rows[b]]``.

    ``q``: (B, W, D) blocks of queries; ``k``: (M, D) and ``v``: (M, Dv) key/value rows;
    ``key_rows``: (B, K) int64 rows of k/v each block attends to; ``key_ok``: (B, K) bool or
    None. With ``query_pos`` (B, W) and ``key_pos`` (B, K), query row w may use key j only
    if ``key_pos[b, j] <= query_pos[b, w]`` (causal). A row with no allowed key gets zeros.
    Returns (B, W, Dv) in q's dtype.
    """
    flat = key_rows.reshape(-1)
    k_sel = k.index_select(0, flat).view(*key_rows.shape, k.shape[-1])
    v_sel = v.index_select(0, flat).view(*key_rows.shape, v.shape[-1])
    logits = torch.bmm(q, k_sel.mT) * scale
    allowed = None if key_ok is None else key_ok[:, None, :]
    if query_pos is not None and key_pos is not None:
        causal = key_pos[:, None, :] <= query_pos[:, :, None]
        allowed = causal if allowed is None else allowed & causal
    if allowed is None:
        return torch.bmm(torch.softmax(logits, -1), v_sel)
    p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    p = torch.where(allowed.any(-1, keepdim=True), p, 0.0)  # all masked: zeros, not NaN
    return torch.bmm(p, v_sel)
