"""Clustered and improved clustered attention (Vyas, Katharopoulos & Fleuret, 2020).

Queries are hashed with random hyperplanes, grouped by Hamming k-means, and softmax attention
is computed once per cluster centroid (the mean of its queries): O(N·C·D) instead of O(N²·D).
Improved clustered attention then gives each query its exact softmax over the centroid's top-k
keys, scaled by the centroid's mass on them; the other keys keep the centroid's weights.

A causal variant (for language models, not in the paper) renormalizes the centroid's weights
over the keys each query may see. The centroid row prefix sums are exactly causal linear
attention with one-hot query features, so it reuses the chunked ``causal_linear`` kernel.
Caveat: cluster membership and centroids are computed from all queries of the sequence, so
the weights (never the values) at position i depend on later queries.

On CUDA the Hamming k-means assignment and the exact top-k products run as Triton kernels
(``ops.clustering``, ``ops.gathered_attention``); on CPU as batched torch matmuls and gathers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from verger.fast_attention._checks import check_padding_mask, check_positive_int, check_qkv
from verger.fast_attention.feature_maps import compute_dtype
from verger.fast_attention.ops.causal_linear import causal_linear
from verger.fast_attention.ops.clustering import hamming_kmeans, hash_codes
from verger.fast_attention.ops.gathered_attention import gathered_attention

__all__ = ["cluster_queries", "clustered_attention", "clustered_attention_from_clusters"]


def _query_validity(
    mask: torch.Tensor | None, b: int, h: int, nq: int, nk: int
) -> torch.Tensor | None:
    if mask is None or nq != nk:
        return None
    return (~mask)[:, None, :].expand(b, h, nq).reshape(b * h, nq)


def cluster_queries(
    q: torch.Tensor,
    *,
    n_clusters: int,
    bits: int = 63,
    iterations: int = 10,
    key_padding_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Hash (B, H, N, D) queries and cluster them: (assignments (B, H, N), clusters used).

    More clusters than valid queries is allowed: the count is clamped to the sequence length
    (every query may then have its own cluster). Padded queries (``key_padding_mask`` True, same
    length as q) neither vote in k-means nor seed the initial centroids.
    """
    check_positive_int("n_clusters", n_clusters)
    check_positive_int("bits", bits)
    check_positive_int("iterations", iterations)
    b, h, n, d = q.shape
    if n == 0:
        return torch.zeros(b, h, 0, dtype=torch.long, device=q.device), 0
    clusters = min(n_clusters, n)
    valid = _query_validity(key_padding_mask, b, h, n, n)
    codes = hash_codes(q.reshape(b * h, n, d), bits, valid=valid, generator=generator)
    assign, _ = hamming_kmeans(codes, clusters, iterations, valid=valid)
    return assign.view(b, h, n), clusters


def _centroids(
    q3: torch.Tensor, assign: torch.Tensor, clusters: int, valid: torch.Tensor | None
) -> torch.Tensor:
    w = torch.ones_like(q3[..., :1]) if valid is None else valid[..., None].to(q3.dtype)
    counts = torch.zeros(q3.shape[0], clusters, 1, dtype=q3.dtype, device=q3.device)
    counts.scatter_add_(1, assign[..., None], w)
    sums = torch.zeros(q3.shape[0], clusters, q3.shape[-1], dtype=q3.dtype, device=q3.device)
    sums = sums.scatter_add(1, assign[..., None].expand_as(q3), q3 * w)
    return sums / counts.clamp_min(1.0)


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (G, M, D), idx (G, ...) -> t[g, idx[g, ...]] of shape (G, ..., D).

    Whole-row ``index_select`` on the flattened (G·M, D) tensor: a row copy per index, far
    faster on CPU than ``gather`` with an index expanded over D.
    """
    g, m, d = t.shape
    offsets = torch.arange(g, device=idx.device).view(g, *([1] * (idx.dim() - 1))) * m
    flat = (idx + offsets).reshape(-1)
    return t.reshape(g * m, d).index_select(0, flat).view(*idx.shape, d)


def _flat_rows(idx: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    """Indices into group g's rows (G, ...) as rows of the flattened (G·M, ·) tensor."""
    offsets = torch.arange(idx.shape[0], device=idx.device) * rows_per_group
    return idx + offsets.view(-1, *([1] * (idx.dim() - 1)))


