"""Domains as clusters: k k-means clusters of a corpus's documents, each a token dataset.

The soup's domains (and the clusters of "Plan Early") are not the corpus's named sources but
clusters of document embeddings (verger-core's ``KMeansClusterer``: hashed TF-IDF + SVD +
k-means). Each cluster's documents are tokenized and packed into training windows; the
weights h of a specialist are the histogram of the nearest centroids of a small in-domain
sample (``estimate_domain_weights``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from verger.core.data import (
    DomainSampler,
    KMeansClusterer,
    PackedDataset,
    Tokenizer,
    estimate_domain_weights,
    tokenize_documents,
)
from verger.core.files import atomic_write_json
from verger.core.validation import finite_number, integer, one_of
from verger.expert_soups.config import domain_names

CLUSTERER_NAME = "clusterer.npz"
ASSIGNMENTS_NAME = "assignments.json"


def pack(tokens: torch.Tensor, seq_len: int) -> PackedDataset:
    """Windows of ``seq_len + 1`` tokens; a stream shorter than one window is tiled first (a
    tiny cluster or in-domain sample still yields a window, its tokens repeated)."""
    if tokens.numel() == 0:
        raise ValueError("cannot pack an empty token stream")
    if tokens.numel() < seq_len + 1:
        tokens = tokens.repeat(-(-(seq_len + 1) // tokens.numel()))
    return PackedDataset(tokens, seq_len)


@dataclass
class ClusteredCorpus:
    """The training documents grouped into k clusters, each packed into windows.

    ``names[i]`` names cluster i (``c00``...), ``datasets[name]`` holds its windows,
    ``token_counts[i]`` its training tokens (before any tiling), ``assignments[j]`` the
    cluster of document j of the texts it was built from.
    """

    clusterer: KMeansClusterer
    names: tuple[str, ...]
    datasets: dict[str, PackedDataset]
    token_counts: torch.Tensor
    assignments: np.ndarray
    seq_len: int
    tokenizer: Tokenizer

    @classmethod
    def build(
        cls,
        texts: Sequence[str],
        *,
        n_clusters: int,
        tokenizer: Tokenizer,
        seq_len: int,
        seed: int = 0,
        fit_documents: int | None = None,
        embed_dim: int = 64,
        clusterer: KMeansClusterer | None = None,
    ) -> ClusteredCorpus:
        """Cluster ``texts`` (fitting on at most ``fit_documents`` of them, drawn with
        ``seed``; all when None) and pack each cluster; a fitted ``clusterer`` skips the fit."""
        integer("n_clusters", n_clusters, at_least=1)
        integer("seq_len", seq_len, at_least=1)
        if not texts:
            raise ValueError("texts is empty: nothing to cluster")
        if clusterer is None:
            fit_texts: Sequence[str] = texts
            if fit_documents is not None and fit_documents < len(texts):
                integer("fit_documents", fit_documents, at_least=n_clusters)
                pick = np.random.default_rng(seed).choice(len(texts), fit_documents, replace=False)
                fit_texts = [texts[i] for i in sorted(pick)]
            clusterer = KMeansClusterer(n_clusters, dim=embed_dim, seed=seed).fit(fit_texts)
        elif clusterer.n_clusters != n_clusters:
            raise ValueError(
                f"the clusterer has {clusterer.n_clusters} clusters, n_clusters={n_clusters}"
            )
        assignments = np.asarray(clusterer.predict(texts))
        return cls.from_assignments(
            texts, assignments, clusterer, tokenizer=tokenizer, seq_len=seq_len
        )

    @classmethod
    def from_assignments(
        cls,
        texts: Sequence[str],
        assignments: np.ndarray,
        clusterer: KMeansClusterer,
        *,
        tokenizer: Tokenizer,
        seq_len: int,
    ) -> ClusteredCorpus:
        """Pack ``texts`` into the clusters given by ``assignments`` (one per text)."""
        k = clusterer.n_clusters
        if len(assignments) != len(texts):
            raise ValueError(f"{len(assignments)} assignments for {len(texts)} texts")
        names = domain_names(k)
        datasets, counts = {}, []
        for i, name in enumerate(names):
            docs = [t for t, a in zip(texts, assignments) if a == i]
            if not docs:
                raise ValueError(
                    f"cluster {name} received no document: use fewer clusters than "
                    f"n_clusters={k} for {len(texts)} documents"
                )
            tokens = tokenize_documents(docs, tokenizer)
            counts.append(tokens.numel())
            datasets[name] = pack(tokens, seq_len)
        return cls(
            clusterer=clusterer,
            names=names,
            datasets=datasets,
            token_counts=torch.tensor(counts, dtype=torch.float64),
            assignments=np.asarray(assignments, dtype=np.int64),
            seq_len=seq_len,
            tokenizer=tokenizer,
        )

    @property
    def n_clusters(self) -> int:
        return len(self.names)

    def natural_weights(self) -> torch.Tensor:
        """Each cluster's share of the training tokens (the generic data distribution)."""
        return (self.token_counts / self.token_counts.sum()).float()

    def uniform_weights(self) -> torch.Tensor:
        """1/k per cluster (the mean of a symmetric meta-distribution)."""
        return torch.full((self.n_clusters,), 1.0 / self.n_clusters)

    def weights_of(
        self, texts: Sequence[str], *, by: str = "tokens", smoothing: float = 0.0
    ) -> torch.Tensor:
        """Domain weights h of a small in-domain sample: its nearest-centroid histogram.

        ``by="tokens"`` counts each document by its tokens, the unit the soup's mixtures
        and the losses are measured in (a sample of many short documents of one cluster
        and a few long ones of another is mostly the second); ``by="documents"`` counts
        documents (verger-core's ``estimate_domain_weights``).
        """
        one_of("by", by, ("tokens", "documents"))
        if by == "documents":
            return estimate_domain_weights(list(texts), self.clusterer, smoothing=smoothing)
        return token_histogram(texts, self.clusterer, self.tokenizer, smoothing=smoothing)

    def sampler(
        self, weights: torch.Tensor | Sequence[float], *, batch_size: int, seed: int
    ) -> DomainSampler:
        """A core ``DomainSampler`` over the clusters: a cluster with probability h_i, then a
        uniformly random window of it."""
        return DomainSampler(self.datasets, weights, batch_size=batch_size, seed=seed)

    def composition(
        self, labels: Sequence[int], label_names: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Rows ``{cluster, tokens, <label>: documents}``: what each cluster is made of."""
        rows = []
        for i, name in enumerate(self.names):
            row: dict[str, Any] = {"cluster": name, "tokens": int(self.token_counts[i])}
            members = np.asarray(labels)[self.assignments == i]
            for j, label in enumerate(label_names):
                row[label] = int((members == j).sum())
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> None:
        """Write the fitted clusterer and the document assignments (atomically)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.clusterer.save(out / CLUSTERER_NAME)
        atomic_write_json(out / ASSIGNMENTS_NAME, {"assignments": self.assignments.tolist()})

    @classmethod
    def load(
        cls,
        directory: str | Path,
        texts: Sequence[str],
        *,
        tokenizer: Tokenizer,
        seq_len: int,
    ) -> ClusteredCorpus:
        """Rebuild from :meth:`save`'s files and the same ``texts`` (no refit)."""
        src = Path(directory)
        clusterer = KMeansClusterer.load(src / CLUSTERER_NAME)
        try:
            assignments = np.asarray(
                json.loads((src / ASSIGNMENTS_NAME).read_text())["assignments"]
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{src / ASSIGNMENTS_NAME} is missing or corrupt ({exc})") from None
        return cls.from_assignments(
            texts, assignments, clusterer, tokenizer=tokenizer, seq_len=seq_len
        )


def token_histogram(
    texts: Sequence[str],
    clusterer: KMeansClusterer,
    tokenizer: Tokenizer,
    *,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """The nearest-centroid histogram of ``texts``, each counted by its tokens (+ eos)."""
    if not texts:
        raise ValueError("texts is empty: need at least one in-domain text")
    finite_number("smoothing", smoothing, at_least=0)
    sizes = [len(tokenizer.encode(t)) + 1 for t in texts]  # + eos, as packed
    counts = np.bincount(
        clusterer.predict(list(texts)), weights=sizes, minlength=clusterer.n_clusters
    ).astype(np.float64)
    counts += smoothing
    return torch.from_numpy(counts / counts.sum()).float()


def named_weights(
    h: torch.Tensor, names: Sequence[str], *, top: int | None = None
) -> Mapping[str, float]:
    """The non-zero entries of h by name, largest first (``top`` of them when given)."""
    order = torch.argsort(h, descending=True).tolist()
    pairs = [(names[i], round(float(h[i]), 4)) for i in order if h[i] > 0]
    return dict(pairs[:top] if top else pairs)
