"""Real corpora for users with internet: Hugging Face ``datasets`` (streaming) as a Corpus.

Nothing here runs by default; it is the code path for e.g. the Pile
(``load_hf_dataset("monology/pile-uncopyrighted", domain_field="meta.pile_set_name")``) and is
tested on small local JSON Lines files (``load_hf_dataset("json", data_files=...)``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from verger.core.data.corpus import Corpus, split_documents


def _field(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"record has no field {dotted!r} (keys: {sorted(record)})")
        value = value[part]
    return value


def iter_hf_records(
    path: str,
    *,
    name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    domain_field: str | None = None,
    data_files: Any = None,
    streaming: bool = True,
    max_documents: int | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield ``(domain, text)`` from a ``datasets`` dataset (streamed by default).

    ``domain_field`` may be dotted (``"meta.pile_set_name"``); without it every record is in
    domain ``"default"``.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("pip install datasets to load Hugging Face corpora") from exc
    ds = datasets.load_dataset(path, name, split=split, data_files=data_files, streaming=streaming)
    for i, record in enumerate(ds):
        if max_documents is not None and i >= max_documents:
            break
        domain = str(_field(record, domain_field)) if domain_field else "default"
        yield domain, str(_field(record, text_field))


def corpus_from_records(
    records: Iterable[tuple[str, str]],
    *,
    validation_fraction: float = 0.05,
    max_bytes_per_domain: int | None = None,
    chunk_chars: int = 4000,
    min_chars: int = 1,
) -> Corpus:
    """Group ``(domain, text)`` records into a :class:`Corpus` with the embedded corpus's
    cleaning, chunking, deduplication and hash-based split."""
    by_domain: dict[str, list[str]] = defaultdict(list)
    for domain, text in records:
        by_domain[domain].append(text)
    seen: set[str] = set()
    docs = {
        d: split_documents(
            texts,
            validation_fraction=validation_fraction,
            max_bytes=max_bytes_per_domain,
            chunk_chars=chunk_chars,
            min_chars=min_chars,
            seen=seen,
        )
        for d, texts in sorted(by_domain.items())
    }
    return Corpus(docs=docs, manifest={"source": "records"})


def load_hf_dataset(path: str, **kwargs: Any) -> Corpus:
    """A :class:`Corpus` from a Hugging Face dataset: :func:`iter_hf_records` arguments plus
    :func:`corpus_from_records` ones (``validation_fraction``, ``max_bytes_per_domain``...)."""
    corpus_keys = ("validation_fraction", "max_bytes_per_domain", "chunk_chars", "min_chars")
    corpus_kwargs = {k: kwargs.pop(k) for k in corpus_keys if k in kwargs}
    return corpus_from_records(iter_hf_records(path, **kwargs), **corpus_kwargs)
