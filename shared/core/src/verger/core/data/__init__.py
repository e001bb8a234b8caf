"""Data: tokenizers, the embedded multi-domain corpus, packed datasets, domain sampling and
domains-as-clusters.

- Tokenizers: :class:`ByteTokenizer`, :func:`gpt2_tokenizer`, :func:`train_bpe`,
  :func:`load_tokenizer` (all follow the :class:`Tokenizer` protocol).
- Corpus: :func:`build_corpus` -> :class:`Corpus` (domains code, docstrings, docs, drama,
  poetry, music; cached under ``$VERGER_DATA``); :func:`load_hf_dataset` for real corpora.
- Tokens: :func:`tokenize_corpus`, :class:`PackedDataset`, :class:`DomainSampler`,
  :func:`validation_batches`.
- Clusters: :func:`embed_texts`, :class:`KMeansClusterer`, :func:`estimate_domain_weights`.

scikit-learn, tokenizers, datasets and music21 are optional (``verger-core[data]``) and
imported only by the functions that need them.
"""

from verger.core.data.clusters import (
    KMeansClusterer,
    TfidfSvdEmbedder,
    embed_texts,
    estimate_domain_weights,
)
from verger.core.data.corpus import (
    Corpus,
    CorpusCacheError,
    EmbeddedCorpus,
    build_corpus,
    chunk_text,
    clean_text,
)
from verger.core.data.hf import corpus_from_records, iter_hf_records, load_hf_dataset
from verger.core.data.packing import (
    DomainSampler,
    PackedDataset,
    tokenize_corpus,
    tokenize_documents,
    validation_batches,
)
from verger.core.data.sources import DEFAULT_DOMAINS, SOURCES, data_dir, fetch_pypi_file
from verger.core.data.tokenization import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    TokenizerFileError,
    gpt2_tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "DEFAULT_DOMAINS",
    "SOURCES",
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "CorpusCacheError",
    "DomainSampler",
    "EmbeddedCorpus",
    "KMeansClusterer",
    "PackedDataset",
    "TfidfSvdEmbedder",
    "Tokenizer",
    "TokenizerFileError",
    "build_corpus",
    "chunk_text",
    "clean_text",
    "corpus_from_records",
    "data_dir",
    "embed_texts",
    "estimate_domain_weights",
    "fetch_pypi_file",
    "gpt2_tokenizer",
    "iter_hf_records",
    "load_hf_dataset",
    "load_tokenizer",
    "tokenize_corpus",
    "tokenize_documents",
    "train_bpe",
    "validation_batches",
]
