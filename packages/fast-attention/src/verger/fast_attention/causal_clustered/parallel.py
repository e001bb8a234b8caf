"""The chunked parallel form of causal clustered attention (training and prefill)."""

from __future__ import annotations

from typing import Literal, overload

import torch
import torch.nn.functional as F

from verger.core.kernels import pick_backend
from verger.fast_attention._checks import check_padding_mask, check_positive_int, check_qkv
from verger.fast_attention.causal_clustered.centroids import assign_to_centroids, check_centroids
from verger.fast_attention.causal_clustered.scans import (
    chunk_prefix,
    merge_softmax,
    prefix_topk,
    softmax_parts,
)
from verger.fast_attention.causal_clustered.state import (
    ClusteredAttentionState,
    empty_state,
    state_from_sequence,
)
from verger.fast_attention.causal_clustered.top_keys import (
    top_histories,
    top_removed,
    top_softmax_parts,
)
from verger.fast_attention.clustered import _rows, _topk_exact_blocked
from verger.fast_attention.feature_maps import compute_dtype
from verger.fast_attention.ops.gathered_attention.triton import MAX_DIM, MAX_KEYS
from verger.fast_attention.ops.rescaled_scan import NEG_INF, safe_shift


def parallel_form(q3, k3, v3, c3, a3, key_pad, topk, chunk, scale, backend):  # type: ignore[no-untyped-def]
    """The chunked parallel form on (G, N, ·) tensors (see the package docstring): the output
    and the centroid logits (G, C, N), which the recurrent state reuses."""
    g, n, d = q3.shape
    nb = -(-n // chunk)
    extra = nb * chunk - n
    kp, vp = F.pad(k3, (0, 0, 0, extra)), F.pad(v3, (0, 0, 0, extra))
    valid = torch.ones(g, n, dtype=torch.bool, device=q3.device) if key_pad is None else ~key_pad
    valid = F.pad(valid, (0, extra), value=False)
    logits = torch.bmm(c3, kp.mT) * scale  # (G, C, nb·L)
    logits = logits.masked_fill(~valid[:, None, :], NEG_INF)
    clusters = c3.shape[1]
    lc = logits.view(g, clusters, nb, chunk)
    vc = vp.view(g, nb, chunk, -1)
    shift, sums, norms = chunk_prefix(lc, vc, backend=backend)

    ap = F.pad(a3, (0, extra))  # padded query rows are dropped at the end
    chunk_of_query = torch.arange(nb, device=q3.device).repeat_interleave(chunk)[None, :]
    group = chunk_of_query * clusters + ap  # (chunk, cluster) of every query
    shift_i = shift.reshape(g, nb * clusters).gather(1, group)  # (G, nb·L)
    sums_i = _rows(sums.reshape(g, nb * clusters, -1), group)
    norms_i = norms.reshape(g, nb * clusters).gather(1, group)
    # each query's centroid logits over its own chunk: (G, nb, L queries, L keys)
    local = lc.transpose(1, 2).gather(2, ap.view(g, nb, chunk, 1).expand(-1, -1, -1, chunk))
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=q3.device).tril()
    local = local.masked_fill_(~tri, NEG_INF)
    mu = torch.maximum(shift_i, local.detach().amax(-1).reshape(g, -1))  # running max through i
    w_local = (local - safe_shift(mu).view(g, nb, chunk, 1)).exp_()
    f = torch.exp(shift_i - safe_shift(mu))  # rescales the chunks before b to the shift mu
    w_sum = w_local.sum(-1).reshape(g, -1)
    inv_z = (f * norms_i + w_sum).clamp_min(1e-30).reciprocal()
    # The (N, Dv) results below are built in as few new tensors as possible (in-place adds
    # into a product autograd does not save): at 16k tokens each new one is a fresh mapping
    # whose page faults cost more on CPU than its arithmetic (see ops/causal_linear/chunked.py).
    if topk is None:  # (f·sums_i + Σ_local w v) / z
        num = torch.matmul(w_local, vc).reshape(g, nb * chunk, -1).addcmul_(sums_i, f[..., None])
        return (num * inv_z[..., None])[:, :n], logits[:, :, :n]

    top_vals, top_idx = prefix_topk(lc.detach(), topk)  # (G, C, nb, K)
    top_ok = torch.isfinite(top_vals)
    qp = F.pad(q3, (0, 0, 0, extra))
    removed_i, removed_z = top_removed(logits, vp, top_idx, top_ok, mu, group)
    if backend == "triton":
        # per (chunk, cluster) group: one gathered product over its top-k and its chunk's
        # keys, with the causal position mask (Triton reads the rows by index, no copies)
        groups = nb * clusters
        top_keys = top_idx.transpose(1, 2).reshape(g, groups, topk)
        top_ok = top_ok.transpose(1, 2).reshape(g, groups, topk)
        chunk_keys = torch.arange(nb * chunk, device=q3.device).view(1, nb, 1, chunk)
        chunk_keys = chunk_keys.expand(g, nb, clusters, chunk).reshape(g, groups, chunk)
        chunk_ok = valid.view(g, nb, 1, chunk).expand(g, nb, clusters, chunk)
        keys = torch.cat((top_keys, chunk_keys), -1)
        keys_ok = torch.cat((top_ok, chunk_ok.reshape(g, groups, chunk)), -1)
        exact = _topk_exact_blocked(qp, kp, vp, group, keys, keys_ok, scale, causal=True)
    else:  # one block per cluster over its top-k history; the chunk's keys densely
        keys, start, end, ok = top_histories(top_idx, top_ok, nb * chunk)
        top_parts = top_softmax_parts(qp, kp, vp, ap, keys, start, end, ok, chunk, scale)
        s_local = torch.matmul(qp.view(g, nb, chunk, d), kp.view(g, nb, chunk, d).mT)
        s_local = s_local.mul_(scale).masked_fill_(~(tri & valid.view(g, nb, 1, chunk)), NEG_INF)
        local_parts = tuple(
            t.reshape(g, nb * chunk, *t.shape[3:]) for t in softmax_parts(s_local, vc)
        )
        exact = merge_softmax(local_parts, tuple(top_parts))  # type: ignore[arg-type]
    # (f·sums_i − removed_i) / z  +  mass · exact, with mass = (removed_z + Σ_local w) / z
    mass = (removed_z + w_sum) * inv_z
    out = sums_i * (f * inv_z)[..., None]
    out.addcmul_(removed_i, inv_z[..., None], value=-1.0).addcmul_(exact, mass[..., None])
    return out[:, :n], logits[:, :, :n]


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
    c = check_centroids(centroids, b, h, d)
    mask = check_padding_mask(key_padding_mask, b, n)
    if assignments is None:
        assignments = assign_to_centroids(q, c)
    elif assignments.shape != q.shape[:3] or assignments.dtype != torch.long:
        raise ValueError(f"assignments must be int64 {tuple(q.shape[:3])}")
    fits = (topk or 0) + chunk_size <= MAX_KEYS and max(d, v.shape[-1]) <= MAX_DIM
    backend = pick_backend(backend, q.device, op="causal_clustered", fits=fits)
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
        empty = empty_state(
            c, v.shape[-1], batch=b, topk=topk, chunk_size=chunk_size, scale=scale, dtype=dtype
        )
        return out, empty
    out3, logits = parallel_form(
        q3, k3, v3, c3, assignments.reshape(g, n), pad, topk, chunk_size, scale, backend
    )
    out = out3.view(b, h, n, -1)
    if mask is not None:
        out = out.masked_fill(mask[:, None, :, None], 0.0)
    out = out.to(v.dtype)
    if not return_state:
        return out
    return out, state_from_sequence(k3, v3, logits, topk, chunk_size, scale, (b, h))
