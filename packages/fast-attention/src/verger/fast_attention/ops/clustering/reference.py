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


def kmeans_reference(
    x: torch.Tensor, n_clusters: int, iterations: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense k-means of points x (N, D) in float64: k-means++ seeds (each drawn with
    probability proportional to the squared distance to the nearest seed so far), then
    Lloyd's iterations (an empty cluster keeps its centroid). Returns (assignments (N,),
    centroids (C, D)). What the Hamming k-means approximates, without hashing."""
    x = x.double()
    n = x.shape[0]
    seeds = [int(torch.randint(0, n, (1,), generator=generator))]
    nearest = ((x - x[seeds[0]]) ** 2).sum(-1)
    for _ in range(1, n_clusters):
        if float(nearest.sum()) == 0:  # every point is a seed already: repeat one
            seeds.append(seeds[-1])
            continue
        pick = int(torch.multinomial(nearest, 1, generator=generator))
        seeds.append(pick)
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(-1))
    centroids = x[seeds].clone()
    assign = torch.cdist(x, centroids).argmin(-1)
    for _ in range(iterations):
        for c in range(n_clusters):
            members = x[assign == c]
            if len(members):
                centroids[c] = members.mean(0)
        assign = torch.cdist(x, centroids).argmin(-1)
    return assign, centroids


def clustered_attention_reference(
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
    """Dense spec of (improved) clustered attention for given cluster assignments (B, H, Nq).

    Builds every query's full weight row over the keys in float64 with Python loops: the
    centroid (mean of the cluster's valid queries) softmax row; improved: its top-k keys are
    replaced by the query's exact softmax over them, scaled by the centroid's mass on them.
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
                    top = top[~pad[top]]
                for i in members:
                    w = torch.softmax(logits, 0)
                    if top is not None:
                        w = _exact_on(w, top, q64[bi, hi, i], k64[bi, hi], scale)
                    out[bi, hi, i] = w @ v64[bi, hi]
    return out


def _exact_on(
    w: torch.Tensor, keys: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float
) -> torch.Tensor:
    """Weight row w with the keys' entries replaced by q's exact softmax times their mass."""
    w = w.clone()
    w[keys] = w[keys].sum() * torch.softmax((k[keys] @ q) * scale, 0)
    return w


def causal_clustered_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centroids: torch.Tensor,
    *,
    topk: int | None = None,
    chunk_size: int = 64,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense spec of causal (improved) clustered attention with fixed centroids (H, C, D).

    Query i takes the nearest centroid; its weights are the centroid's softmax over the valid
    keys j ≤ i. Improved: E = the centroid's top-k keys among the chunks before i's chunk,
    plus i's own chunk's keys j ≤ i, get i's exact softmax scaled by the centroid's mass on
    them. float64, one Python loop step per query. Padded queries get zeros.
    """
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    q64, k64, v64, c64 = q.double(), k.double(), v.double(), centroids.double()
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        pad = torch.zeros(n, dtype=torch.bool) if key_padding_mask is None else key_padding_mask[bi]
        for hi in range(h):
            for i in range(n):
                if pad[i]:
                    continue
                a = int(((c64[hi] - q64[bi, hi, i]) ** 2).sum(-1).argmin())
                logits = (k64[bi, hi] @ c64[hi, a]) * scale
                visible = ~pad.cpu() & (torch.arange(n) <= i)
                w = torch.softmax(logits.masked_fill(~visible, float("-inf")), 0)
                if topk is not None:
                    start = i // chunk_size * chunk_size
                    earlier = torch.nonzero(visible & (torch.arange(n) < start)).flatten()
                    best = earlier[logits[earlier].topk(min(topk, len(earlier))).indices]
                    own = torch.nonzero(visible & (torch.arange(n) >= start)).flatten()
                    w = _exact_on(w, torch.cat((best, own)), q64[bi, hi, i], k64[bi, hi], scale)
                out[bi, hi, i] = w @ v64[bi, hi]
    return out
