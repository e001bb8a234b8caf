"""Batched scoring: prefix log-likelihoods for routing, per-token losses for perplexity.

A sequence's routing score under a router LM is ``log p(x_2..x_M | x_1)``: the prefix's
``M - 1`` next-token log-probabilities, summed (the first token has no context; it is the
same for every router, so the argmax over routers is the paper's ``argmax_e log p(x_1..M)``).
Scoring runs under ``torch.no_grad`` (not inference mode: the rotary tables a model caches
on its first call must stay usable for training) on batches of prefixes, through the hidden states and the
chunked ``linear_cross_entropy`` (the ``[tokens, vocab]`` logits are never materialized).
"""

from __future__ import annotations

import torch

from verger.core.kernels import linear_cross_entropy
from verger.core.nn import TransformerLM
from verger.core.validation import positive_int


def _check_tokens(tokens: object, need: int, what: str) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{what}: tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise TypeError(f"{what}: tokens must hold integer ids, got {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"{what}: tokens must be [N > 0, length], got {tuple(tokens.shape)}")
    if tokens.shape[1] < need:
        raise ValueError(
            f"{what}: a prefix of {need} tokens is longer than the sequences "
            f"({tokens.shape[1]} tokens)"
        )
    return tokens


@torch.no_grad()
def token_losses(model: TransformerLM, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihoods (fp32 ``[B, T]``) of ``targets`` given ``inputs``."""
    weight = model.lm_head.weight
    hidden, _ = model.hidden_states(inputs.long())
    return linear_cross_entropy(hidden, weight, targets.long(), reduction="none")


@torch.no_grad()
def prefix_scores(
    model: TransformerLM,
    tokens: torch.Tensor,
    prefix_len: int,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``log p(x_2..x_M | x_1)`` of every row's first ``M = prefix_len`` tokens (fp32 ``[N]``).

    ``tokens``: ``[N, >= M]`` integer ids (extra columns are ignored). Runs ``batch_size``
    rows per forward pass on ``device`` (default: the model's); returns CPU scores.
    """
    positive_int("batch_size", batch_size)
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 2:
        raise ValueError(f"prefix_scores: prefix_len={prefix_len!r} must be an int >= 2")
    _check_tokens(tokens, prefix_len, "prefix_scores")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(tokens.shape[0], dtype=torch.float32)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            rows = tokens[start : start + batch_size, :prefix_len].to(device).long()
            losses = token_losses(model, rows[:, :-1], rows[:, 1:])
            out[start : start + rows.shape[0]] = -losses.sum(dim=1).float().cpu()
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def score_matrix(
    routers: list[TransformerLM],
    tokens: torch.Tensor,
    prefix_len: int,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[N, len(routers)]``: every row's prefix score under every router (column = router)."""
    return torch.stack(
        [
            prefix_scores(r, tokens, prefix_len, batch_size=batch_size, device=device)
            for r in routers
        ],
        dim=1,
    )
