"""Autoregressive decoding with the KV cache: greedy, temperature and top-k sampling."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from verger.core.nn.model import TransformerLM


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row of ``logits`` [B, V]; returns [B, 1]."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def generate(
    model: TransformerLM,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """See :meth:`TransformerLM.generate`."""
    cfg = model.config
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be an int >= 0")
    if not greedy and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"generate: temperature={temperature!r} must be > 0 (or greedy=True)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k={top_k!r} must be a positive int or None")
    if input_ids.ndim != 2:
        raise ValueError(f"generate: input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
    if input_ids.shape[1] + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"generate: {input_ids.shape[1]} prompt + {max_new_tokens} new tokens exceed "
            f"max_seq_len={cfg.max_seq_len}"
        )
    if max_new_tokens == 0:
        return input_ids
    was_training = model.training
    model.eval()
    try:
        tokens = [input_ids]
        h, cache = model.hidden_states(input_ids, use_cache=True)
        for step in range(max_new_tokens):
            logits = model.lm_head(h[:, -1])  # only the last position is needed
            nxt = sample_next(
                logits, temperature=temperature, top_k=top_k, greedy=greedy, generator=generator
            ).to(input_ids.dtype)
            tokens.append(nxt)
            if step + 1 < max_new_tokens:
                h, cache = model.hidden_states(nxt, cache=cache, use_cache=True)
    finally:
        model.train(was_training)
    return torch.cat(tokens, dim=1)
