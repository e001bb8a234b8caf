"""A fast test task: synthetic Markov "languages" and a tiny mixture trained in seconds.

Each language moves from a token to one of two language-specific successors, so a short
prefix tells the languages apart and a router can recover them (the routing-purity test).
Used by the tests and by multi-process checks (worker processes import it by name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from verger.core.data import ByteTokenizer
from verger.smalltalk.config import SmallTalkConfig
from verger.smalltalk.data import SequenceSet, save_data

VOCAB = 32  # synthetic token ids 0..31 (the byte tokenizer's vocabulary covers them)


def markov_languages(num_languages: int, seed: int = 0) -> torch.Tensor:
    """``[L, V, V]`` transition matrices: each language moves from a token to one of 2
    language-specific successors, so a few tokens tell the languages apart."""
    gen = torch.Generator().manual_seed(seed)
    tables = torch.zeros(num_languages, VOCAB, VOCAB)
    for lang in range(num_languages):
        for token in range(VOCAB):
            successors = torch.randperm(VOCAB, generator=gen)[:2]
            tables[lang, token, successors] = torch.tensor([0.75, 0.25])
    return tables


def sample_sequences(
    tables: torch.Tensor, per_language: int, length: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [L * per_language, length], language [L * per_language])``."""
    gen = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for lang in range(tables.shape[0]):
        x = torch.randint(VOCAB, (per_language,), generator=gen)
        seq = [x]
        for _ in range(length - 1):
            x = torch.multinomial(tables[lang, x], 1, generator=gen).squeeze(1)
            seq.append(x)
        rows.append(torch.stack(seq, dim=1))
        labels.append(torch.full((per_language,), lang))
    return torch.cat(rows).to(torch.int16), torch.cat(labels)


def synthetic_sets(
    num_languages: int = 4, per_language: int = 96, seq_len: int = 32, seed: int = 0
) -> dict[str, SequenceSet]:
    """Train and validation :class:`SequenceSet` of distinct synthetic languages."""
    tables = markov_languages(num_languages, seed)
    names = [f"lang{i}" for i in range(num_languages)]
    out = {}
    for split, count, offset in (("train", per_language, 1), ("validation", per_language // 4, 2)):
        tokens, labels = sample_sequences(tables, count, seq_len + 1, seed + offset)
        out[split] = SequenceSet(tokens, labels.long(), names, torch.arange(len(tokens)))
    return out


def toy_config(**overrides: Any) -> SmallTalkConfig:
    """A :class:`SmallTalkConfig` small enough to train in seconds on one thread."""
    fields: dict[str, Any] = dict(
        seq_len=32,
        prefix_len=12,
        num_experts=4,
        router_d_model=16,
        router_layers=1,
        router_heads=2,
        router_mlp_hidden=32,
        em_rounds=8,
        em_steps_per_round=25,
        em_sequences=128,
        router_batch_size=16,
        router_lr=2e-2,
        router_warmup=5,
        d_model=16,
        n_layers=1,
        n_heads=2,
        mlp_hidden=32,
        expert_steps=12,
        batch_size=8,
        lr=5e-3,
        warmup_steps=2,
        checkpoint_every=4,
        score_batch_size=64,
    )
    fields.update(overrides)
    return SmallTalkConfig(**fields)


def write_model_folder(folder: Path, config: SmallTalkConfig, sets: dict[str, SequenceSet]) -> None:
    """``config.json`` and ``data/`` of a model folder holding ``sets`` (byte tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder)
    save_data(folder, ByteTokenizer(), sets, settings={"synthetic": True})


def build_toy_mixture(
    folder: Path, config: SmallTalkConfig | None = None, *, seed: int = 0, dense: bool = True
) -> tuple[SmallTalkConfig, dict[str, SequenceSet]]:
    """Routers, shards, every expert and the dense baseline, all in this process."""
    from verger.smalltalk.experts import train_expert
    from verger.smalltalk.routers import load_routers, routers_fingerprint, train_routers
    from verger.smalltalk.sharding import shard_corpus

    config = config or toy_config()
    sets = synthetic_sets(num_languages=config.num_experts, seq_len=config.seq_len)
    write_model_folder(folder, config, sets)
    train_routers(config, sets["train"], folder, vocab_size=257, seed=seed, show_progress=False)
    shard_corpus(
        config,
        folder,
        routers=load_routers(folder, config.num_experts),
        train=sets["train"],
        routers_fingerprint=routers_fingerprint(folder, config.num_experts),
        show_progress=False,
    )
    for e in [*range(config.num_experts), *(["dense"] if dense else [])]:
        train_expert(folder, e, seed=seed, show_progress=False)
    return config, sets
