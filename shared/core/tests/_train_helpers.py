"""A toy LM and a resumable toy data stream for the training tests (no core-models needed)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ToyLM(nn.Module):
    """Embedding -> dropout -> tied head, returning the mean cross-entropy (uses RNG: dropout)."""

    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, like TransformerLM

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.mix(self.embed(x))))
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), y.flatten())


class ToyStream:
    """Endless random (input, target) batches; resumable through state_dict()."""

    def __init__(self, seed: int = 0, batch: int = 4, seq: int = 8, vocab: int = 32) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.batch, self.seq, self.vocab = batch, seq, vocab
        self.position = 0

    def __iter__(self) -> ToyStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(self.vocab, (self.batch, self.seq + 1), generator=self.gen)
        self.position += 1
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.position = state["position"]
