"""Token datasets: tokenized domains, fixed-length packed sequences, a domain-weighted sampler."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from verger.core.data.corpus import Corpus
from verger.core.data.tokenization import Tokenizer


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer) -> torch.Tensor:
    """Concatenate the token ids of ``docs``, each followed by ``eos``, as one int64 tensor."""
    batch = getattr(tokenizer, "encode_batch", None)
    encoded = batch(list(docs)) if batch is not None else [tokenizer.encode(d) for d in docs]
    ids: list[int] = []
    for e in encoded:
        ids.extend(e)
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.long)


def tokenize_corpus(
    corpus: Corpus, tokenizer: Tokenizer, split: str = "train"
) -> dict[str, torch.Tensor]:
    """``{domain: 1-D token tensor}`` for ``split`` (documents joined with ``eos``)."""
    return {d: tokenize_documents(corpus.documents(d, split), tokenizer) for d in corpus.domains}


class PackedDataset(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens: item ``i`` is ``(input, target)``.

    ``input = tokens[i*L : i*L + L]``, ``target = tokens[i*L + 1 : i*L + L + 1]``; the tail
    that does not fill a window is dropped.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
            raise TypeError("tokens must be a 1-D integer tensor")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r} must be an int >= 1")
        if tokens.numel() < seq_len + 1:
            raise ValueError(
                f"only {tokens.numel()} tokens: need at least seq_len + 1 = {seq_len + 1}"
            )
        self.tokens = tokens.long()
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sequences")
        index %= len(self)
        start = index * self.seq_len
        window = self.tokens[start : start + self.seq_len + 1]
        return window[:-1], window[1:]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked ``(inputs, targets)`` of shape ``[len(indices), seq_len]``."""
        starts = indices.long() * self.seq_len
        offsets = torch.arange(self.seq_len + 1)
        windows = self.tokens[starts[:, None] + offsets[None, :]]
        return windows[:, :-1], windows[:, 1:]


class DomainSampler:
    """Endless batches drawn from a mixture: a domain with probability ``h_i``, then a sequence.

    Each row of a batch draws its own domain (``torch.multinomial`` on ``weights``) and then
    a uniformly random sequence of that domain's :class:`PackedDataset`. Iterating yields
    ``(inputs [B, L], targets [B, L], domain_idx [B])``. The sampler owns its generator, so
    ``state_dict()`` / ``load_state_dict()`` resume the stream exactly.
    """

    def __init__(
        self,
        datasets: Mapping[str, PackedDataset],
        weights: Mapping[str, float] | torch.Tensor | Sequence[float],
        *,
        batch_size: int,
        generator: torch.Generator | None = None,
        seed: int = 0,
    ) -> None:
        if not datasets:
            raise ValueError("datasets must map at least one domain to a PackedDataset")
        self.domains = list(datasets)
        self.datasets = dict(datasets)
        lengths = {d.seq_len for d in self.datasets.values()}
        if len(lengths) != 1:
            raise ValueError(
                f"every PackedDataset must have the same seq_len; got {sorted(lengths)}"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
        self.batch_size = batch_size
        self.weights = self._check_weights(weights)
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        self.batches_drawn = 0

    def _check_weights(self, weights: Any) -> torch.Tensor:
        if isinstance(weights, Mapping):
            missing = [d for d in self.domains if d not in weights]
            extra = [d for d in weights if d not in self.datasets]
            if missing or extra:
                raise ValueError(f"weights: missing domains {missing}, unknown domains {extra}")
            w = torch.tensor([float(weights[d]) for d in self.domains], dtype=torch.float64)
        else:
            w = torch.as_tensor(weights, dtype=torch.float64).flatten()
            if w.numel() != len(self.domains):
                raise ValueError(f"weights has {w.numel()} entries for {len(self.domains)} domains")
        if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights={w.tolist()} must be finite, >= 0 and not all zero")
        return w / w.sum()

    def set_weights(self, weights: Mapping[str, float] | torch.Tensor | Sequence[float]) -> None:
        """Change the mixture ``h`` (e.g. a new draw from a meta-distribution)."""
        self.weights = self._check_weights(weights)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch ``(inputs, targets, domain_idx)``."""
        domain_idx = torch.multinomial(
            self.weights.float(), self.batch_size, replacement=True, generator=self.generator
        )
        seq = self.datasets[self.domains[0]].seq_len
        inputs = torch.empty(self.batch_size, seq, dtype=torch.long)
        targets = torch.empty_like(inputs)
        for i, name in enumerate(self.domains):
            rows = (domain_idx == i).nonzero().flatten()
            if rows.numel() == 0:
                continue
            ds = self.datasets[name]
            picks = torch.randint(len(ds), (rows.numel(),), generator=self.generator)
            x, y = ds.batch(picks)
            inputs[rows], targets[rows] = x, y
        self.batches_drawn += 1
        return inputs, targets, domain_idx

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            yield self.sample()

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "batches_drawn": self.batches_drawn,
            "weights": self.weights.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])
        self.weights = state["weights"].clone()


def validation_batches(
    dataset: PackedDataset, batch_size: int, *, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sequence of ``dataset`` in order, as batches (a fixed per-domain validation set)."""
    n = len(dataset)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    for start in range(0, n, batch_size):
        yield dataset.batch(torch.arange(start, min(start + batch_size, n)))
