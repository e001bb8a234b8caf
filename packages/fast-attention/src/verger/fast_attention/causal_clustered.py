"""Causal clustered attention for language models: centroids fixed before the sequence.

Clustered attention (Vyas et al., 2020) is defined for encoders: its centroids are the means
of all queries of the sequence, so in a decoder the weights at position i would depend on
later tokens. Here the centroids are given (``ClusteredAttention(causal=True)`` learns them
as an exponential moving average over training batches, as the Routing Transformer does), so
query i's cluster depends only on q_i and every output depends only on positions ≤ i.

Query i in cluster ``a`` gets the centroid's softmax weights renormalized over keys j ≤ i:

    base_i = Σ_{j≤i} exp(ℓ_aj) v_j / z_i,   ℓ_aj = scale · c_a·k_j,   z_i = Σ_{j≤i} exp(ℓ_aj).

Improved clustered (``topk``): with chunks of ``chunk_size`` positions, query i in chunk b
attends exactly to E_i = (the centroid's top-k keys among chunks < b) ∪ (its own chunk's keys
j ≤ i), scaled by the centroid's mass on E_i; the other keys keep the centroid's weights:

    out_i = Σ_{j≤i, j∉E_i} exp(ℓ_aj) v_j / z_i + (Σ_{j∈E_i} exp(ℓ_aj) / z_i) · softmax_E(q_i·k) v.

Per-chunk sums are combined by an exclusive scan over chunks with a running max, so nothing
under- or overflows and no stabilizer looks ahead. The same quantities kept as a constant-size
``ClusteredAttentionState`` give the recurrent form (``causal_clustered_attention_step``):
O(C·D + (topk + chunk_size)·D) per generated token, whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import torch
import torch.nn.functional as F

from verger.fast_attention._checks import check_padding_mask, check_positive_int, check_qkv
from verger.fast_attention.clustered import _centroids, _rows, _topk_exact_blocked, query_blocks
from verger.fast_attention.feature_maps import compute_dtype
from verger.fast_attention.ops._backend import pick_backend
from verger.fast_attention.ops.clustering import hamming_kmeans, hash_codes
from verger.fast_attention.ops.gathered_attention.triton import MAX_DIM, MAX_KEYS

__all__ = [
    "ClusteredAttentionState",
    "assign_to_centroids",
    "causal_clustered_attention",
    "causal_clustered_attention_step",
]

_NEG_INF = float("-inf")


@dataclass
class ClusteredAttentionState:
    """Recurrent state of causal clustered attention after ``steps`` tokens (constant size).

    Per head and centroid: ``sums`` (B, H, C, Dv) = Σ_j exp(ℓ_cj − shift_c) v_j, ``norms``
    (B, H, C) the same without v, ``shift`` (B, H, C) the running max of ℓ. Improved clustered
    also keeps each centroid's top-k keys of the completed chunks (``top_logits`` (B, H, C, K),
    −inf where empty; ``top_keys``, ``top_values``) and the current chunk's keys, values and
    logits (``chunk_keys`` (B, H, n, D), ``chunk_values``, ``chunk_logits`` (B, H, C, n)).
    Padded keys have logit −inf everywhere. Tensors are detached: the state carries no gradient.
    """

    sums: torch.Tensor
    norms: torch.Tensor
    shift: torch.Tensor
    topk: int | None
    chunk_size: int
    scale: float
    steps: int = 0
    top_logits: torch.Tensor | None = None
    top_keys: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    chunk_keys: torch.Tensor | None = None
    chunk_values: torch.Tensor | None = None
    chunk_logits: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Memory held by the state: bounded by C·(topk + chunk_size)·(D + Dv), not by steps."""
        tensors = [getattr(self, f) for f in self.__dataclass_fields__]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _check_centroids(centroids: torch.Tensor, b: int, h: int, d: int) -> torch.Tensor:
    if not isinstance(centroids, torch.Tensor) or not centroids.is_floating_point():
        raise TypeError("centroids must be a floating tensor (heads, clusters, dim)")
    if centroids.dim() == 3:
        centroids = centroids.unsqueeze(0)
    if (
        centroids.dim() != 4
        or centroids.shape[0] not in (1, b)
        or centroids.shape[1] != h
        or centroids.shape[3] != d
        or centroids.shape[2] < 1
    ):
        raise ValueError(
            f"centroids must be (heads, clusters, dim) = ({h}, C, {d}) or (batch, heads, "
            f"clusters, dim) with C >= 1; got {tuple(centroids.shape)}"
        )
    return centroids.expand(b, -1, -1, -1)


