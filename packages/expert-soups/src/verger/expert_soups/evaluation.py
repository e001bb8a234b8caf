"""Specialist tasks and their losses: held-out samples of corpus domains and of mixtures.

A :class:`SpecialistTask` is a target the soup never saw as such: a named corpus domain
(``code``, ``music``...) or a random mixture of them. It is known through a small in-domain
sample (whole training documents, cut to an exact token budget), from which the domain
weights h over the clusters are estimated and on which every model is fine-tuned; it is
judged on the held-out validation documents of its domains (the mixture's loss is the
weighted mean of its domains' losses).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from verger.core.data import Corpus, PackedDataset, Tokenizer, tokenize_documents
from verger.core.validation import integer
from verger.expert_soups.domains import ClusteredCorpus, pack


@dataclass
class SpecialistTask:
    """A target: its corpus-domain ``mixture``, in-domain ``sample_texts`` and their first
    ``sample_tokens.numel()`` tokens, and ``h`` (cluster weights estimated from the sample)."""

    name: str
    mixture: dict[str, float]
    sample_texts: list[str]
    sample_tokens: torch.Tensor
    h: torch.Tensor

    def loss(self, domain_losses: Mapping[str, float]) -> float:
        """The task's validation loss from its domains' losses (mixture-weighted mean)."""
        return sum(w * domain_losses[d] for d, w in self.mixture.items())


def _sample(
    docs: Sequence[str], budget: int, tokenizer: Tokenizer, rng: np.random.Generator
) -> tuple[list[str], torch.Tensor]:
    """Whole documents in random order until ``budget`` tokens, cut to exactly ``budget``."""
    order = rng.permutation(len(docs))
    texts, pieces, total = [], [], 0
    for i in order:
        ids = tokenize_documents([docs[int(i)]], tokenizer)
        texts.append(docs[int(i)])
        pieces.append(ids)
        total += ids.numel()
        if total >= budget:
            break
    tokens = torch.cat(pieces)[:budget]
    return texts, tokens


def random_mixtures(
    domains: Sequence[str], count: int, *, support: int = 2, seed: int = 0
) -> list[dict[str, float]]:
    """``count`` mixtures of ``support`` distinct domains with Dirichlet(1) weights (2 decimals)."""
    rng = np.random.default_rng(seed)
    support = min(support, len(domains))
    mixtures = []
    for _ in range(count):
        chosen = sorted(rng.choice(len(domains), support, replace=False).tolist())
        w = np.clip(np.round(rng.dirichlet(np.ones(support)), 2), 0.05, None)
        w = w / w.sum()
        mixtures.append({domains[i]: float(x) for i, x in zip(chosen, w)})
    return mixtures


def build_tasks(
    corpus: Corpus,
    clusters: ClusteredCorpus,
    tokenizer: Tokenizer,
    *,
    domains: Sequence[str],
    n_mixtures: int,
    sample_tokens: int,
    seed: int = 0,
) -> list[SpecialistTask]:
    """One task per corpus domain in ``domains`` plus ``n_mixtures`` random mixtures; each
    with an in-domain sample of ``sample_tokens`` training tokens and its estimated h."""
    integer("sample_tokens", sample_tokens, at_least=2)
    integer("n_mixtures", n_mixtures, at_least=0)
    unknown = [d for d in domains if d not in corpus.domains]
    if unknown:
        raise ValueError(f"unknown corpus domain(s) {unknown}; available: {corpus.domains}")
    mixtures: list[dict[str, float]] = [{d: 1.0} for d in domains]
    mixtures += random_mixtures(list(domains), n_mixtures, seed=seed + 1)
    tasks = []
    for t, mixture in enumerate(mixtures):
        rng = np.random.default_rng([seed, t])
        texts: list[str] = []
        pieces = []
        for d, w in mixture.items():
            budget = max(1, round(w * sample_tokens))
            part_texts, part = _sample(corpus.documents(d, "train"), budget, tokenizer, rng)
            texts += part_texts
            pieces.append(part)
        name = (
            next(iter(mixture))
            if len(mixture) == 1
            else "mix:" + "+".join(f"{d}{w:.2f}" for d, w in mixture.items())
        )
        tokens = torch.cat(pieces)[:sample_tokens]
        tasks.append(SpecialistTask(name, mixture, texts, tokens, clusters.weights_of(texts)))
    return tasks


@dataclass
class ValidationSet:
    """Held-out windows of each corpus domain (at most ``max_windows``, evenly spaced)."""

    windows: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def build(
        cls,
        corpus: Corpus,
        tokenizer: Tokenizer,
        *,
        domains: Sequence[str],
        seq_len: int,
        max_windows: int,
    ) -> ValidationSet:
        integer("max_windows", max_windows, at_least=1)
        windows = {}
        for d in domains:
            docs = corpus.documents(d, "validation")
            if not docs:
                raise ValueError(f"corpus domain {d!r} has no validation documents")
            data: PackedDataset = pack(tokenize_documents(docs, tokenizer), seq_len)
            index = torch.linspace(0, len(data) - 1, min(max_windows, len(data))).round().long()
            windows[d] = data.batch(index.unique())
        return cls(windows)

    def tokens(self, domain: str) -> int:
        return self.windows[domain][1].numel()


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    windows: tuple[torch.Tensor, torch.Tensor],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> float:
    """Mean token cross-entropy (nats) of ``model`` on ``windows`` (evaluated in eval mode)."""
    was_training = model.training
    model.eval()
    inputs, targets = windows
    total = 0.0
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = targets[start : start + batch_size].to(device)
        total += float(model(x, y).loss) * y.numel()
    model.train(was_training)
    return total / targets.numel()


def domain_losses(
    model: nn.Module,
    val: ValidationSet,
    domains: Sequence[str],
    *,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """``{domain: mean validation loss}`` of ``model`` for each of ``domains``."""
    return {d: mean_loss(model, val.windows[d], device=device) for d in domains}
