"""One generated token of causal clustered attention from its recurrent state."""

from __future__ import annotations

import torch

from verger.fast_attention._checks import check_positive_int
from verger.fast_attention.causal_clustered.centroids import check_centroids
from verger.fast_attention.causal_clustered.state import ClusteredAttentionState, empty_state
from verger.fast_attention.feature_maps import compute_dtype
from verger.fast_attention.ops.rescaled_scan import NEG_INF


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
    c = check_centroids(centroids, b, h, d)
    dtype = compute_dtype(q_t.dtype)
    if state is None:
        if topk is not None:
            check_positive_int("topk", topk)
        check_positive_int("chunk_size", chunk_size)
        state = empty_state(
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
    ok = e_logits != NEG_INF
    w = torch.exp(e_logits - mu[..., None])  # 0 where not ok
    scores = torch.matmul(e_keys, q[..., None]).squeeze(-1) * state.scale
    p = torch.softmax(scores.masked_fill(~ok, NEG_INF), -1)
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
