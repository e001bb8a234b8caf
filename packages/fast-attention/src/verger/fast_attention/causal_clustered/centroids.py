"""Centroids of causal clustered attention: their checks, the nearest-centroid assignment,
and ``LearnedCentroids``, the module state that learns them across training batches."""

from __future__ import annotations

from typing import Any

import torch

from verger.fast_attention.clustered import _centroids
from verger.fast_attention.feature_maps import compute_dtype
from verger.fast_attention.ops.clustering import hamming_kmeans, hash_codes


def check_centroids(centroids: torch.Tensor, b: int, h: int, d: int) -> torch.Tensor:
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
    c = check_centroids(centroids, b, h, d).to(compute_dtype(q.dtype))
    dots = torch.matmul(q.to(c.dtype), c.mT)  # (B, H, N, C)
    return (c.square().sum(-1)[:, :, None, :] - 2 * dots).argmin(-1)


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
        # ``ready`` mirrored on the host: reading the buffer of a GPU module at every forward
        # would wait for the stream; None = not known (after a state-dict load)
        self._ready_host: bool | None = False

    def is_ready(self) -> bool:
        """Whether the centroids were initialized (reads the buffer at most once per load)."""
        # getattr: a module pickled by an earlier version has no mirror yet
        if getattr(self, "_ready_host", None) is None:
            self._ready_host = bool(self.ready)
        return bool(self._ready_host)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ready_host = None  # the loaded ``ready`` decides

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
        self._ready_host = True

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
        # re-seed the unused: the seeds are drawn every time, so no host test of `dead` has to
        # wait for the GPU
        dead = usage < 0.01 / clusters
        seeds = rows[:, torch.randint(m, (clusters,), device=rows.device)]
        value = torch.where(dead[..., None], seeds, value)
        usage = torch.where(dead, torch.full_like(usage, 1.0 / clusters), usage)
        self._pending = (value.to(self.value.dtype), usage)
