"""LSH hashing and Hamming k-means for clustered attention.

Codes are ±1 float matrices, so the Hamming distance is ``(bits − a·b) / 2`` and the nearest
centroid is the argmax of an inner product: this beats int64 popcount bit tricks on CPU (BLAS)
and on GPU (tensor cores). ``reference.py`` holds the popcount spec.

The assignment step (``hamming_assign``) dispatches: on CUDA a Triton kernel (``triton.py``)
keeps a running argmax over centroid blocks, so the (G, N, C) score tensor is never stored;
elsewhere one batched matmul plus ``argmax``. Both give identical assignments (exact integer
scores, ties to the lowest centroid index). The update step (per-bit majority votes) stays
torch on every backend: it is two ``scatter_add_`` calls, memory-bound work that a kernel
would not speed up.
"""

from __future__ import annotations

import torch

from verger.fast_attention.ops._backend import BACKENDS, pick_backend
from verger.fast_attention.ops.clustering.reference import (
    hamming_distance_reference,
    pack_bits,
)
from verger.fast_attention.ops.clustering.triton import (
    MAX_BITS,
    hamming_assign_triton,
)

__all__ = [
    "BACKENDS",
    "hamming_assign",
    "hamming_distance_reference",
    "hamming_kmeans",
    "hash_codes",
    "pack_bits",
    "resolve_backend",
]


def resolve_backend(backend: str, device: torch.device, bits: int = 0) -> str:
    """``auto`` picks Triton on CUDA when it is installed and ``bits`` <= 64, torch otherwise."""
    return pick_backend(backend, device, fits=bits <= MAX_BITS)


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


def _assign(
    codes: torch.Tensor, centroids: torch.Tensor, backend: str, scores: torch.Tensor | None
) -> torch.Tensor:
    """Assignment step on a resolved backend; ``scores`` is a reusable (G, N, C) torch buffer."""
    if backend == "triton":
        return hamming_assign_triton(codes, centroids)[0]
    if scores is None:
        return torch.bmm(codes, centroids.mT).argmax(-1)
    return torch.bmm(codes, centroids.mT, out=scores).argmax(-1)


@torch.no_grad()
def hamming_assign(
    codes: torch.Tensor, centroids: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Index (G, N) int64 of each code's nearest centroid in Hamming distance.

    ``codes`` (G, N, bits) and ``centroids`` (G, C, bits) are ±1 float tensors. Ties go to
    the lowest centroid index (``argmax`` of the inner products). ``backend``: ``auto``
    (Triton on CUDA, torch elsewhere), ``torch`` or ``triton`` (on CPU only under the Triton
    interpreter).
    """
    backend = resolve_backend(backend, codes.device, codes.shape[-1])
    return _assign(codes, centroids, backend, None)


@torch.no_grad()
def hamming_kmeans(
    codes: torch.Tensor,
    n_clusters: int,
    iterations: int,
    *,
    valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means in Hamming space: returns (assignments (G, N), centroids (G, C, bits)).

    Centroids are per-bit majority votes of their members (ties to +1); an empty cluster keeps
    its previous centroid. ``valid`` (G, N) bool restricts which rows vote (padding does not);
    rows must be left-aligned (valid positions first), as with right padding. Every row is
    still assigned to its nearest centroid. Stops early once the assignments are stable (a
    fixed point: further iterations would change nothing). ``backend`` picks the assignment
    step as in ``hamming_assign``; both backends give identical results.
    """
    g, n, bits = codes.shape
    backend = resolve_backend(backend, codes.device, bits)
    lengths = (
        torch.full((g,), n, device=codes.device) if valid is None else valid.sum(1).clamp_min(1)
    )
    centroids = _initial_centroids(codes, n_clusters, lengths)
    weights = codes if valid is None else codes * valid[..., None]
    # argmin Hamming distance == argmax of the ±1 inner product; the buffers are reused across
    # iterations because fresh large CPU allocations cost page faults comparable to the matmul
    scores = (
        torch.empty(g, n, n_clusters, dtype=codes.dtype, device=codes.device)
        if backend == "torch"
        else None
    )
    assign = _assign(codes, centroids, backend, scores)
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
        previous, assign = assign, _assign(codes, centroids, backend, scores)
        if torch.equal(previous, assign):
            break
    return assign, centroids
