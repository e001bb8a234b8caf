"""Reference Hamming distance by popcount on packed integer codes (the spec for the matmul form)."""

from __future__ import annotations

import torch


def pack_bits(codes: torch.Tensor) -> torch.Tensor:
    """±1 codes (..., bits ≤ 63) to int64 integers, bit i set where code i is +1."""
    bits = codes.shape[-1]
    if bits > 63:
        raise ValueError(f"pack_bits supports at most 63 bits, got {bits}")
    weights = 2 ** torch.arange(bits, device=codes.device, dtype=torch.int64)
    return ((codes > 0).long() * weights).sum(-1)


def hamming_distance_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Popcount of ``a XOR b`` for int64 tensors (broadcasting), one bit at a time."""
    x = a ^ b
    count = torch.zeros_like(x)
    for i in range(63):
        count += (x >> i) & 1
    return count


def clustered_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    assign: torch.Tensor,
    n_clusters: int,
    *,
    topk: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense spec of (improved) clustered attention for given cluster assignments (B, H, Nq).

    Builds every query's full weight row over the keys in float64 with Python loops: the
    centroid (mean of the cluster's valid queries) softmax row; improved: its top-k keys are
    replaced by the query's exact softmax over them, scaled by the centroid's mass on them.
    Causal: query ``i`` renormalizes the centroid row over keys ``j ≤ i`` and keeps only the
    top-k keys ``j ≤ i``.
    """
    b, h, nq, d = q.shape
    nk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q64, k64, v64 = q.double(), k.double(), v.double()
    out = torch.zeros(b, h, nq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        pad = (
            torch.zeros(nk, dtype=torch.bool)
            if key_padding_mask is None
            else key_padding_mask[bi].cpu()
        )
        qvalid = ~pad if (nq == nk) else torch.ones(nq, dtype=torch.bool)
        for hi in range(h):
            for c in range(n_clusters):
                members = [i for i in range(nq) if int(assign[bi, hi, i]) == c and qvalid[i]]
                if not members:
                    continue
                qc = q64[bi, hi, members].mean(0)
                logits = (k64[bi, hi] @ qc) * scale
                logits = logits.masked_fill(pad, float("-inf"))
                top = None
                if topk is not None:
                    top = torch.topk(logits, min(topk, nk)).indices
                for i in members:
                    allowed = ~pad.clone()
                    if causal:
                        allowed[i + 1 :] = False
                    w = torch.softmax(logits.masked_fill(~allowed, float("-inf")), 0)
                    if top is not None:
                        sel = top[allowed[top]]
                        if len(sel):
                            mass = w[sel].sum()
                            exact = (k64[bi, hi, sel] @ q64[bi, hi, i]) * scale
                            w = w.clone()
                            w[sel] = mass * torch.softmax(exact, 0)
                    out[bi, hi, i] = w @ v64[bi, hi]
    return out
