"""LSH hashing and Hamming k-means for clustered attention.

Codes are ±1 float matrices, so the Hamming distance is ``(bits − a·b) / 2`` and the nearest
centroid is the argmax of an inner product: this beats int64 popcount bit tricks on CPU (BLAS)
and on GPU (tensor cores). ``reference.py`` holds the popcount spec.

On CUDA the whole loop runs in Triton (``hamming_kmeans_triton``): one launch per sweep,
each program assigning a block of rows to the nearest centroid, counting the rows that moved
and adding their per-bit votes with atomics (integer sums, exact in any order); the next
sweep forms the centroids from those votes as it loads them, and a group whose assignment
did not change stops on the device. So k-means costs ``iterations + 1`` launches and no host
sync, instead of about ten launches and a sync per iteration. On CPU, each iteration is an
assignment step (``hamming_assign``: one batched matmul whose scores carry each centroid's
rank, so that one ``amax``, about 10x faster than ``argmax`` on CPU, finds the nearest:
``_keyed_argmax``) and an update step (an ``index_add_`` of the codes and a
``scatter_add_`` of the counts). ``hamming_assign`` on CUDA is a Triton kernel that keeps a
running argmax over centroid blocks, so the (G, N, C) score tensor is never stored. All give
identical results: exact integer scores and votes, ties to the lowest centroid index.
"""

from __future__ import annotations

import torch

from verger.core.kernels import BACKENDS, pick_backend
from verger.fast_attention.ops.clustering.reference import (
    hamming_distance_reference,
    pack_bits,
)
from verger.fast_attention.ops.clustering.seeding import (
    lloyd_rows,
    seed_candidates,
    seed_centroids_torch,
    seed_draws,
    seed_rows,
)
from verger.fast_attention.ops.clustering.triton import (
    MAX_BITS,
    MAX_GRID_Y,
    check_assign_inputs,
    hamming_assign_triton,
    hamming_kmeans_triton,
    seed_centroids_triton,
)

__all__ = [
    "BACKENDS",
    "hamming_assign",
    "hamming_distance_reference",
    "hamming_kmeans",
    "hash_codes",
    "pack_bits",
    "resolve_backend",
    "seed_centroids",
]


HASH_OFFSET_SCALE = 0.1  # the planes' offsets, relative to the projections' RMS


def resolve_backend(backend: str, device: torch.device, bits: int = 0) -> str:
    """``auto`` picks Triton on CUDA when it is installed and ``bits`` <= 64, torch otherwise."""
    return pick_backend(backend, device, op="clustering", fits=bits <= MAX_BITS)


