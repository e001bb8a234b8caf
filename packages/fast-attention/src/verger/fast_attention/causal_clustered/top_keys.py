"""The top-k part of causal improved clustered attention: the centroid weights' sums over each
(chunk, cluster) top-k set (``top_removed``), and on the torch path each centroid's prefix
top-k sets as key histories with the exact softmax over them (``top_softmax_parts``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from verger.fast_attention.causal_clustered.scans import softmax_parts
from verger.fast_attention.clustered import query_blocks
from verger.fast_attention.ops.rescaled_scan import NEG_INF, safe_shift


def top_histories(top_idx: torch.Tensor, top_ok: torch.Tensor, n_keys: int):  # type: ignore[no-untyped-def]
    """Each centroid's top-k sets over all chunks as one key list with membership intervals.

    A key enters a prefix top-k once and, when k better keys have arrived, leaves for good, so
    it belongs to the sets of an interval of chunks [start, end). ``top_idx`` (G, C, nb, K)
    positions, ``top_ok`` bool. Returns keys (G, C, S) (S = the longest history; about
    k·(1 + ln(N/k)) for keys in random order), start, end (G, C, S) and ok (G, C, S).
    """
    g, c, nb, _ = top_idx.shape
    chunk_of = torch.arange(nb, device=top_idx.device).view(1, 1, nb, 1).expand_as(top_idx)
    idx = torch.where(top_ok, top_idx, n_keys).flatten(2)  # misses go to a spare slot
    first = torch.full((g, c, n_keys + 1), nb, device=idx.device, dtype=torch.long)
    first = first.scatter_reduce(2, idx, chunk_of.flatten(2), "amin")[..., :n_keys]
    last = torch.full((g, c, n_keys + 1), -1, device=idx.device, dtype=torch.long)
    last = last.scatter_reduce(2, idx, chunk_of.flatten(2), "amax")[..., :n_keys]
    member = last >= 0
    count = member.sum(-1)
    size = max(1, int(count.max()))
    slot = torch.where(member, member.cumsum(-1) - 1, size)

    def compact(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((g, c, size + 1), fill, device=idx.device, dtype=torch.long)
        return out.scatter_(2, slot, values)[..., :size]

    positions = torch.arange(n_keys, device=idx.device).expand(g, c, n_keys)
    ok = torch.arange(size, device=idx.device) < count[..., None]
    return compact(positions, 0), compact(first, nb), compact(last + 1, 0), ok


def top_softmax_parts(qp, kp, vp, group, keys, start, end, ok, chunk, scale):  # type: ignore[no-untyped-def]
    """Per query, the ``softmax_parts`` of its exact scores over its top-k keys (torch path).

    Queries of one group share a block; a block's key list ``keys`` (G, groups, S) holds the
    keys of every chunk's set, and key t counts for a query in chunk b if start_t ≤ b < end_t.
    Group ids are ``chunk·C + cluster`` or ``cluster``.
    """
    g, m, d = qp.shape
    blocks = query_blocks(qp, group, keys, ok, m)
    width = blocks.queries.shape[1]
    per_block = blocks.group[..., None].expand(-1, -1, keys.shape[-1])
    start, end = (t.gather(1, per_block).reshape(blocks.key_pos.shape) for t in (start, end))
    pos = torch.arange(m, device=qp.device).repeat(g)
    row_chunk = torch.full((blocks.queries.shape[0] * width,), -1, device=qp.device)
    row_chunk = row_chunk.index_copy(0, blocks.rows, pos // chunk).view(-1, width)
    # a block of a cluster's queries spans some chunks; of the cluster's key history it needs
    # only the keys alive then, far fewer late in the sequence than early on: blocks are
    # processed in buckets of similar counts, each padded to its own longest list
    lo = row_chunk.masked_fill(row_chunk < 0, m).amin(-1, keepdim=True)
    alive = blocks.key_ok & (start <= row_chunk.amax(-1, keepdim=True)) & (end > lo)  # type: ignore[operator]
    counts = alive.sum(-1)
    bucket = torch.ceil(torch.log2(counts.clamp_min(1).double())).long()
    results: list[torch.Tensor] = []
    for b in bucket.unique().tolist():
        sel = torch.nonzero(bucket == b).flatten()
        size = int(counts[sel].max().clamp_min(1))
        keep = torch.argsort((~alive[sel]).to(torch.uint8), dim=-1, stable=True)[:, :size]
        ok_s, st, en = (t[sel].gather(1, keep) for t in (alive, start, end))
        rc = row_chunk[sel, :, None]
        allowed = ok_s[:, None, :] & (st[:, None, :] <= rc) & (rc < en[:, None, :])
        flat = blocks.key_rows[sel].gather(1, keep).reshape(-1)
        v_sel = vp.reshape(-1, vp.shape[-1]).index_select(0, flat).view(len(sel), size, -1)
        k_sel = kp.reshape(-1, d).index_select(0, flat).view(len(sel), size, d)
        scores = torch.bmm(blocks.queries[sel], k_sel.mT).mul_(scale)
        part = softmax_parts(scores.masked_fill_(~allowed, NEG_INF), v_sel)
        if not results:
            results = [t.new_zeros(counts.shape[0], *t.shape[1:]) for t in part]
        for out, t in zip(results, part):
            out.index_copy_(0, sel, t)
    return [
        t.reshape(-1, *t.shape[2:]).index_select(0, blocks.rows).view(g, m, *t.shape[2:])
        for t in results
    ]


def top_removed(logits, vp, top_idx, top_ok, mu, group):  # type: ignore[no-untyped-def]
    """Per query i, Σ over its top-k set of the centroid weights exp(ℓ − mu_i) v_j, and of
    exp(ℓ − mu_i): (G, M, Dv) and (G, M).

    Every query of a (chunk, cluster) group shares the group's set, and
    exp(ℓ − mu_i) = exp(ℓ − m_g)·exp(m_g − mu_i) with m_g the set's largest logit, so the sums
    are formed once per group, one weighted ``embedding_bag`` over the value rows, and scaled
    per query (m_g ≤ mu_i: the set lies in earlier chunks, so nothing overflows; an empty
    set has m_g = −inf and adds 0).
    ``logits`` (G, C, M) (differentiable), ``vp`` (G, M, Dv), ``top_idx`` / ``top_ok``
    (G, C, nb, K), ``mu`` (G, M), ``group`` (G, M) = chunk·C + cluster.
    """
    g, c, nb, k = top_idx.shape
    m_rows, dv = vp.shape[1], vp.shape[2]
    ell = logits.gather(2, top_idx.reshape(g, c, nb * k)).view(g, c, nb, k)
    ell = ell.masked_fill(~top_ok, NEG_INF)
    m = ell.detach().amax(-1)  # (G, C, nb); −inf for an empty set
    w = torch.exp(ell - safe_shift(m)[..., None])  # 0 outside the set
    rows = top_idx + torch.arange(g, device=vp.device).view(g, 1, 1, 1) * m_rows
    sums = F.embedding_bag(
        rows.reshape(-1, k), vp.reshape(-1, dv), per_sample_weights=w.reshape(-1, k), mode="sum"
    )
    # (chunk, cluster) order, as ``group`` indexes them
    sums = sums.view(g, c, nb, dv).transpose(1, 2).reshape(g, nb * c, dv)
    norms = w.sum(-1).transpose(1, 2).reshape(g, nb * c)
    # exp(−inf) = 0 for an empty set: a shift of 0 there would overflow when mu_i < −88
    scale = torch.exp(m.transpose(1, 2).reshape(g, nb * c).gather(1, group) - safe_shift(mu))
    picked = sums.gather(1, group[..., None].expand(-1, -1, dv))
    return scale[..., None] * picked, scale * norms.gather(1, group)