@torch.no_grad()
def assign_to_centroids(q: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index (B, H, N) of the nearest centroid (Euclidean) of every query (B, H, N, D).

    ``centroids``: (H, C, D) or (B, H, C, D). Depends on q_i alone, so it is causal.
    """
    b, h, _, d = q.shape
    c = _check_centroids(centroids, b, h, d).to(compute_dtype(q.dtype))
    dots = torch.matmul(q.to(c.dtype), c.mT)  # (B, H, N, C)
    return (c.square().sum(-1)[:, :, None, :] - 2 * dots).argmin(-1)


def _safe(m: torch.Tensor) -> torch.Tensor:
    """A max of logits usable as a shift: −inf (no valid key yet) becomes 0."""
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def _log_depth(logits: torch.Tensor, log_depth: bool | None) -> bool:
    """Scans over chunks: sequential on CPU (the least work), log-depth on GPUs, where a
    sequential scan's N / chunk_size steps of small launches would dominate."""
    return logits.is_cuda if log_depth is None else log_depth


def _rescaled_sum(
    a: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, Σ e^(ℓ−max) v, Σ e^(ℓ−max)) of the union of two disjoint sets of logits."""
    new_m = torch.maximum(a[0], b[0])
    fa = torch.exp(a[0] - _safe(new_m))  # exp(−inf) = 0: an empty side adds nothing
    fb = torch.exp(b[0] - _safe(new_m))
    return new_m, a[1] * fa[..., None] + b[1] * fb[..., None], a[2] * fa + b[2] * fb


def _chunk_prefix(
    logits: torch.Tensor, v: torch.Tensor, log_depth: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exclusive prefix over chunks of each centroid's weighted sums, with a running max.

    ``logits`` (G, C, nb, L), ``v`` (G, nb, L, Dv). Returns ``shift`` (G, nb, C): max logit
    over the chunks before b (−inf for b = 0), and ``sums`` (G, nb, C, Dv), ``norms``
    (G, nb, C): Σ over those chunks of exp(ℓ − shift) v and exp(ℓ − shift).
    """
    m = logits.detach().amax(-1)  # (G, C, nb): per-chunk max
    e = torch.exp(logits - _safe(m)[..., None])
    chunk_sums = torch.einsum("gcbl,gbld->gbcd", e, v)
    chunk_norms = e.sum(-1).transpose(1, 2)  # (G, nb, C)
    m = m.transpose(1, 2)
    g, nb, c = chunk_norms.shape
    if _log_depth(logits, log_depth):
        # Hillis-Steele: after the step with offset o, entry b holds chunks (b − 2o, b]
        run_m, run_s, run_z, o = m, chunk_sums, chunk_norms, 1
        while o < nb:
            new_m, new_s, new_z = _rescaled_sum(
                (run_m[:, :-o], run_s[:, :-o], run_z[:, :-o]),
                (run_m[:, o:], run_s[:, o:], run_z[:, o:]),
            )
            run_m = torch.cat((run_m[:, :o], new_m), 1)
            run_s = torch.cat((run_s[:, :o], new_s), 1)
            run_z = torch.cat((run_z[:, :o], new_z), 1)
            o *= 2
        return (  # exclusive: shift by one chunk, nothing before chunk 0
            F.pad(run_m[:, :-1], (0, 0, 1, 0), value=_NEG_INF),
            F.pad(run_s[:, :-1], (0, 0, 0, 0, 1, 0)),
            F.pad(run_z[:, :-1], (0, 0, 1, 0)),
        )
    run_m = logits.new_full((g, c), _NEG_INF)
    run_s = logits.new_zeros(g, c, v.shape[-1])
    run_z = logits.new_zeros(g, c)
    shifts, sums, norms = [], [], []
    for b in range(nb):  # nb = N / chunk_size steps of O(C·Dv): a sequential scan is cheapest
        shifts.append(run_m)
        sums.append(run_s)
        norms.append(run_z)
        run_m, run_s, run_z = _rescaled_sum(
            (run_m, run_s, run_z), (m[:, b], chunk_sums[:, b], chunk_norms[:, b])
        )
    return torch.stack(shifts, 1), torch.stack(sums, 1), torch.stack(norms, 1)


@torch.no_grad()
def _prefix_topk(
    logits: torch.Tensor, topk: int, log_depth: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each centroid's top-k keys among the chunks before b: (values, positions) (G, C, nb, K).

    Per-chunk top-k, then a running merge ("top-k of the union") chunk by chunk: 5-7x faster
    on CPU than a log-depth scan, which does log2(nb) times the work (GPUs take that one).
    Missing entries have value −inf.
    """
    g, c, nb, L = logits.shape
    vals, idx = logits.topk(min(topk, L), -1)
    idx = idx + torch.arange(nb, device=idx.device)[:, None] * L
    run_v = logits.new_full((g, c, topk), _NEG_INF)
    run_i = torch.zeros(g, c, topk, dtype=torch.long, device=idx.device)
    if _log_depth(logits, log_depth):
        vals = torch.cat((vals, run_v[:, :, None].expand(-1, -1, nb, -1)), -1)[..., :topk]
        idx = torch.cat((idx, run_i[:, :, None].expand(-1, -1, nb, -1)), -1)[..., :topk]
        o = 1
        while o < nb:  # after offset o, entry b holds the top-k of chunks (b − 2o, b]
            both_v = torch.cat((vals[:, :, :-o], vals[:, :, o:]), -1)
            both_i = torch.cat((idx[:, :, :-o], idx[:, :, o:]), -1)
            top_v, pick = both_v.topk(topk, -1)
            vals = torch.cat((vals[:, :, :o], top_v), 2)
            idx = torch.cat((idx[:, :, :o], both_i.gather(-1, pick)), 2)
            o *= 2
        return (torch.cat((run_v[:, :, None], vals[:, :, :-1]), 2),
                torch.cat((run_i[:, :, None], idx[:, :, :-1]), 2))  # fmt: skip
    out_v, out_i = [], []
    for b in range(nb):
        out_v.append(run_v)
        out_i.append(run_i)
        run_v, pick = torch.cat((run_v, vals[:, :, b]), -1).topk(topk, -1)
        run_i = torch.cat((run_i, idx[:, :, b]), -1).gather(-1, pick)
    return torch.stack(out_v, 2), torch.stack(out_i, 2)


def _softmax_parts(
    scores: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalized softmax of masked scores (..., K) (−inf = masked) over v (..., K, Dv).

    Returns (shift (...), Σ exp(s − shift) (...), Σ exp(s − shift) v (..., Dv)); the shift
    is −inf where no key is allowed (the sums are then 0).
    """
    shift = scores.detach().amax(-1)
    e = torch.exp(scores - _safe(shift)[..., None])
    return shift, e.sum(-1), torch.matmul(e, v)


def _merge(
    a: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The softmax over the union of two disjoint key sets from their ``_softmax_parts``."""
    shift = _safe(torch.maximum(a[0], b[0]))
    fa, fb = torch.exp(a[0] - shift), torch.exp(b[0] - shift)
    den = fa * a[1] + fb * b[1]
    return (fa[..., None] * a[2] + fb[..., None] * b[2]) / den.clamp_min(1e-30)[..., None]


def _top_histories(top_idx: torch.Tensor, top_ok: torch.Tensor, n_keys: int):  # type: ignore[no-untyped-def]
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


def _top_products(qp, kp, vp, logits, mu, group, keys, start, end, ok, chunk, scale, softmax):  # type: ignore[no-untyped-def]
    """Per query, over its top-k keys: Σ w v and Σ w with the centroid weights
    w = exp(ℓ − mu), and (``softmax``) the ``_softmax_parts`` of its exact scores.

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
    row_shift = row_shift.index_copy(0, blocks.rows, _safe(mu).reshape(-1)).view(-1, width, 1)
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
        w = torch.exp(key_logits.masked_fill(~allowed, _NEG_INF) - row_shift[sel])
        part = [torch.bmm(w, v_sel), w.sum(-1)]
        if softmax:
            k_sel = kp.reshape(-1, d).index_select(0, flat).view(len(sel), size, d)
            scores = torch.bmm(blocks.queries[sel], k_sel.mT) * scale
            part += _softmax_parts(scores.masked_fill(~allowed, _NEG_INF), v_sel)
        if not results:
            results = [t.new_zeros(counts.shape[0], *t.shape[1:]) for t in part]
        for out, t in zip(results, part):
            out.index_copy_(0, sel, t)
    return [
        t.reshape(-1, *t.shape[2:]).index_select(0, blocks.rows).view(g, m, *t.shape[2:])
        for t in results
    ]


def _parallel(q3, k3, v3, c3, a3, key_pad, topk, chunk, scale, backend):  # type: ignore[no-untyped-def]
    """The chunked parallel form on (G, N, ·) tensors (see the module docstring): the output
    and the centroid logits (G, C, N), which the recurrent state reuses."""
    g, n, d = q3.shape
    nb = -(-n // chunk)
    extra = nb * chunk - n
    kp, vp = F.pad(k3, (0, 0, 0, extra)), F.pad(v3, (0, 0, 0, extra))
    valid = torch.ones(g, n, dtype=torch.bool, device=q3.device) if key_pad is None else ~key_pad
    valid = F.pad(valid, (0, extra), value=False)
    logits = torch.bmm(c3, kp.mT) * scale  # (G, C, nb·L)
    logits = logits.masked_fill(~valid[:, None, :], _NEG_INF)
    clusters = c3.shape[1]
    lc = logits.view(g, clusters, nb, chunk)
    vc = vp.view(g, nb, chunk, -1)
    shift, sums, norms = _chunk_prefix(lc, vc)

    ap = F.pad(a3, (0, extra))  # padded query rows are dropped at the end
    chunk_of_query = torch.arange(nb, device=q3.device).repeat_interleave(chunk)[None, :]
    group = chunk_of_query * clusters + ap  # (chunk, cluster) of every query
    shift_i = shift.reshape(g, nb * clusters).gather(1, group)  # (G, nb·L)
    sums_i = _rows(sums.reshape(g, nb * clusters, -1), group)
    norms_i = norms.reshape(g, nb * clusters).gather(1, group)
    # each query's centroid logits over its own chunk: (G, nb, L queries, L keys)
    local = lc.transpose(1, 2).gather(2, ap.view(g, nb, chunk, 1).expand(-1, -1, -1, chunk))
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=q3.device).tril()
    local = local.masked_fill(~tri, _NEG_INF)
    mu = torch.maximum(shift_i, local.detach().amax(-1).reshape(g, -1))  # running max through i
    w_local = torch.exp(local - _safe(mu).view(g, nb, chunk, 1))
    f = torch.exp(shift_i - _safe(mu))  # rescales the chunks before b to the shift mu
    z = f * norms_i + w_local.sum(-1).reshape(g, -1)
    local_num = torch.matmul(w_local, vc).reshape(g, nb * chunk, -1)
    if topk is None:
        out = (f[..., None] * sums_i + local_num) / z[..., None].clamp_min(1e-30)
        return out[:, :n], logits[:, :, :n]

    top_vals, top_idx = _prefix_topk(lc.detach(), topk)  # (G, C, nb, K)
    top_ok = torch.isfinite(top_vals)
    qp = F.pad(q3, (0, 0, 0, extra))
    if backend == "triton":
        # per (chunk, cluster) group: one gathered product over its top-k and its chunk's
        # keys, with the causal position mask (Triton reads the rows by index, no copies)
        groups = nb * clusters
        top_keys = top_idx.transpose(1, 2).reshape(g, groups, topk)
        top_ok = top_ok.transpose(1, 2).reshape(g, groups, topk)
        chunk_id = (
            torch.arange(nb, device=q3.device).view(1, nb, 1, 1).expand(g, nb, clusters, topk)
        )
        start = chunk_id.reshape(g, groups, topk)
        removed_i, removed_z = _top_products(
            qp, kp, vp, logits, mu, group, top_keys, start, start + 1, top_ok, chunk, scale,
            softmax=False,
        )  # fmt: skip
        chunk_keys = torch.arange(nb * chunk, device=q3.device).view(1, nb, 1, chunk)
        chunk_keys = chunk_keys.expand(g, nb, clusters, chunk).reshape(g, groups, chunk)
        chunk_ok = valid.view(g, nb, 1, chunk).expand(g, nb, clusters, chunk)
        keys = torch.cat((top_keys, chunk_keys), -1)
        keys_ok = torch.cat((top_ok, chunk_ok.reshape(g, groups, chunk)), -1)
        exact = _topk_exact_blocked(qp, kp, vp, group, keys, keys_ok, scale, causal=True)
    else:  # one block per cluster over its top-k history; the chunk's keys densely
        keys, start, end, ok = _top_histories(top_idx, top_ok, nb * chunk)
        removed_i, removed_z, *top_parts = _top_products(
            qp, kp, vp, logits, mu, ap, keys, start, end, ok, chunk, scale, softmax=True
        )
        s_local = torch.matmul(qp.view(g, nb, chunk, d), kp.view(g, nb, chunk, d).mT) * scale
        s_local = s_local.masked_fill(~(tri & valid.view(g, nb, 1, chunk)), _NEG_INF)
        local_parts = tuple(
            t.reshape(g, nb * chunk, *t.shape[3:]) for t in _softmax_parts(s_local, vc)
        )
        exact = _merge(local_parts, tuple(top_parts))  # type: ignore[arg-type]
    mass = (removed_z + w_local.sum(-1).reshape(g, -1)) / z.clamp_min(1e-30)
    rest = (f[..., None] * sums_i - removed_i) / z[..., None].clamp_min(1e-30)
    return (rest + mass[..., None] * exact)[:, :n], logits[:, :, :n]


def _state_from_sequence(k3, v3, logits, topk, chunk, scale, shape):  # type: ignore[no-untyped-def]
    """The recurrent state after a whole (G, N, ·) sequence, computed in one pass."""
    b, h = shape
    n = k3.shape[1]
    clusters = logits.shape[1]
    logits = logits.detach()
    shift = logits.amax(-1)
    e = torch.exp(logits - _safe(shift)[..., None])
    state = ClusteredAttentionState(
        sums=torch.bmm(e, v3.detach()).view(b, h, clusters, -1),
        norms=e.sum(-1).view(b, h, clusters),
        shift=shift.view(b, h, clusters),
        topk=topk,
        chunk_size=chunk,
        scale=scale,
        steps=n,
    )
    if topk is None:
        return state
    done = (n // chunk) * chunk
    vals, idx = logits[:, :, :done].topk(min(topk, done), -1)
    vals = F.pad(vals, (0, topk - vals.shape[-1]), value=_NEG_INF)
    idx = F.pad(idx, (0, topk - idx.shape[-1]))
    state.top_logits = vals.view(b, h, clusters, topk)
    state.top_keys = _rows(k3.detach(), idx).view(b, h, clusters, topk, -1)
    state.top_values = _rows(v3.detach(), idx).view(b, h, clusters, topk, -1)
    state.chunk_keys = k3.detach()[:, done:].reshape(b, h, n - done, k3.shape[-1])
    state.chunk_values = v3.detach()[:, done:].reshape(b, h, n - done, v3.shape[-1])
    state.chunk_logits = logits[:, :, done:].reshape(b, h, clusters, n - done)
    return state


@overload
def causal_clustered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centroids: torch.Tensor,
    *,
    topk: int | None = ...,
    chunk_size: int = ...,
    key_padding_mask: torch.Tensor | None = ...,
    scale: float | None = ...,
    return_state: Literal[False] = ...,
    assignments: torch.Tensor | None = ...,
    backend: str = ...,
) -> torch.Tensor: ...


@overload
def causal_clustered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centroids: torch.Tensor,
    *,
    topk: int | None = ...,
    chunk_size: int = ...,
    key_padding_mask: torch.Tensor | None = ...,
    scale: float | None = ...,
    return_state: Literal[True],
    assignments: torch.Tensor | None = ...,
    backend: str = ...,
) -> tuple[torch.Tensor, ClusteredAttentionState]: ...


@overload
def causal_clustered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centroids: torch.Tensor,
    *,
    topk: int | None = ...,
    chunk_size: int = ...,
    key_padding_mask: torch.Tensor | None = ...,
    scale: float | None = ...,
    return_state: bool,
    assignments: torch.Tensor | None = ...,
    backend: str = ...,
) -> torch.Tensor | tuple[torch.Tensor, ClusteredAttentionState]: ...


def causal_clustered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centroids: torch.Tensor,
    *,
    topk: int | None = None,
    chunk_size: int = 64,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_state: bool = False,
    assignments: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, ClusteredAttentionState]:
    """Causal clustered (``topk=None``) or improved clustered attention with given centroids.

    ``q``, ``k`` (B, H, N, D), ``v`` (B, H, N, Dv); ``centroids`` (H, C, D) or (B, H, C, D),
    differentiable (gradients flow to q only through the exact top-k scores: give the module's
    straight-through centroids to train the query projection). ``chunk_size``: the exact local
    window of improved clustered and the granularity of its top-k sets. ``key_padding_mask``:
    bool (B, N), True at padding; outputs at padded positions are zero. ``assignments``
    (B, H, N): precomputed ``assign_to_centroids(q, centroids)``. Output position i depends on
    positions ≤ i only. With ``return_state`` also returns the recurrent state after the
    sequence (for ``causal_clustered_attention_step``). ``backend`` (improved clustered's exact
    part): ``auto`` = Triton on CUDA when it fits (topk + chunk_size ≤ 256, head dims ≤ 256),
    ``torch`` or ``triton``.
    """
    check_qkv(q, k, v, same_length=True)
    if topk is not None:
        check_positive_int("topk", topk)
    check_positive_int("chunk_size", chunk_size)
    b, h, n, d = q.shape
    c = _check_centroids(centroids, b, h, d)
    mask = check_padding_mask(key_padding_mask, b, n)
    if assignments is None:
        assignments = assign_to_centroids(q, c)
    elif assignments.shape != q.shape[:3] or assignments.dtype != torch.long:
        raise ValueError(f"assignments must be int64 {tuple(q.shape[:3])}")
    fits = (topk or 0) + chunk_size <= MAX_KEYS and max(d, v.shape[-1]) <= MAX_DIM
    backend = pick_backend(backend, q.device, fits=fits)
    dtype = compute_dtype(q.dtype)
    scale = d**-0.5 if scale is None else float(scale)
    g, clusters = b * h, c.shape[2]
    q3, k3 = q.reshape(g, n, d).to(dtype), k.reshape(g, n, d).to(dtype)
    v3 = v.reshape(g, n, v.shape[-1]).to(dtype)
    c3 = c.reshape(g, clusters, d).to(dtype)
    pad = None if mask is None else mask[:, None, :].expand(b, h, n).reshape(g, n)
    if n == 0:
        out = v.new_zeros(b, h, 0, v.shape[-1])
        if not return_state:
            return out
        empty = _empty_state(
            c, v.shape[-1], batch=b, topk=topk, chunk_size=chunk_size, scale=scale, dtype=dtype
        )
        return out, empty
    out3, logits = _parallel(
        q3, k3, v3, c3, assignments.reshape(g, n), pad, topk, chunk_size, scale, backend
    )
    out = out3.view(b, h, n, -1)
    if mask is not None:
        out = out.masked_fill(mask[:, None, :, None], 0.0)
    out = out.to(v.dtype)
    if not return_state:
        return out
    return out, _state_from_sequence(k3, v3, logits, topk, chunk_size, scale, (b, h))


