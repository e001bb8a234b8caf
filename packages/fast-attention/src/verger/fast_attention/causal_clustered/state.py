"""The recurrent state of causal clustered attention: a constant-size summary of the keys
seen so far, built empty or from a whole sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from verger.fast_attention.clustered import _rows
from verger.fast_attention.ops.rescaled_scan import NEG_INF, safe_shift


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


def empty_state(
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
        shift=torch.full((batch, h, clusters), NEG_INF, dtype=dtype, device=dev),
        topk=topk,
        chunk_size=chunk_size,
        scale=scale,
    )
    if topk is not None:
        state.top_logits = torch.full((batch, h, clusters, topk), NEG_INF, dtype=dtype, device=dev)
        state.top_keys = torch.zeros(batch, h, clusters, topk, d, dtype=dtype, device=dev)
        state.top_values = torch.zeros(batch, h, clusters, topk, v_dim, dtype=dtype, device=dev)
        state.chunk_keys = torch.zeros(batch, h, 0, d, dtype=dtype, device=dev)
        state.chunk_values = torch.zeros(batch, h, 0, v_dim, dtype=dtype, device=dev)
        state.chunk_logits = torch.zeros(batch, h, clusters, 0, dtype=dtype, device=dev)
    return state


def state_from_sequence(k3, v3, logits, topk, chunk, scale, shape):  # type: ignore[no-untyped-def]
    """The recurrent state after a whole (G, N, ·) sequence, computed in one pass."""
    b, h = shape
    n = k3.shape[1]
    clusters = logits.shape[1]
    logits = logits.detach()
    shift = logits.amax(-1)
    e = torch.exp(logits - safe_shift(shift)[..., None])
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
    vals = F.pad(vals, (0, topk - vals.shape[-1]), value=NEG_INF)
    idx = F.pad(idx, (0, topk - idx.shape[-1]))
    state.top_logits = vals.view(b, h, clusters, topk)
    state.top_keys = _rows(k3.detach(), idx).view(b, h, clusters, topk, -1)
    state.top_values = _rows(v3.detach(), idx).view(b, h, clusters, topk, -1)
    state.chunk_keys = k3.detach()[:, done:].reshape(b, h, n - done, k3.shape[-1])
    state.chunk_values = v3.detach()[:, done:].reshape(b, h, n - done, v3.shape[-1])
    state.chunk_logits = logits[:, :, done:].reshape(b, h, clusters, n - done)
    return state