def clustered_attention_from_clusters(
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
    """The attention products for given assignments (B, H, Nq) in [0, n_clusters)."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    g = b * h
    dtype = compute_dtype(q.dtype)
    scale = d**-0.5 if scale is None else float(scale)
    q3 = q.reshape(g, nq, d).to(dtype)
    k3 = k.reshape(g, nk, d).to(dtype)
    v3 = v.reshape(g, nk, dv).to(dtype)
    a3 = assign.reshape(g, nq)
    pad = None
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, :].expand(b, h, nk).reshape(g, nk)
    qc = _centroids(q3, a3, n_clusters, _query_validity(key_padding_mask, b, h, nq, nk))
    logits = torch.bmm(qc, k3.mT) * scale  # (G, C, Nk)
    if pad is not None:
        logits = logits.masked_fill(pad[:, None, :], float("-inf"))
    kk = None if topk is None else min(topk, nk)
    if causal:
        out = _causal_products(q3, k3, v3, a3, logits, kk, pad, scale)
    else:
        out = _products(q3, k3, v3, a3, logits, kk, pad, scale)
    out = out.view(b, h, nq, dv)
    if key_padding_mask is not None and nq == nk:
        out = out.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return out.to(v.dtype)


def _block_layout(a3: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Group queries by cluster into fixed-width blocks (a cluster spans ⌈size/W⌉ blocks).

    Returns each query's row in the flat (G·B·W) block layout, the cluster of every block
    (G, B), and the width W. Padding is at most W − 1 rows per cluster, however unbalanced
    the clusters are, so the exact top-k part becomes dense (G·B, W, k) matmuls.
    """
    g, n = a3.shape
    width = max(1, min(64, -(-n // clusters)))
    counts = torch.zeros(g, clusters, dtype=torch.long, device=a3.device)
    counts.scatter_add_(1, a3, torch.ones_like(a3))
    n_blocks = (counts + width - 1) // width
    block_end = n_blocks.cumsum(1)
    total = int(block_end[:, -1].max())
    order = torch.argsort(a3, dim=1, stable=True)
    starts = counts.cumsum(1) - counts
    sorted_clusters = a3.gather(1, order)
    rank_sorted = torch.arange(n, device=a3.device) - starts.gather(1, sorted_clusters)
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
    block = (block_end - n_blocks).gather(1, a3) + rank // width
    base = torch.arange(g, device=a3.device)[:, None] * total
    rows = ((base + block) * width + rank % width).reshape(-1)
    ids = torch.arange(total, device=a3.device).expand(g, total).contiguous()
    block_cluster = torch.searchsorted(block_end, ids, right=True).clamp_max(clusters - 1)
    return rows, block_cluster, width


def _topk_exact_blocked(q3, k3, v3, a3, top_idx, key_ok, scale, causal=False):  # type: ignore[no-untyped-def]
    """Exact softmax of each query over its cluster's top-k keys, computed block by block.

    Each query row is copied once into its cluster's block, and every block attends to its
    cluster's keys (``gathered_attention``: Triton on CUDA, gathered copies + bmm on CPU)
    instead of copying k key and value rows per query. ``causal``: query i only uses the
    keys j <= i among them (a query that may use none gets zeros).
    """
    g, n, d = q3.shape
    clusters, kk = top_idx.shape[1], top_idx.shape[2]
    rows, block_cluster, width = _block_layout(a3, clusters)
    nb = block_cluster.shape[1]
    per_block = block_cluster[..., None].expand(g, nb, kk)
    key_rows = _flat_rows(top_idx.gather(1, per_block), k3.shape[1]).reshape(g * nb, kk)
    ok = None if key_ok is None else key_ok.gather(1, per_block).reshape(g * nb, kk)
    q_blk = q3.new_zeros(g * nb * width, d).index_copy(0, rows, q3.reshape(g * n, d))
    query_pos = key_pos = None
    if causal:  # padding rows of the blocks get position -1: no key, zero output
        pos = torch.arange(n, device=q3.device).repeat(g)
        query_pos = torch.full((g * nb * width,), -1, device=q3.device, dtype=torch.long)
        query_pos = query_pos.index_copy(0, rows, pos).view(g * nb, width)
        key_pos = top_idx.gather(1, per_block).reshape(g * nb, kk)
    out = gathered_attention(
        q_blk.view(g * nb, width, d), k3.reshape(-1, d), v3.reshape(-1, v3.shape[-1]),
        key_rows, ok, scale=scale, query_pos=query_pos, key_pos=key_pos,
    )  # fmt: skip
    return out.reshape(g * nb * width, -1).index_select(0, rows).view(g, n, -1)


def _products(q3, k3, v3, a3, logits, kk, pad, scale):  # type: ignore[no-untyped-def]
    attn = torch.softmax(logits, -1)
    vc = torch.bmm(attn, v3)  # (G, C, Dv): the clustered attention value of each centroid
    if kk is None:
        return _rows(vc, a3)
    top_w, top_idx = attn.topk(kk, -1)  # (G, C, kk)
    mass = top_w.sum(-1, keepdim=True)
    v_rest = vc - torch.einsum("gck,gckd->gcd", top_w, _rows(v3, top_idx))
    key_ok = None if pad is None else ~_rows(pad[..., None], top_idx).squeeze(-1)
    exact = _topk_exact_blocked(q3, k3, v3, a3, top_idx, key_ok, scale)
    return _rows(mass, a3) * exact + _rows(v_rest, a3)


def _causal_products(q3, k3, v3, a3, logits, kk, pad, scale):  # type: ignore[no-untyped-def]
    nq = q3.shape[1]
    clusters = logits.shape[1]
    # e[c, j] = exp(logit - max_c): a per-cluster constant, which cancels in every ratio below
    e = torch.exp(logits - logits.amax(-1, keepdim=True).detach().clamp_min(-1e30))
    onehot = F.one_hot(a3, clusters).to(q3.dtype)
    base = causal_linear(onehot, e.mT.contiguous(), v3, eps=1e-30)
    if kk is None:
        return base
    z = e.cumsum(-1).gather(1, a3[:, None, :]).squeeze(1)  # Σ_{j≤i} e[c_i, j]
    _, top_idx = logits.topk(kk, -1)
    idx = _rows(top_idx, a3)  # (G, Nq, kk)
    pos = torch.arange(nq, device=q3.device)
    allowed = idx <= pos[None, :, None]
    if pad is not None:
        allowed &= ~pad.gather(1, idx.flatten(1)).view_as(idx)
    flat = (a3[..., None] * e.shape[-1] + idx).flatten(1)
    e_top = e.flatten(1).gather(1, flat).view_as(idx) * allowed
    inv_z = 1.0 / (z + 1e-30)
    removed = torch.einsum("gnk,gnkd->gnd", e_top, _rows(v3, idx)) * inv_z[..., None]
    mass = (e_top.sum(-1) * inv_z)[..., None]
    key_ok = None if pad is None else ~pad.gather(1, top_idx.flatten(1)).view_as(top_idx)
    exact = _topk_exact_blocked(q3, k3, v3, a3, top_idx, key_ok, scale, causal=True)
    return base - removed + mass * exact


def clustered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    n_clusters: int,
    bits: int = 63,
    iterations: int = 10,
    topk: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Clustered (``topk=None``) or improved clustered (``topk=int``) softmax attention.

    Tensors are (batch, heads, seq, dim); returns v's shape and dtype. ``n_clusters`` larger
    than the number of queries is clamped to it, ``topk`` larger than the number of keys to
    it. ``key_padding_mask``: bool (batch, seq_k), True at padding; padded keys get zero weight,
    outputs at padded query positions are zero (self-attention), and every sequence needs at
    least one real key. ``generator`` makes the hash planes reproducible. Gradients flow to q
    (through the centroids and the exact top-k scores), k and v; the clustering is discrete.
    """
    check_qkv(q, k, v, same_length=causal)
    check_positive_int("n_clusters", n_clusters)
    if topk is not None:
        check_positive_int("topk", topk)
    mask = check_padding_mask(key_padding_mask, k.shape[0], k.shape[2])
    if k.shape[2] == 0:
        raise ValueError("clustered_attention needs at least one key (seq_k = 0)")
    if mask is not None and bool(mask.all(-1).any()):
        raise ValueError("key_padding_mask masks every key of some sequence; nothing to attend")
    qmask = mask if q.shape[2] == k.shape[2] else None
    assign, clusters = cluster_queries(
        q,
        n_clusters=n_clusters,
        bits=bits,
        iterations=iterations,
        key_padding_mask=qmask,
        generator=generator,
    )
    if clusters == 0:
        return v.new_zeros(*q.shape[:3], v.shape[-1])
    return clustered_attention_from_clusters(
        q, k, v, assign, clusters, topk=topk, key_padding_mask=mask, causal=causal, scale=scale
    )
