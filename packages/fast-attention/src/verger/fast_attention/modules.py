"""Attention modules with projections, and their registration in verger.core's TransformerLM.

Every module maps (batch, seq, d_model) to the same shape with bias-free ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj`` (the names of verger.core's softmax attention, so packages
that slice or freeze projections by name work on these too) and follows the core plug-in
protocol ``forward(x, *, cache=None, use_cache=False, start_pos=0) -> (y, cache)``.

Registered names (``TransformerConfig(attention=name, attention_options={...})``):
``linear`` (causal linear attention; cache = its recurrent state), ``clustered`` and
``improved_clustered`` (causal forms with learned centroids; cache = their recurrent state).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from verger.fast_attention._checks import check_positive_int
from verger.fast_attention.causal_clustered import (
    ClusteredAttentionState,
    LearnedCentroids,
    assign_to_centroids,
    causal_clustered_attention,
    causal_clustered_attention_step,
)
from verger.fast_attention.clustered import clustered_attention
from verger.fast_attention.feature_maps import FeatureMap, get_feature_map
from verger.fast_attention.linear import (
    LinearAttentionState,
    linear_attention,
    linear_attention_step,
)

__all__ = [
    "CausalLinearAttention",
    "ClusteredAttention",
    "ImprovedClusteredAttention",
    "LinearAttention",
]


class _Projected(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (batch, seq, {self.d_model}), got {tuple(x.shape)}")
        b, t, _ = x.shape
        shape = (b, t, self.n_heads, self.head_dim)
        return tuple(
            p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )  # type: ignore[return-value]

    def _out(self, y: Tensor) -> Tensor:
        b, h, t, d = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, t, h * d))


class LinearAttention(_Projected):
    """Multi-head linear attention (non-causal unless ``causal=True``).

    ``feature_map``: a registered name (``elu``, ``favor``) or a FeatureMap; options for a
    named map go in ``feature_map_options``. Causal modules keep a ``LinearAttentionState``
    cache for O(1)-per-token generation.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        causal: bool = False,
        feature_map: str | FeatureMap = "elu",
        feature_map_options: dict[str, Any] | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(d_model, n_heads)
        self.causal = causal
        self.eps = eps
        self.feature_map = get_feature_map(
            feature_map, self.head_dim, **(feature_map_options or {})
        )

    def forward(
        self,
        x: Tensor,
        *,
        cache: LinearAttentionState | None = None,
        use_cache: bool = False,
        start_pos: int = 0,
        key_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, LinearAttentionState | None]:
        if (cache is not None or use_cache) and not self.causal:
            raise ValueError("cache/use_cache need a causal LinearAttention (causal=True)")
        if cache is not None and not isinstance(cache, LinearAttentionState):
            raise TypeError(f"cache must be a LinearAttentionState, got {type(cache).__name__}")
        _check_no_mask_with_cache(cache, key_padding_mask)
        q, k, v = self._qkv(x)
        if cache is None:
            result = linear_attention(
                q,
                k,
                v,
                causal=self.causal,
                feature_map=self.feature_map,
                key_padding_mask=key_padding_mask,
                eps=self.eps,
                return_state=use_cache,
            )
            y, state = result if use_cache else (result, None)
            return self._out(y), state
        outs = []
        state = cache
        for t in range(q.shape[2]):  # continuing a cached prefix: the RNN form, token by token
            o, state = linear_attention_step(
                q[:, :, t],
                k[:, :, t],
                v[:, :, t],
                state,
                feature_map=self.feature_map,
                eps=self.eps,
            )
            outs.append(o)
        return self._out(torch.stack(outs, 2)), (state if use_cache else None)


class CausalLinearAttention(LinearAttention):
    """``LinearAttention(causal=True)``: the "Transformers are RNNs" decoder attention."""

    def __init__(self, d_model: int, n_heads: int, **options: Any) -> None:
        super().__init__(d_model, n_heads, causal=True, **options)