def _empty_state(
    centroids: torch.Tensor,
    v_dim: int,
    *,
    batch: int,
    topk: int | None,
    chunk_size: int,
    scale: float,
    dtype: torch.dtype,
) -> ClusteredAttentionState:
    """The state before the first token (no keys: shift −inf, empty top-k sets and chunk)."""
    h, clusters, d = centroids.shape[-3:]
    dev = centroids.device
    state = ClusteredAttentionState(
        sums=torch.zeros(batch, h, clusters, v_dim, dtype=dtype, device=dev),
        norms=torch.zeros(batch, h, clusters, dtype=dtype, device=dev),
        shift=torch.full((batch, h, clusters), _NEG_INF, dtype=dtype, device=dev),
        topk=topk,
        chunk_size=chunk_size,
        scale=scale,
    )
    if topk is not None:
        state.top_logits = torch.full((batch, h, clusters, topk), _NEG_INF, dtype=dtype, device=dev)
        state.top_keys = torch.zeros(batch, h, clusters, topk, d, dtype=dtype, device=dev)
        state.top_values = torch.zeros(batch, h, clusters, topk, v_dim, dtype=dtype, device=dev)
        state.chunk_keys = torch.zeros(batch, h, 0, d, dtype=dtype, device=dev)
        state.chunk_values = torch.zeros(batch, h, 0, v_dim, dtype=dtype, device=dev)
        state.chunk_logits = torch.zeros(batch, h, clusters, 0, dtype=dtype, device=dev)
    return state


