"""``TransformerLM``: a GPT-style decoder-only language model with pluggable attention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import verger.core.nn.attention  # noqa: F401  (registers "softmax")
from verger.core.kernels import linear_cross_entropy
from verger.core.nn import flops as _flops
from verger.core.nn import generation as _generation
from verger.core.nn import io as _io
from verger.core.nn.config import TransformerConfig
from verger.core.nn.layers import Block, SwiGLU, make_norm

IGNORE_INDEX = -100


@dataclass
class LMCache:
    """Per-layer attention caches and the number of positions they hold."""

    layers: list[Any]
    seq_len: int


@dataclass
class LMOutput:
    """``logits`` [B, T, V] (None when a loss was asked without ``return_logits``), the mean
    token ``loss`` (None without targets) and the ``cache`` (None unless ``use_cache``)."""

    logits: Tensor | None
    loss: Tensor | None
    cache: LMCache | None


def _check_ids(name: str, ids: object, vocab: int, *, allow_ignore: bool) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"TransformerLM: {name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"TransformerLM: {name} has dtype {ids.dtype}; allowed: int64, int32")
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"TransformerLM: {name} must be [batch, seq>0], got {tuple(ids.shape)}")
    bad = (ids < 0) | (ids >= vocab)
    if allow_ignore:
        bad &= ids != IGNORE_INDEX
    if bool(bad.any()):
        extra = f" or {IGNORE_INDEX}" if allow_ignore else ""
        raise ValueError(
            f"TransformerLM: {name} holds {ids[bad][0].item()}; allowed: [0, {vocab}){extra}"
        )
    return ids


class TransformerLM(nn.Module):
    """Decoder-only LM: ``embed`` -> ``blocks`` (each ``attn_norm, attn, mlp_norm, mlp``) ->
    ``norm`` -> ``lm_head`` (tied to ``embed`` when ``config.tie_embeddings``).

    Weights start from N(0, init_std); the residual output projections (``attn.o_proj``
    when present and ``mlp.w_down``) are scaled by 1/sqrt(2 n_layers) as in GPT-2.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"TransformerLM: config must be a TransformerConfig, got {config!r}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        residual_std = config.init_std / math.sqrt(2 * config.n_layers)
        for block in self.blocks:
            out_proj = getattr(block.attn, "o_proj", None)
            for layer in (out_proj, block.mlp.w_down if isinstance(block.mlp, SwiGLU) else None):
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
            bias = getattr(module, "bias", None)
            if isinstance(bias, Tensor):
                nn.init.zeros_(bias)

    def hidden_states(
        self, input_ids: Tensor, *, cache: LMCache | None = None, use_cache: bool = False
    ) -> tuple[Tensor, LMCache | None]:
        """Final-norm hidden states ``[B, T, d_model]`` (the lm_head input) and the cache."""
        cfg = self.config
        _check_ids("input_ids", input_ids, cfg.vocab_size, allow_ignore=False)
        if cache is not None and not isinstance(cache, LMCache):
            raise TypeError(f"TransformerLM: cache must be an LMCache or None, got {type(cache)}")
        if cache is not None and len(cache.layers) != len(self.blocks):
            raise ValueError(
                f"TransformerLM: cache has {len(cache.layers)} layers, the model {len(self.blocks)}"
            )
        start = cache.seq_len if cache is not None else 0
        if start + input_ids.shape[1] > cfg.max_seq_len:
            raise ValueError(
                f"TransformerLM: {start} cached + {input_ids.shape[1]} new positions exceed "
                f"max_seq_len={cfg.max_seq_len}"
            )
        layer_caches = cache.layers if cache is not None else [None] * len(self.blocks)
        x = self.dropout(self.embed(input_ids))
        new_caches = []
        for block, layer_cache in zip(self.blocks, layer_caches):
            x, layer_cache = block(x, cache=layer_cache, use_cache=use_cache, start_pos=start)
            new_caches.append(layer_cache)
        new = LMCache(new_caches, start + input_ids.shape[1]) if use_cache else None
        return self.norm(x), new

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        cache: LMCache | None = None,
        use_cache: bool = False,
        return_logits: bool = False,
    ) -> LMOutput:
        """Run the model on ``input_ids`` [B, T] (int64/int32).

        With ``targets`` [B, T] (``-100`` = ignored) the loss is the mean token cross-entropy;
        when ``config.fused`` it comes from the chunked linear + cross-entropy and the logits
        are not materialized (``logits`` is None unless ``return_logits``).
        """
        h, new_cache = self.hidden_states(input_ids, cache=cache, use_cache=use_cache)
        logits = loss = None
        if targets is not None:
            _check_ids("targets", targets, self.config.vocab_size, allow_ignore=True)
            if targets.shape != input_ids.shape:
                raise ValueError(
                    f"TransformerLM: targets {tuple(targets.shape)} must match input_ids "
                    f"{tuple(input_ids.shape)}"
                )
            if self.config.fused:
                loss = linear_cross_entropy(
                    h, self.lm_head.weight, targets, ignore_index=IGNORE_INDEX
                )
            else:
                logits = self.lm_head(h)
                loss = F.cross_entropy(
                    logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
                )
        if targets is None or return_logits:
            logits = logits if logits is not None else self.lm_head(h)
        else:
            logits = None  # one contract for fused and plain models
        return LMOutput(logits=logits, loss=loss, cache=new_cache)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Distinct parameters (a tied weight counts once); ``non_embedding`` drops the token
        embedding and an untied ``lm_head`` (the Kaplan et al. convention)."""
        seen = {id(p): p for p in self.parameters()}
        if non_embedding:
            seen.pop(id(self.embed.weight), None)
            seen.pop(id(self.lm_head.weight), None)
        return sum(p.numel() for p in seen.values())

    def flops_per_token(self, seq_len: int, training: bool = True) -> int:
        """Analytic matmul FLOPs per token; see :func:`verger.core.nn.flops.flops_per_token`."""
        return _flops.flops_per_token(self.config, seq_len, training=training)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Extend ``input_ids`` [B, T] by ``max_new_tokens`` tokens with the KV cache.

        ``greedy`` takes the argmax; otherwise tokens are sampled from
        ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely when given.
        Returns ``[B, T + max_new_tokens]``. Runs in eval mode, restoring the mode after.
        """
        return _generation.generate(
            self, input_ids, max_new_tokens,
            temperature=temperature, top_k=top_k, greedy=greedy, generator=generator,
        )  # fmt: skip

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (atomically)."""
        return _io.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, device: str | torch.device = "cpu"
    ) -> TransformerLM:
        """Rebuild a model saved by :meth:`save_pretrained` (its attention must be registered)."""
        return _io.load_pretrained(cls, directory, device=device)
