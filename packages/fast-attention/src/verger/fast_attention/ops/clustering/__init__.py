"""LSH hashing and Hamming k-means for clustered attention (pure torch on CPU and GPU).

Codes are ±1 float matrices, so the Hamming distance is ``(bits − a·b) / 2`` and one Lloyd step
is one batched matmul plus a scatter-add: this beats int64 popcount bit tricks on CPU (BLAS)
and on GPU (tensor cores), which is why there is no Triton kernel here.
"""

from __future__ import annotations

import torch

from verger.fast_attention.ops.clustering.reference import (
    hamming_distance_reference,
    pack_bits,
)

__all__ = ["hamming_distance_reference", "hamming_kmeans", "hash_codes", "pack_bits"]


def hash_codes(
    x: torch.Tensor,
    bits: int,
    *,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """±1 codes (G, N, bits) from random hyperplanes with offsets: ``sign(x W + b)``.

    ``x``: (G, N, D). The offsets are drawn at the scale of the projections (their RMS over
    the valid rows), so the planes cut through the data instead of passing by the origin.
    """
    g, n, d = x.shape
    planes = torch.randn(d, bits, generator=generator, dtype=torch.float32)
    offsets = torch.randn(bits, generator=generator, dtype=torch.float32)
    proj = x.detach().float() @ planes.to(x.device)
    w = torch.ones(g, n, 1, device=x.device) if valid is None else valid[..., None].float()
    scale = ((proj.square() * w).sum((1, 2)) / (w.sum((1, 2)) * bits).clamp_min(1.0)).sqrt()
    proj = proj + offsets.to(x.device) * scale[:, None, None]
    return (proj >= 0).float().mul_(2.0).sub_(1.0)


def _initial_centroids(codes: torch.Tensor, n_clusters: int, lengths: torch.Tensor) -> torch.Tensor:
    """Codes of queries spread evenly over each row's valid (leading) positions."""
    steps = torch.arange(n_clusters, device=codes.device, dtype=torch.float64)
    idx = (steps[None, :] * lengths[:, None].double() / n_clusters).floor().long()
    return codes.gather(1, idx[..., None].expand(-1, -1, codes.shape[-1]))


@torch.no_grad()
def hamming_kmeans(
    codes: torch.Tensor,
    n_clusters: int,
    iterations: int,
    *,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means in Hamming space: returns (assignments (G, N), centroids (G, C, bits)).

    Centroids are per-bit majority votes of their members (ties to +1); an empty cluster keeps
    its previous centroid. ``valid`` (G, N) bool restricts which rows vote (padding does not);
    rows must be left-aligned (valid positions first), as with right padding. Every row is
    still assigned to its nearest centroid. Stops early once the assignments are stable (a
    fixed point: further iterations would change nothing).
    """
    g, n, bits = codes.shape
    lengths = (
        torch.full((g,), n, device=codes.device) if valid is None else valid.sum(1).clamp_min(1)
    )
    centroids = _initial_centroids(codes, n_clusters, lengths)
    weights = codes if valid is None else codes * valid[..., None]
    # argmin Hamming distance == argmax of the ±1 inner product; the buffers are reused across
    # iterations because fresh large CPU allocations cost page faults comparable to the matmul
    scores = torch.bmm(codes, centroids.mT)
    assign = scores.argmax(-1)
    votes = torch.empty_like(centroids)
    counts = torch.empty(g, n_clusters, device=codes.device)
    ones = torch.ones(g, n, device=codes.device) if valid is None else valid.float()
    index = torch.empty(g, n, bits, dtype=torch.long, device=codes.device)
    for _ in range(max(iterations, 1)):
        index.copy_(assign[..., None].expand(-1, -1, bits))
        votes.zero_().scatter_add_(1, index, weights)
        counts.zero_().scatter_add_(1, assign, ones)
        updated = (votes >= 0).float().mul_(2.0).sub_(1.0)
        centroids = torch.where(counts[..., None] > 0, updated, centroids)
        torch.bmm(codes, centroids.mT, out=scores)
        previous, assign = assign, scores.argmax(-1)
        if torch.equal(previous, assign):
            break
    return assign, centroids
