"""Clustered and improved clustered attention (Vyas, Katharopoulos & Fleuret, 2020).

Queries are hashed with random hyperplanes, grouped by Hamming k-means, and softmax attention
is computed once per cluster centroid (the mean of its queries): O(N·C·D) instead of O(N²·D).
Improved clustered attention then gives each query its exact softmax over the centroid's top-k
keys, scaled by the centroid's mass on them; the other keys keep the centroid's weights.

Its centroids are means over the whole sequence, so it is not causal; decoders use
``causal_clustered_attention`` (centroids fixed before the sequence, see the causal_clustered
package).

On CUDA the Hamming k-means assignment and the exact top-k products run as Triton kernels
(``ops.clustering``, ``ops.gathered_attention``); on CPU as batched torch matmuls and gathers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verger.fast_attention._checks import check_padding_mask, check_positive_int, check_qkv
from verger.fast_attention.feature_maps import compute_dtype
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
    assign, _ = hamming_kmeans(codes, clusters, iterations, valid=valid, generator=generator)
    return assign.view(b, h, n), clusters


def _centroids(
    q3: torch.Tensor, assign: torch.Tensor, clusters: int, valid: torch.Tensor | None
) -> torch.Tensor:
    """Mean query (G, C, D) of each cluster over its valid members (zero for an empty one).

    Whole-row ``index_add`` over the flattened groups, padded queries sent to a spare row
    that is dropped: ~4x faster on CPU than a ``scatter_add`` whose index is expanded over D
    and than weighting the rows by the mask (PERFORMANCE.md)."""
    g, n, d = q3.shape
    flat = _flat_rows(assign, clusters).reshape(-1)
    if valid is not None:
        flat = torch.where(valid.reshape(-1), flat, g * clusters)
    sums = q3.new_zeros(g * clusters + 1, d).index_add(0, flat, q3.reshape(g * n, d))
    counts = q3.new_zeros(g * clusters + 1).index_add_(0, flat, q3.new_ones(g * n))
    return (sums[:-1] / counts[:-1].clamp_min(1.0)[:, None]).view(g, clusters, d)


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
    out = _products(q3, k3, v3, a3, logits, kk, pad, scale).view(b, h, nq, dv)
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


@dataclass
class QueryBlocks:
    """Queries grouped into blocks that share one key list (see ``query_blocks``)."""

    rows: torch.Tensor  # (G·N,) each query's row in the flat (G·B·W) block layout
    queries: torch.Tensor  # (G·B, W, D), zero rows where a group does not fill its block
    key_rows: torch.Tensor  # (G·B, K) rows of the flattened (G·n_keys, ·) key tensors
    key_ok: torch.Tensor | None  # (G·B, K) bool
    key_pos: torch.Tensor  # (G·B, K) key positions in the sequence
    group: torch.Tensor  # (G, B) the group of every block


def query_blocks(
    q3: torch.Tensor,
    a3: torch.Tensor,
    key_idx: torch.Tensor,
    key_ok: torch.Tensor | None,
    n_keys: int,
) -> QueryBlocks:
    """Queries (G, N, D) of each group ``a3`` (G, N) copied into blocks that share its keys.

    ``key_idx`` (G, groups, K): every group's key positions (< ``n_keys``); ``key_ok`` the
    matching bool mask or None.
    """
    g, n, d = q3.shape
    kk = key_idx.shape[2]
    rows, block_group, width = _block_layout(a3, key_idx.shape[1])
    nb = block_group.shape[1]
    per_block = block_group[..., None].expand(g, nb, kk)
    positions = key_idx.gather(1, per_block)
    key_rows = _flat_rows(positions, n_keys).reshape(g * nb, kk)
    ok = None if key_ok is None else key_ok.gather(1, per_block).reshape(g * nb, kk)
    q_blk = q3.new_zeros(g * nb * width, d).index_copy(0, rows, q3.reshape(g * n, d))
    return QueryBlocks(
        rows, q_blk.view(g * nb, width, d), key_rows, ok, positions.reshape(g * nb, kk),
        block_group,
    )  # fmt: skip


def _topk_exact_blocked(q3, k3, v3, a3, top_idx, key_ok, scale, causal=False):  # type: ignore[no-untyped-def]
    """Exact softmax of each query over its cluster's top-k keys, computed block by block.

    Each query row is copied once into its cluster's block, and every block attends to its
    cluster's keys (``gathered_attention``: Triton on CUDA, gathered copies + bmm on CPU)
    instead of copying k key and value rows per query. ``causal``: query i only uses the
    keys j <= i among them (a query that may use none gets zeros).
    """
    g, n, d = q3.shape
    blocks = query_blocks(q3, a3, top_idx, key_ok, k3.shape[1])
    q_blk = blocks.queries
    query_pos = None
    if causal:  # padding rows of the blocks get position -1: no key, zero output
        pos = torch.arange(n, device=q3.device).repeat(g)
        query_pos = torch.full((q_blk.shape[0] * q_blk.shape[1],), -1, device=q3.device)
        query_pos = query_pos.index_copy(0, blocks.rows, pos).view(q_blk.shape[:2])
    out = gathered_attention(
        q_blk, k3.reshape(-1, d), v3.reshape(-1, v3.shape[-1]), blocks.key_rows, blocks.key_ok,
        scale=scale, query_pos=query_pos, key_pos=blocks.key_pos if causal else None,
    )  # fmt: skip
    return out.reshape(-1, out.shape[-1]).index_select(0, blocks.rows).view(g, n, -1)


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
    scale: float | None = None,
    generator: torch.Generator | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Clustered (``topk=None``) or improved clustered (``topk=int``) softmax attention.

    Tensors are (batch, heads, seq, dim); returns v's shape and dtype. ``n_clusters`` larger
    than the number of queries is clamped to it, ``topk`` larger than the number of keys to
    it. ``key_padding_mask``: bool (batch, seq_k), True at padding; padded keys get zero weight,
    outputs at padded query positions are zero (self-attention), and every sequence needs at
    least one real key. ``generator`` makes the hash planes reproducible. Gradients flow to q
    (through the centroids and the exact top-k scores), k and v; the clustering is discrete.
    ``causal=True`` is refused: centroids of the whole sequence would let position i depend
    on later tokens; use ``causal_clustered_attention`` with fixed centroids instead.
    A non-finite query makes its cluster's centroid non-finite, and so every output of that
    cluster (softmax attention would spoil its row only).
    """
    if causal:
        raise ValueError(
            "clustered_attention is not causal (its centroids average all queries, later ones "
            "too); use causal_clustered_attention(q, k, v, centroids, topk=...) or "
            "ClusteredAttention(causal=True), which learns the centroids"
        )
    check_qkv(q, k, v, same_length=False)
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
        q, k, v, assign, clusters, topk=topk, key_padding_mask=mask, scale=scale
    )