def hash_codes(
    x: torch.Tensor,
    bits: int,
    *,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """±1 codes (G, N, bits) from random hyperplanes near the origin: ``sign(x W + b)``.

    ``x``: (G, N, D). The offsets ``b`` are drawn at a tenth of the projections' scale (their
    RMS over the valid rows): the planes pass near the origin, as the reference
    implementation's unscaled N(0, 1) offsets do for projections of norm ~10, so each bit
    splits the queries by direction (offsets at the full scale put many planes beside the
    data, and their bits say little: +0.04 relative error on a trained layer's queries),
    while queries along one direction with different norms can still be told apart. The
    planes come from ``generator`` (on its device) or from the default generator of x's
    device.
    """
    g, n, d = x.shape
    # drawn where x lives unless a generator fixes them (then on its device): a copy from
    # pageable host memory to a GPU waits for the stream, so host-drawn planes stall a call
    where = x.device if generator is None else generator.device
    planes = torch.randn(d, bits, generator=generator, dtype=torch.float32, device=where)
    offsets = torch.randn(bits, generator=generator, dtype=torch.float32, device=where)
    proj = x.detach().float() @ planes.to(x.device)
    # nansum: a non-finite query spoils its own cluster, not every row's planes; per-row sums
    # first, then the mask (weighting the (G, N, bits) squares by it costs 8x more on CPU)
    square_sums = torch.nansum(proj.square(), 2)  # (G, N)
    if valid is None:
        total, count = square_sums.sum(1), torch.full((g,), float(n * bits), device=x.device)
    else:
        total = torch.where(valid, square_sums, 0.0).sum(1)
        count = valid.sum(1).float() * bits
    scale = (total / count.clamp_min(1.0)).sqrt()
    proj = proj + offsets.to(x.device) * (HASH_OFFSET_SCALE * scale)[:, None, None]
    return (proj >= 0).float().mul_(2.0).sub_(1.0)


def seed_centroids(
    codes: torch.Tensor,
    n_clusters: int,
    *,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """k-means++ initial centroids (G, C, bits) for ±1 codes (G, N, bits): the rules are in
    ``seeding.py``; the random draws come from ``generator`` (or the default generator of
    the codes' device). Padded rows (``valid`` False) are never drawn. ``backend`` as in
    ``hamming_assign``: both give the same seeds."""
    g = codes.shape[0]
    backend = resolve_backend(backend, codes.device, codes.shape[-1])
    draws = seed_draws(g, n_clusters, codes.device, generator)
    cand, ok = seed_candidates(codes, valid, seed_rows(n_clusters))
    if backend == "triton":
        return seed_centroids_triton(cand, ok, n_clusters, draws).to(codes.dtype)
    return seed_centroids_torch(cand, ok, n_clusters, draws)


def _assign(
    codes: torch.Tensor,
    centroids: torch.Tensor,
    backend: str,
    scores: torch.Tensor | None,
    keyed: bool = False,
) -> torch.Tensor:
    """Assignment step on a resolved backend; ``scores`` is a reusable (G, N, C) torch buffer.
    ``keyed``: the codes carry a column of ones (``_with_ones``) for ``_keyed_argmax``."""
    if backend == "triton":
        return hamming_assign_triton(codes, centroids)[0]
    if keyed:
        return _keyed_argmax(codes, centroids, scores)
    return torch.bmm(codes, centroids.mT, out=scores).argmax(-1)


def _keys_are_exact(codes: torch.Tensor, n_clusters: int) -> bool:
    """Whether ``_keyed_argmax`` applies: on CPU (where ``argmax`` over the last dim is slow)
    with fp32 matmuls (no TF32/bf16 inputs) and keys below 2**24 (exact fp32 integers)."""
    bits = codes.shape[-1]
    return (
        codes.device.type == "cpu"
        and codes.dtype == torch.float32
        and torch.get_float32_matmul_precision() == "highest"
        and (bits + 1) * n_clusters < 2**24
    )


def _with_ones(codes: torch.Tensor) -> torch.Tensor:
    """Codes (G, N, bits) with a column of ones appended: it carries the ranks of
    ``_keyed_argmax`` through the matmul."""
    return torch.cat((codes, codes.new_ones(*codes.shape[:-1], 1)), -1)


def _keyed_argmax(
    codes1: torch.Tensor, centroids: torch.Tensor, scores: torch.Tensor | None
) -> torch.Tensor:
    """``argmax_c codes·centroid_c`` as one ``amax``, ~10x faster than ``argmax`` on CPU.

    The inner products are integers s in [−bits, bits], so the key ``s·C + (C − 1 − c)`` is an
    exact fp32 integer that orders by s first and, among ties, by the lowest c (argmax's rule).
    The matmul forms it directly: centroids scaled by C, plus the rank column that meets
    ``codes1``'s ones. The key is decoded in int64.
    """
    g, c, _ = centroids.shape
    rank = torch.arange(c - 1, -1, -1, dtype=centroids.dtype, device=centroids.device)
    keyed = torch.cat((centroids * c, rank.expand(g, c)[..., None]), -1)
    top = torch.bmm(codes1, keyed.mT, out=scores).amax(-1).long()
    return c - 1 - torch.remainder(top, c)


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
    check_assign_inputs(codes, centroids)
    backend = resolve_backend(backend, codes.device, codes.shape[-1])
    if backend == "torch" and _keys_are_exact(codes, centroids.shape[1]):
        return _assign(_with_ones(codes), centroids, backend, None, keyed=True)
    return _assign(codes, centroids, backend, None)


@torch.no_grad()
def hamming_kmeans(
    codes: torch.Tensor,
    n_clusters: int,
    iterations: int,
    *,
    valid: torch.Tensor | None = None,
    backend: str = "auto",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means in Hamming space: returns (assignments (G, N), centroids (G, C, bits)).

    Starts from k-means++ seeds (``seed_centroids``, drawn from ``generator``). Centroids are
    per-bit majority votes of their members (ties to +1); an empty cluster keeps its previous
    centroid. ``valid`` (G, N) bool restricts which rows seed the centroids and
    vote (padded ones do not, wherever they are). Every row is still assigned to its nearest
    centroid. Stops early once the assignments are stable (a fixed point: further iterations
    would change nothing). Groups longer than ``lloyd_rows(n_clusters)`` fit the centroids on
    that many valid rows spread evenly over the sequence, then assign every row once (the
    iterations' cost stops growing with the length). ``backend``: as in ``hamming_assign``;
    with Triton the loop is ``iterations + 1`` launches of one kernel and no host sync
    (``hamming_kmeans_triton``). Both backends give identical results.
    """
    backend = resolve_backend(backend, codes.device, codes.shape[-1])
    centroids = seed_centroids(codes, n_clusters, valid=valid, generator=generator, backend=backend)
    rows = lloyd_rows(n_clusters)
    if codes.shape[1] <= rows:  # every row takes part in the iterations: assignments are final
        return _lloyd(codes, centroids, iterations, valid, backend)
    fit, fit_valid = seed_candidates(codes, valid, rows)
    _, centroids = _lloyd(fit, centroids, iterations, fit_valid, backend)
    return hamming_assign(codes, centroids, backend=backend), centroids


def _lloyd(
    codes: torch.Tensor,
    centroids: torch.Tensor,
    iterations: int,
    valid: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's iterations from ``centroids`` on a resolved backend (``hamming_kmeans``)."""
    g, n, bits = codes.shape
    n_clusters = centroids.shape[1]
    if backend == "triton" and g <= MAX_GRID_Y:
        return hamming_kmeans_triton(codes, centroids, iterations, valid)
    weights = codes if valid is None else codes * valid[..., None]
    # argmin Hamming distance == argmax of the ±1 inner product; the buffers are reused across
    # iterations because fresh large CPU allocations cost page faults comparable to the matmul
    keyed = backend == "torch" and _keys_are_exact(codes, n_clusters)
    scored = _with_ones(codes) if keyed else codes  # what the assignment step multiplies
    scores = (
        torch.empty(g, n, n_clusters, dtype=codes.dtype, device=codes.device)
        if backend == "torch"
        else None
    )
    assign = _assign(scored, centroids, backend, scores, keyed)
    votes = torch.empty(g * n_clusters, bits, dtype=codes.dtype, device=codes.device)
    counts = torch.empty(g, n_clusters, device=codes.device)
    ones = torch.ones(g, n, device=codes.device) if valid is None else valid.float()
    rows = weights.reshape(g * n, bits)
    offsets = torch.arange(g, device=codes.device)[:, None] * n_clusters
    for _ in range(max(iterations, 1)):
        # per-bit votes of each cluster's members: one index_add_ over the flattened groups
        # (a scatter_add_ would need an int64 index per code bit)
        votes.zero_().index_add_(0, (assign + offsets).view(-1), rows)
        counts.zero_().scatter_add_(1, assign, ones)
        updated = torch.where(votes.view(g, n_clusters, bits) >= 0, 1.0, -1.0)
        centroids = torch.where(counts[..., None] > 0, updated, centroids)
        previous, assign = assign, _assign(scored, centroids, backend, scores, keyed)
        if torch.equal(previous, assign):
            break
    return assign, centroids
