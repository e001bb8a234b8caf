"""The top-k part of causal improved clustered attention on the torch path: each centroid's
prefix top-k sets as key histories, and the per-query products over them."""

from __future__ import annotations

import torch

from verger.fast_attention.causal_clustered.scans import NEG_INF, safe_shift, softmax_parts
from verger.fast_attention.clustered import query_blocks


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


def top_products(qp, kp, vp, logits, mu, group, keys, start, end, ok, chunk, scale, softmax):  # type: ignore[no-untyped-def]
    """Per query, over its top-k keys: Σ w v and Σ w with the centroid weights
    w = exp(ℓ − mu), and (``softmax``) the ``softmax_parts`` of its exact scores.

    Queries of one group share a block; a block's key list ``keys`` (G, groups, S) holds the
    keys of every chunk's set, and key t counts for a query in chunk b if start_t ≤ b < end_t.
    ``logits`` (G, C, M) are the centroid logits; group ids are ``chunk·C + cluster`` or
    ``cluster``.
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
    row_shift = torch.zeros(blocks.queries.shape[0] * width, device=qp.device, dtype=qp.dtype)
    row_shift = row_shift.index_copy(0, blocks.rows, safe_shift(mu).reshape(-1)).view(-1, width, 1)
    clusters = logits.shape[1]
    rows_of = torch.arange(g, device=qp.device)[:, None] * clusters + blocks.group % clusters
    flat_logit = rows_of.reshape(-1, 1) * m + blocks.key_pos  # into logits.flatten()
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
        key_logits = logits.reshape(-1)[flat_logit[sel].gather(1, keep)].view(-1, 1, size)
        w = torch.exp(key_logits.masked_fill(~allowed, NEG_INF) - row_shift[sel])
        part = [torch.bmm(w, v_sel), w.sum(-1)]
        if softmax:
            k_sel = kp.reshape(-1, d).index_select(0, flat).view(len(sel), size, d)
            scores = torch.bmm(blocks.queries[sel], k_sel.mT) * scale
            part += softmax_parts(scores.masked_fill(~allowed, NEG_INF), v_sel)
        if not results:
            results = [t.new_zeros(counts.shape[0], *t.shape[1:]) for t in part]
        for out, t in zip(results, part):
            out.index_copy_(0, sel, t)
    return [
        t.reshape(-1, *t.shape[2:]).index_select(0, blocks.rows).view(g, m, *t.shape[2:])
        for t in results
    ]