@torch.no_grad()
def causal_clustered_attention_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    centroids: torch.Tensor,
    state: ClusteredAttentionState | None = None,
    *,
    topk: int | None = None,
    chunk_size: int = 64,
    scale: float | None = None,
) -> tuple[torch.Tensor, ClusteredAttentionState]:
    """One token of causal clustered attention: (B, H, D) inputs -> (out (B, H, Dv), state).

    Equals the matching row of ``causal_clustered_attention`` over the whole prefix. With
    ``state=None`` a new state is made from ``topk``, ``chunk_size`` and ``scale``; otherwise
    the state's settings are used. Inference only (no gradient).
    """
    for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a (batch, heads, dim) tensor")
    b, h, d = q_t.shape
    c = _check_centroids(centroids, b, h, d)
    dtype = compute_dtype(q_t.dtype)
    if state is None:
        if topk is not None:
            check_positive_int("topk", topk)
        check_positive_int("chunk_size", chunk_size)
        state = _empty_state(
            c, v_t.shape[-1], batch=b, topk=topk, chunk_size=chunk_size,
            scale=d**-0.5 if scale is None else float(scale), dtype=dtype,
        )  # fmt: skip
    elif not isinstance(state, ClusteredAttentionState):
        raise TypeError(f"state must be a ClusteredAttentionState, got {type(state).__name__}")
    elif state.sums.shape[:3] != (b, h, c.shape[2]):
        raise ValueError(
            f"state is for (batch, heads, clusters) = {tuple(state.sums.shape[:3])}, "
            f"inputs and centroids give ({b}, {h}, {c.shape[2]})"
        )
    c = c.to(dtype)
    q, k, v = q_t.to(dtype), k_t.to(dtype), v_t.to(dtype)
    logit = torch.matmul(c, k[..., None]).squeeze(-1) * state.scale  # (B, H, C)
    shift = torch.maximum(state.shift, logit)
    old_f = torch.exp(state.shift - shift)
    new_f = torch.exp(logit - shift)
    sums = state.sums * old_f[..., None] + new_f[..., None] * v[:, :, None, :]
    norms = state.norms * old_f + new_f
    # nearest centroid (as assign_to_centroids, inlined: a decode step is op-overhead bound)
    a = (c.square().sum(-1) - 2 * torch.matmul(c, q[..., None]).squeeze(-1)).argmin(-1)
    pick = a[..., None]
    z = norms.gather(2, pick).squeeze(2)
    num = sums.gather(2, pick[..., None].expand(-1, -1, 1, sums.shape[-1])).squeeze(2)
    new = ClusteredAttentionState(
        sums=sums, norms=norms, shift=shift, topk=state.topk, chunk_size=state.chunk_size,
        scale=state.scale, steps=state.steps + 1,
    )  # fmt: skip
    if state.topk is None:
        return (num / z[..., None]).to(v_t.dtype), new
    assert state.chunk_keys is not None and state.chunk_values is not None
    assert state.chunk_logits is not None and state.top_logits is not None
    assert state.top_keys is not None and state.top_values is not None
    chunk_keys = torch.cat((state.chunk_keys, k[:, :, None]), 2)
    chunk_values = torch.cat((state.chunk_values, v[:, :, None]), 2)
    chunk_logits = torch.cat((state.chunk_logits, logit[..., None]), 3)
    mu = shift.gather(2, pick).squeeze(2)
    # E: the centroid's top-k of earlier chunks, then this chunk's keys (all ≤ the new one)
    e_logits = torch.cat(
        (_select(state.top_logits, a), _select(chunk_logits, a)), -1
    )  # (B, H, K + n)
    e_keys = torch.cat((_select(state.top_keys, a), chunk_keys), 2)
    e_values = torch.cat((_select(state.top_values, a), chunk_values), 2)
    ok = e_logits != _NEG_INF
    w = torch.exp(e_logits - mu[..., None])  # 0 where not ok
    scores = torch.matmul(e_keys, q[..., None]).squeeze(-1) * state.scale
    p = torch.softmax(scores.masked_fill(~ok, _NEG_INF), -1)
    exact, removed = torch.matmul(torch.stack((p, w), -2), e_values).unbind(-2)
    out = (num - removed) / z[..., None] + (w.sum(-1) / z)[..., None] * exact  # z >= 1
    if chunk_keys.shape[2] == state.chunk_size:  # chunk complete: merge it into the top-k
        vals, idx = torch.cat((state.top_logits, chunk_logits), -1).topk(state.topk, -1)
        new.top_logits = vals
        new.top_keys = _take(
            torch.cat((state.top_keys, _per_centroid(chunk_keys, c.shape[2])), 3), idx
        )
        new.top_values = _take(
            torch.cat((state.top_values, _per_centroid(chunk_values, c.shape[2])), 3), idx
        )
        chunk_keys, chunk_values = chunk_keys[:, :, :0], chunk_values[:, :, :0]
        chunk_logits = chunk_logits[..., :0]
    else:
        new.top_logits, new.top_keys, new.top_values = (
            state.top_logits, state.top_keys, state.top_values,
        )  # fmt: skip
    new.chunk_keys, new.chunk_values, new.chunk_logits = chunk_keys, chunk_values, chunk_logits
    return out.to(v_t.dtype), new


