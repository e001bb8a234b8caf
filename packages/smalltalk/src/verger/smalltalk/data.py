"""Sequences: fixed windows of one corpus domain, with their domain labels, saved as safetensors.

A SmallTalk corpus is a set of sequences, each ``seq_len + 1`` tokens (inputs and shifted
targets) cut from one domain's token stream (documents joined with ``eos``), so a routing
prefix never straddles two domains. :func:`prepare_data` builds the embedded corpus, the
tokenizer and the train/validation :class:`SequenceSet` once into a model folder's ``data/``;
every later step (EM, sharding, each expert job, evaluation) reads those files.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from verger.core.data import ByteTokenizer, PackedDataset, Tokenizer, load_tokenizer
from verger.core.files import atomic_write_bytes, atomic_write_json

DATA_DIR = "data"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "validation")


@dataclass
class SequenceSet:
    """``tokens`` ``[N, seq_len + 1]`` (int16 or int32), ``domains`` int64 ``[N]`` indexing
    ``domain_names`` (-1: unknown), ``ids`` int64 ``[N]``: each row's index in the set it
    was cut from (kept through :meth:`subset`, so a shard knows its sequences)."""

    tokens: torch.Tensor
    domains: torch.Tensor
    domain_names: list[str]
    ids: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.shape[1] < 2:
            raise ValueError(
                f"SequenceSet: tokens must be [N, seq_len + 1 >= 2], got {tuple(self.tokens.shape)}"
            )
        if self.tokens.is_floating_point():
            raise TypeError(f"SequenceSet: tokens must be integers, got {self.tokens.dtype}")
        n = self.tokens.shape[0]
        for name in ("domains", "ids"):
            value = getattr(self, name)
            if value.shape != (n,):
                raise ValueError(f"SequenceSet: {name} must be [{n}], got {tuple(value.shape)}")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        """Tokens per sequence fed to a model (each row holds one more: the last target)."""
        return int(self.tokens.shape[1]) - 1

    def subset(self, index: torch.Tensor) -> SequenceSet:
        """The rows ``index`` (their ``ids`` kept)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return SequenceSet(
            self.tokens[index], self.domains[index], list(self.domain_names), self.ids[index]
        )

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` int64 ``[len(index), seq_len]`` of the rows ``index``."""
        rows = self.tokens[torch.as_tensor(index, dtype=torch.long)].long()
        return rows[:, :-1], rows[:, 1:]

    def domain_counts(self) -> dict[str, int]:
        """Sequences per domain name."""
        counts = torch.bincount(self.domains[self.domains >= 0], minlength=len(self.domain_names))
        return {name: int(c) for name, c in zip(self.domain_names, counts)}

    def save(self, path: str | Path) -> None:
        """One safetensors file (atomic), domain names in its metadata."""
        tensors = {"tokens": self.tokens.contiguous(), "domains": self.domains, "ids": self.ids}
        meta = {"domain_names": json.dumps(self.domain_names)}
        atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> SequenceSet:
        """Read a file written by :meth:`save`; a clear error when missing or damaged."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
            names = json.loads(meta["domain_names"])
            return cls(tensors["tokens"], tensors["domains"], names, tensors["ids"])
        except (SafetensorError, KeyError, ValueError, OSError) as exc:
            raise ValueError(f"{path} is damaged or not a sequence file ({exc})") from None

    def fingerprint(self) -> str:
        """A short hash of the tokens (what a shard index or an expert was built from)."""
        digest = hashlib.sha256(self.tokens.contiguous().numpy().tobytes())
        digest.update(self.ids.numpy().tobytes())
        return digest.hexdigest()[:16]


def windows(
    streams: dict[str, torch.Tensor], seq_len: int, domain_names: Sequence[str]
) -> SequenceSet:
    """Cut each domain's stream into windows of ``seq_len + 1`` tokens with stride
    ``seq_len`` (as :class:`verger.core.data.PackedDataset`); streams too short are skipped."""
    parts, labels = [], []
    max_id = max((int(t.max()) for t in streams.values() if t.numel()), default=0)
    dtype = torch.int16 if max_id < 2**15 else torch.int32
    for name, stream in streams.items():
        if stream.numel() < seq_len + 1:
            continue
        packed = PackedDataset(stream, seq_len)
        idx = torch.arange(len(packed))
        x, y = packed.batch(idx)
        parts.append(torch.cat([x, y[:, -1:]], dim=1).to(dtype))
        labels.append(torch.full((len(packed),), list(domain_names).index(name)))
    if not parts:
        raise ValueError(
            f"no domain holds seq_len + 1 = {seq_len + 1} tokens: lower seq_len or add data"
        )
    tokens = torch.cat(parts)
    return SequenceSet(
        tokens, torch.cat(labels).long(), list(domain_names), torch.arange(len(tokens))
    )


def heldout_halves(seqs: SequenceSet) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tune, test)`` row indices: each domain's windows cut in two contiguous halves.

    The windows of a domain follow its token stream, so the halves share at most the one
    document that straddles the cut: learning rates picked on ``tune`` are judged on
    ``test``, text neither the picking nor the training saw. Rows of unknown domain go to
    ``test``."""
    tune, test = [], []
    for d in range(len(seqs.domain_names)):
        rows = torch.nonzero(seqs.domains == d).flatten()
        tune.append(rows[: len(rows) // 2])
        test.append(rows[len(rows) // 2 :])
    test.append(torch.nonzero(seqs.domains < 0).flatten())
    return torch.cat(tune).sort().values, torch.cat(test).sort().values


def _tokenizer_for(config: Any, texts: list[str]) -> Tokenizer:
    if config.tokenizer == "byte":
        return ByteTokenizer()
    from verger.core.data import train_bpe

    return train_bpe(texts, vocab_size=config.vocab_size)


def prepare_data(
    config: Any, folder: str | Path, *, rebuild_corpus: bool = False, progress: bool | None = None
) -> tuple[Tokenizer, dict[str, SequenceSet]]:
    """Build (or load, when already built with the same settings) ``<folder>/data/``.

    ``config`` is a :class:`verger.smalltalk.config.SmallTalkConfig`. Writes the tokenizer,
    ``train.safetensors``, ``validation.safetensors`` and, last, ``manifest.json``.
    Corpus sources missing here are skipped with a warning (the stdlib domains always work).
    """
    from verger.core.data import build_corpus, tokenize_corpus

    settings = {
        "domains": list(config.domains),
        "max_bytes_per_domain": config.max_bytes_per_domain,
        "tokenizer": config.tokenizer,
        "vocab_size": config.vocab_size if config.tokenizer == "bpe" else None,
        "seq_len": config.seq_len,
    }
    loaded = load_data(folder, expect=settings)
    if loaded is not None:
        return loaded
    corpus = build_corpus(
        data_dir=config.data_dir,
        domains=list(config.domains),
        max_bytes_per_domain=config.max_bytes_per_domain,
        fetch=config.fetch,
        rebuild=rebuild_corpus,
        progress=progress,
    )
    texts, _ = corpus.all_documents("train")
    tokenizer = _tokenizer_for(config, texts)
    sets = {}
    for split in SPLITS:
        streams = tokenize_corpus(corpus, tokenizer, split)
        sets[split] = windows(streams, config.seq_len, corpus.domains)
    save_data(folder, tokenizer, sets, settings=settings, corpus=corpus.manifest.get("settings"))
    missing = [d for d in config.domains if d not in corpus.domains]
    if missing:
        warnings.warn(f"corpus domains {missing} are not available here", stacklevel=2)
    return tokenizer, sets


def save_data(
    folder: str | Path,
    tokenizer: Tokenizer,
    sets: dict[str, SequenceSet],
    *,
    settings: dict[str, Any],
    corpus: dict[str, Any] | None = None,
) -> None:
    """Write ``<folder>/data/``: the tokenizer, one file per split, then the manifest (last:
    a manifest that exists marks complete data). Any :class:`SequenceSet` works (tests write
    synthetic languages this way)."""
    out = Path(folder) / DATA_DIR
    tokenizer.save(out / TOKENIZER_FILE)
    for split, seqs in sets.items():
        seqs.save(out / f"{split}.safetensors")
    manifest = {
        "settings": settings,
        "corpus": corpus or {},
        "vocab_size": tokenizer.vocab_size,
        "sequences": {split: len(s) for split, s in sets.items()},
        "by_domain": {split: s.domain_counts() for split, s in sets.items()},
        "fingerprints": {split: s.fingerprint() for split, s in sets.items()},
    }
    atomic_write_json(out / MANIFEST_FILE, manifest)


def load_data(
    folder: str | Path, *, expect: dict[str, Any] | None = None, splits: Sequence[str] = SPLITS
) -> tuple[Tokenizer, dict[str, SequenceSet]] | None:
    """The data of a model folder, or None when it was not built (or built otherwise, when
    ``expect`` gives the settings it must have been built with)."""
    out = Path(folder) / DATA_DIR
    manifest_path = out / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if expect is not None and manifest.get("settings") != expect:
        return None
    tokenizer = load_tokenizer(out / TOKENIZER_FILE)
    return tokenizer, {split: SequenceSet.load(out / f"{split}.safetensors") for split in splits}


def data_manifest(folder: str | Path) -> dict[str, Any]:
    """``data/manifest.json`` of a model folder (a clear error when data was not prepared)."""
    path = Path(folder) / DATA_DIR / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the model folder's data is not prepared (run train-routers)"
        )
    return json.loads(path.read_text(encoding="utf-8"))