class ClusteredAttention(_Projected):
    """Multi-head clustered attention (``topk=None``) or improved clustered (``topk`` int).

    Non-causal: the paper's encoder form (``clustered_attention``: Hamming k-means of each
    sequence's queries). ``causal=True``: the decoder form (``causal_clustered_attention``)
    with ``n_clusters`` centroids per head learned across training batches
    (``LearnedCentroids``, moving-average ``centroid_decay``), so position i depends on
    positions ≤ i only; its cache is a constant-size ``ClusteredAttentionState``.
    ``chunk_size``: the causal form's exact local window and top-k granularity.
    ``rotary_max_seq_len`` adds rotary position embeddings to q and k (verger.core's).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        n_clusters: int = 25,
        bits: int = 63,
        iterations: int = 10,
        topk: int | None = None,
        causal: bool = False,
        chunk_size: int = 64,
        centroid_decay: float = 0.99,
        rotary_max_seq_len: int | None = None,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__(d_model, n_heads)
        self.n_clusters = check_positive_int("n_clusters", n_clusters)
        self.bits = check_positive_int("bits", bits)
        self.iterations = check_positive_int("iterations", iterations)
        self.topk = None if topk is None else check_positive_int("topk", topk)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.causal = causal
        self.centroids: LearnedCentroids | None = None
        if causal:
            self.centroids = LearnedCentroids(
                n_heads, n_clusters, self.head_dim, decay=centroid_decay, bits=bits,
                iterations=iterations,
            )  # fmt: skip
        self.rotary: nn.Module | None = None
        if rotary_max_seq_len is not None:
            from verger.core.nn import RotaryEmbedding

            self.rotary = RotaryEmbedding(self.head_dim, rotary_max_seq_len, base=rope_base)

    def _rope(self, t: Tensor, start_pos: int) -> Tensor:
        if self.rotary is None:
            return t
        return self.rotary(t.transpose(1, 2), start_pos).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        *,
        cache: ClusteredAttentionState | None = None,
        use_cache: bool = False,
        start_pos: int = 0,
        key_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, ClusteredAttentionState | None]:
        if (cache is not None or use_cache) and not self.causal:
            raise ValueError("cache/use_cache need causal=True")
        if cache is not None and not isinstance(cache, ClusteredAttentionState):
            raise TypeError(f"cache must be a ClusteredAttentionState, got {type(cache).__name__}")
        q, k, v = self._qkv(x)
        q, k = self._rope(q, start_pos), self._rope(k, start_pos)
        if self.centroids is None:
            y = clustered_attention(
                q, k, v, n_clusters=self.n_clusters, bits=self.bits, iterations=self.iterations,
                topk=self.topk, key_padding_mask=key_padding_mask,
            )  # fmt: skip
            return self._out(y), None
        _check_no_mask_with_cache(cache, key_padding_mask)
        if cache is not None:
            outs, state = [], cache
            for t in range(q.shape[2]):  # continuing a cached prefix: the recurrent form
                o, state = causal_clustered_attention_step(
                    q[:, :, t], k[:, :, t], v[:, :, t], self.centroids.value, state
                )
                outs.append(o)
            return self._out(torch.stack(outs, 2)), (state if use_cache else None)
        return self._causal(q, k, v, key_padding_mask, use_cache)

    def _causal(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, use_cache: bool
    ) -> tuple[Tensor, ClusteredAttentionState | None]:
        learned = self.centroids
        assert learned is not None
        if not learned.is_ready():
            learned.initialize(q, mask)
        assign = assign_to_centroids(q, learned.value)
        if self.training and torch.is_grad_enabled():
            centroids = learned.straight_through(q, assign, mask)
        else:
            centroids = learned.value.clone()  # a later ``commit`` must not touch saved tensors
        result = causal_clustered_attention(
            q, k, v, centroids, topk=self.topk, chunk_size=self.chunk_size,
            key_padding_mask=mask, return_state=use_cache, assignments=assign,
        )  # fmt: skip
        y, state = result if use_cache else (result, None)
        if self.training:  # recorded now, applied by this batch's backward
            learned.update(q, assign, mask)
            learned.commit_after_backward(centroids)
        return self._out(y), state  # type: ignore[arg-type]


class ImprovedClusteredAttention(ClusteredAttention):
    """``ClusteredAttention`` with exact attention on each centroid's ``topk`` keys (default 32)."""

    def __init__(self, d_model: int, n_heads: int, *, topk: int = 32, **options: Any) -> None:
        # None would silently make it plain clustered attention (``ClusteredAttention``)
        super().__init__(d_model, n_heads, topk=check_positive_int("topk", topk), **options)


def _check_no_mask_with_cache(cache: object, key_padding_mask: Tensor | None) -> None:
    """A padding mask describes a prompt; cached steps continue every sequence of the batch."""
    if cache is not None and key_padding_mask is not None:
        raise ValueError(
            "key_padding_mask applies to the prompt (cache=None), not to continuing from a cache"
        )


def register_with_core() -> bool:
    """Register ``linear``, ``clustered`` and ``improved_clustered`` in verger.core's registry.

    Called on import of ``verger.fast_attention``; returns False when verger.core has no LM.
    """
    try:
        from verger.core.nn import register_attention
    except ImportError:  # pragma: no cover - an older verger-core without nn
        return False

    @register_attention("linear", replace=True)
    def _linear(config: Any, layer_index: int) -> nn.Module:
        return CausalLinearAttention(config.d_model, config.n_heads, **config.attention_options)

    @register_attention("clustered", replace=True)
    def _clustered(config: Any, layer_index: int) -> nn.Module:
        options = {"rotary_max_seq_len": config.max_seq_len, "rope_base": config.rope_base}
        return ClusteredAttention(
            config.d_model, config.n_heads, causal=True, **(options | config.attention_options)
        )

    @register_attention("improved_clustered", replace=True)
    def _improved(config: Any, layer_index: int) -> nn.Module:
        options = {"rotary_max_seq_len": config.max_seq_len, "rope_base": config.rope_base}
        return ImprovedClusteredAttention(
            config.d_model, config.n_heads, causal=True, **(options | config.attention_options)
        )

    return True