def _select(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """t (B, H, C, ...) at centroid a (B, H) -> (B, H, ...)."""
    idx = a.view(*a.shape, 1, *([1] * (t.dim() - 3))).expand(*a.shape, 1, *t.shape[3:])
    return t.gather(2, idx).squeeze(2)


def _per_centroid(t: torch.Tensor, clusters: int) -> torch.Tensor:
    """Chunk rows (B, H, n, D) seen by every centroid: (B, H, C, n, D)."""
    return t[:, :, None].expand(-1, -1, clusters, -1, -1)


def _take(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """rows (B, H, C, M, D) at idx (B, H, C, K) -> (B, H, C, K, D)."""
    return rows.gather(3, idx[..., None].expand(*idx.shape, rows.shape[-1]))


class LearnedCentroids(torch.nn.Module):
    """Per-head query centroids for causal clustered attention, learned across batches.

    Buffers (saved in the state dict): ``value`` (H, C, D) the centroids, ``usage`` (H, C) the
    moving share of queries each one gets, ``ready`` whether they were initialized. The first
    batch seeds them by Hamming k-means of its queries (as the encoder form clusters); every
    training batch's ``update`` moves each used centroid towards the mean of its queries
    (``value ← decay·value + (1 − decay)·mean``) and re-seeds centroids whose usage fell below
    1 % of an even share with random queries of the batch. The forward records the update and
    the batch's backward applies it (``commit``, from a gradient hook; at once when the forward
    ran without gradients), so no output depends on its own batch, and a forward recomputed by
    activation checkpointing (which runs inside the backward, before the hook) sees the same
    centroids as the first pass. Under DDP the buffers of rank 0 are broadcast at each
    forward, as for batch-norm statistics.
    """

    value: torch.Tensor
    usage: torch.Tensor
    ready: torch.Tensor

    def __init__(
        self, heads: int, clusters: int, dim: int, *, decay: float, bits: int, iterations: int
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"centroid_decay={decay!r} must be in [0, 1)")
        self.decay, self.bits, self.iterations = decay, bits, iterations
        self.register_buffer("value", torch.zeros(heads, clusters, dim))
        self.register_buffer("usage", torch.full((heads, clusters), 1.0 / clusters))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _pooled(q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, H, N, D) queries -> (H, valid B·N, D) in fp32, padding dropped."""
        b, h, n, d = q.shape
        rows = q.detach().transpose(0, 1).reshape(h, b * n, d).float()
        return rows if mask is None else rows[:, ~mask.reshape(-1)]

    @torch.no_grad()
    def initialize(self, q: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Seed the centroids with Hamming k-means of these queries (B, H, N, D)."""
        rows = self._pooled(q, mask)
        m = rows.shape[1]
        clusters = self.value.shape[1]
        if m == 0:
            raise ValueError("cannot initialize the centroids from a batch without queries")
        used = min(clusters, m)
        assign, _ = hamming_kmeans(hash_codes(rows, self.bits), used, self.iterations)
        value = rows[:, torch.randint(m, (clusters,), device=rows.device)]  # extra: random rows
        value[:, :used] = _centroids(rows, assign, used, None)
        self.value.copy_(value)
        self.usage.fill_(1.0 / clusters)
        self.ready.fill_(True)

    def straight_through(
        self, q: torch.Tensor, assign: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The centroids (B, H, C, D) with the gradient of the encoder form.

        Forward value: the learned centroids. Backward: each centroid's gradient is shared
        equally by the queries assigned to it in this sequence, as if it were their mean
        (the encoder form's centroid), so the query projection trains.
        """
        b, h, n, d = q.shape
        clusters = self.value.shape[1]
        valid = None if mask is None else (~mask)[:, None, :].expand(b, h, n).reshape(b * h, n)
        means = _centroids(q.reshape(b * h, n, d), assign.reshape(b * h, n), clusters, valid)
        means = means.view(b, h, clusters, d)
        return self.value.to(q.dtype) + (means - means.detach())

    def commit_after_backward(self, centroids: torch.Tensor) -> None:
        """Apply the recorded update once the gradient of ``centroids`` (this batch's
        straight-through centroids) is computed; at once if it needs no gradient."""
        if not centroids.requires_grad:
            self.commit()
            return

        def hook(grad: torch.Tensor) -> None:
            self.commit()

        centroids.register_hook(hook)

    @torch.no_grad()
    def commit(self) -> None:
        """Apply the update recorded by the last ``update`` (no-op when there is none)."""
        if self._pending is not None:
            value, usage = self._pending
            self.value.copy_(value)
            self.usage.copy_(usage)
            self._pending = None

    @torch.no_grad()
    def update(self, q: torch.Tensor, assign: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Record one moving-average step towards this batch's cluster means (re-seeding
        unused centroids); ``commit`` applies it."""
        rows = self._pooled(q, mask)
        h, m, d = rows.shape
        if m == 0:
            return
        b, _, n = assign.shape
        a = assign.transpose(0, 1).reshape(h, b * n)
        if mask is not None:
            a = a[:, ~mask.reshape(-1)]
        clusters = self.value.shape[1]
        counts = rows.new_zeros(h, clusters).scatter_add_(1, a, rows.new_ones(h, m))
        sums = rows.new_zeros(h, clusters, d).scatter_add_(1, a[..., None].expand(-1, -1, d), rows)
        means = sums / counts.clamp_min(1.0)[..., None]
        value = self.value.float()
        moved = self.decay * value + (1.0 - self.decay) * means
        value = torch.where(counts[..., None] > 0, moved, value)
        usage = self.decay * self.usage + (1.0 - self.decay) * counts / m
        dead = usage < 0.01 / clusters
        if bool(dead.any()):
            seeds = rows[:, torch.randint(m, (clusters,), device=rows.device)]
            value = torch.where(dead[..., None], seeds, value)
            usage = torch.where(dead, torch.full_like(usage, 1.0 / clusters), usage)
        self._pending = (value.to(self.value.dtype), usage)
