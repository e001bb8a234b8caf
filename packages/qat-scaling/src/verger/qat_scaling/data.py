"""The sweep's data: verger-core's embedded corpus, tokenized and packed, batches by step.

Every batch is a pure function of ``(seed, step)``: a branch that starts from the trunk's
checkpoint at step ``p`` sees exactly the batches an unbranched run would, a fused and an
unfused run of the same length train on the same tokens, and a resumed run needs only the
step to continue. Validation uses fixed windows per domain.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from verger.core.data import (
    ByteTokenizer,
    DomainSampler,
    PackedDataset,
    build_corpus,
    tokenize_corpus,
    train_bpe,
)
from verger.core.validation import integer

DEFAULT_DOMAINS = ("code", "docs", "music")


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Corpus, tokenizer and batch shape.

    ``bpe_vocab_size=None`` uses bytes (257 tokens: the embedding stays small next to the
    quantized layers of a tiny model); an int trains a BPE of that size on the training
    split. ``domains`` are verger-core corpus domains, mixed uniformly.
    """

    domains: tuple[str, ...] = DEFAULT_DOMAINS
    max_bytes_per_domain: int = 1_000_000
    bpe_vocab_size: int | None = None
    seq_len: int = 64
    batch_size: int = 16
    val_batches: int = 16
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.domains, tuple)
            or not self.domains
            or not all(isinstance(d, str) for d in self.domains)
        ):
            raise ValueError(f"domains={self.domains!r} must be a non-empty tuple of names")
        integer("max_bytes_per_domain", self.max_bytes_per_domain, at_least=10_000)
        integer("seq_len", self.seq_len, at_least=8)
        integer("batch_size", self.batch_size, at_least=1)
        integer("val_batches", self.val_batches, at_least=1)
        if self.bpe_vocab_size is not None:
            integer("bpe_vocab_size", self.bpe_vocab_size, at_least=300, at_most=65536)

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["domains"] = list(self.domains)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        fields = dict(data)
        fields["domains"] = tuple(fields.get("domains", DEFAULT_DOMAINS))
        return cls(**fields)


@dataclass
class LMData:
    """Packed training and validation windows per domain, and the vocabulary size."""

    train: dict[str, PackedDataset]
    val: dict[str, PackedDataset]
    vocab_size: int
    config: DataConfig

    def batches(self, seed: int, start_step: int = 0) -> StepBatches:
        return StepBatches(self, seed, start_step)

    def val_batches(self, domain: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ds = self.val[domain]
        size = self.config.batch_size
        n = min(len(ds), self.config.val_batches * size)
        return [ds.batch(torch.arange(s, min(s + size, n))) for s in range(0, n, size)]


@functools.lru_cache(maxsize=4)
def load_data(config: DataConfig) -> LMData:
    """Build (cached on disk by verger-core, and per process here) the tokenized corpus."""
    if not isinstance(config, DataConfig):
        raise TypeError(f"config must be a DataConfig, got {type(config).__name__}")
    corpus = build_corpus(
        domains=list(config.domains),
        max_bytes_per_domain=config.max_bytes_per_domain,
        data_dir=config.data_dir,
        progress=False,
    )
    if config.bpe_vocab_size is None:
        tokenizer: Any = ByteTokenizer()
    else:
        texts, _ = corpus.all_documents("train")
        tokenizer = train_bpe(texts, vocab_size=config.bpe_vocab_size)
    splits = {}
    for split in ("train", "validation"):
        tokens = tokenize_corpus(corpus, tokenizer, split)
        splits[split] = {
            d: PackedDataset(t, config.seq_len)
            for d, t in tokens.items()
            if t.numel() > config.seq_len
        }
    domains = sorted(set(splits["train"]) & set(splits["validation"]))
    if not domains:
        raise ValueError(f"no domain of {config.domains} has text here; check the corpus sources")
    return LMData(
        train={d: splits["train"][d] for d in domains},
        val={d: splits["validation"][d] for d in domains},
        vocab_size=tokenizer.vocab_size,
        config=config,
    )


class StepBatches:
    """Endless ``(inputs, targets)`` training batches, batch ``s`` drawn with a generator
    seeded by ``(seed, s)`` from the uniform domain mixture (verger-core's sampler).

    ``state_dict()`` is the next step, so :class:`verger.core.train.TrainLoop` checkpoints
    the data position with the model.
    """

    def __init__(self, data: LMData, seed: int, start_step: int = 0) -> None:
        self.data = data
        self.seed = seed
        self.step = start_step
        self._sampler = DomainSampler(
            data.train, {d: 1.0 for d in data.train}, batch_size=data.config.batch_size
        )

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._sampler.generator.manual_seed((self.seed * 1_000_003 + step) % (2**63))
        inputs, targets, _ = self._sampler.sample()
        return inputs, targets

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            batch = self.batch(self.step)
            self.step += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
