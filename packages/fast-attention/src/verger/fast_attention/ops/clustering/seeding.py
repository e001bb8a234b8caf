"""k-means++ seeding in Hamming space: the initial centroids of the Hamming k-means.

Lloyd's iterations only refine a partition; where they start decides which clusters are
found. Seeding with queries spread evenly over the sequence (the first version) or with the
first C queries (the reference implementation) puts several seeds in one true cluster and none
in others: Lloyd then keeps two true clusters under one centroid, whose mean query matches
neither (on queries drawn around 64 centres, 100 clusters: relative error 0.36 / 0.26 for
clustered / improved clustered attention, against 0.12 / 0.01 with the true clusters; see
PERFORMANCE.md). k-means++ (Arthur & Vassilvitskii, 2007) draws each new seed with
probability proportional to the squared distance to the nearest seed so far, so every
well-separated cluster gets one with high probability (0.12 / 0.01 on the same queries).

The specification, shared by this torch loop and the Triton kernel (``triton.py``), so both
pick the same rows bit for bit:

- candidates: ``min(n_valid, max(256, 8·C))`` valid rows spread evenly over each group (each
  seed costs O(candidates), so the sample bounds the seeding's cost; 8 per cluster find the
  clusters that every row finds, 2 per cluster miss some: PERFORMANCE.md);
- weights: integers, ``ok · d²`` with ``d`` the Hamming distance to the nearest seed (all
  valid candidates weigh 1 for the first seed);
- draw j: ``r_j`` uniform in ``[0, 2³¹)`` from the caller's generator (the same for every
  group, as the hash planes are); the seed is the first candidate whose running weight sum
  exceeds ``(r_j · total) >> 31`` (integer arithmetic: no rounding differs between devices);
- a group whose candidates are all seeds already (total weight 0) repeats its last seed: the
  duplicate centroid stays empty (ties go to the lowest index).
"""

from __future__ import annotations

import torch

__all__ = ["lloyd_rows", "seed_candidates", "seed_centroids_torch", "seed_draws", "seed_rows"]

SEED_ROWS_PER_CLUSTER = 8  # candidates per cluster (a longer sequence is sampled evenly)
MIN_SEED_ROWS = 256
LLOYD_ROWS_PER_CLUSTER = 32  # rows Lloyd's iterations fit on, per cluster (see lloyd_rows)
MIN_LLOYD_ROWS = 4096
DRAW_BITS = 31  # r_j in [0, 2**31): r_j * total stays in int64 for totals below 2**32


def seed_rows(n_clusters: int) -> int:
    """How many candidate rows per group the seeding draws from (at most): the seeding costs
    O(rows) per seed, so O(C²) in all; 8 per cluster find the clusters that all rows find
    (PERFORMANCE.md)."""
    return max(MIN_SEED_ROWS, SEED_ROWS_PER_CLUSTER * n_clusters)


def lloyd_rows(n_clusters: int) -> int:
    """How many rows per group Lloyd's iterations fit the centroids on (at most): longer
    sequences are sampled evenly, then every row is assigned to the fitted centroids once.
    ``LLOYD_ROWS_PER_CLUSTER`` members per cluster fix a majority vote per bit as well as all
    rows do (PERFORMANCE.md), at a fraction of the iterations' cost at long sequences."""
    return max(MIN_LLOYD_ROWS, LLOYD_ROWS_PER_CLUSTER * n_clusters)


def seed_candidates(
    codes: torch.Tensor, valid: torch.Tensor | None, rows: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Candidate rows of the seeding: ``(codes (G, M, bits), ok (G, M) bool or None)``.

    The ``M = min(n_valid, rows)`` valid rows of each group spread evenly over its valid
    positions (left or right padding, or holes); ``ok`` marks the real ones where groups have
    fewer valid rows than ``M`` (None when every candidate is real).
    """
    g, n, bits = codes.shape
    if valid is None:
        if n <= rows:
            return codes, None
        idx = torch.div(torch.arange(rows, device=codes.device) * n, rows, rounding_mode="floor")
        return codes[:, idx], None
    lengths = valid.sum(1)  # (G,)
    m = int(min(int(lengths.max()), rows)) if g else 0
    m = max(m, 1)
    # the valid positions first, in order (a stable sort of the mask), then every k-th
    order = torch.sort(valid.to(torch.uint8), dim=1, descending=True, stable=True)[1]
    taken = torch.minimum(lengths, torch.full_like(lengths, m))  # candidates per group
    steps = torch.arange(m, device=codes.device)
    rank = torch.div(steps[None, :] * lengths[:, None], taken.clamp_min(1)[:, None],
                     rounding_mode="floor")  # fmt: skip
    ok = steps[None, :] < taken[:, None]
    rank = torch.where(ok, rank, 0).clamp_max(n - 1)
    idx = order.gather(1, rank)
    return codes.gather(1, idx[..., None].expand(-1, -1, bits)), ok


def seed_draws(
    groups: int,
    n_clusters: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The seeding's random integers ``r`` (G, C) int64 in ``[0, 2**31)``, from ``generator``
    (on its device) or from the default generator of ``device``. One draw per seed, shared
    by every group (as the hash planes are): a group's seeds depend on its own rows only,
    not on the batch around it, so a padded sequence is clustered as it would be alone."""
    where = device if generator is None else generator.device
    r = torch.randint(0, 2**DRAW_BITS, (n_clusters,), generator=generator, device=where)
    return r.to(device).expand(groups, n_clusters)


def seed_centroids_torch(
    cand: torch.Tensor, ok: torch.Tensor | None, n_clusters: int, draws: torch.Tensor
) -> torch.Tensor:
    """k-means++ seeds (G, C, bits) among the candidates ``cand`` (G, M, bits) ±1, with
    ``ok`` (G, M) marking real candidates (None: all) and ``draws`` from ``seed_draws``."""
    g, m, bits = cand.shape
    seeds = cand.new_empty(g, n_clusters, bits)
    weight = torch.ones(g, m, dtype=torch.long, device=cand.device) if ok is None else ok.long()
    nearest = torch.full((g, m), bits + 1, dtype=torch.long, device=cand.device)
    pick = torch.zeros(g, dtype=torch.long, device=cand.device)
    groups = torch.arange(g, device=cand.device)
    cand_t = cand.mT.contiguous()  # (G, bits, M): a row times it is ~8x faster than bmm by a column
    for j in range(n_clusters):
        running = weight.cumsum(1)
        total = running[:, -1]
        target = (draws[:, j] * total) >> DRAW_BITS  # < total when total > 0
        # the first candidate whose running sum exceeds the target: those before it do not
        first = (running <= target[:, None]).sum(1)
        pick = torch.where(total > 0, first, pick)
        seed = cand[groups, pick]  # (G, bits)
        seeds[:, j] = seed
        if j + 1 < n_clusters:
            # Hamming distance (bits − a·b) / 2: exact integers in the float matmul
            dot = torch.bmm(seed[:, None, :], cand_t).squeeze(1)
            dist = ((bits - dot) * 0.5).long()
            nearest = torch.minimum(nearest, dist)
            weight = nearest * nearest if ok is None else nearest * nearest * ok
    return seeds
