"""Packed datasets and the domain-weighted sampler."""

from __future__ import annotations

import pytest
import torch

from verger.core.data import ByteTokenizer, Corpus, DomainSampler, PackedDataset, tokenize_corpus
from verger.core.data.packing import validation_batches


def test_packed_windows_closed_form() -> None:
    ds = PackedDataset(torch.arange(23), seq_len=5)
    assert len(ds) == 4  # (23 - 1) // 5
    x, y = ds[2]
    assert x.tolist() == [10, 11, 12, 13, 14] and y.tolist() == [11, 12, 13, 14, 15]
    bx, by = ds.batch(torch.tensor([3, 0]))
    assert bx[0].tolist() == list(range(15, 20)) and by[1].tolist() == list(range(1, 6))
    assert [b[0].shape[0] for b in validation_batches(ds, 3)] == [3, 1]
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ValueError, match="seq_len"):
        PackedDataset(torch.arange(3), seq_len=5)
    with pytest.raises(TypeError, match="integer"):
        PackedDataset(torch.rand(10), seq_len=2)


def test_tokenize_corpus_joins_documents_with_eos() -> None:
    corpus = Corpus(docs={"a": {"train": ["hi", "yo"], "validation": ["x"]}})
    tokens = tokenize_corpus(corpus, ByteTokenizer(), "train")
    assert tokens["a"].tolist() == [104, 105, 256, 121, 111, 256]


def _domains() -> dict[str, PackedDataset]:
    # Domain i holds tokens in [100 i, 100 i + 99]: a batch row reveals its true domain.
    return {
        name: PackedDataset(torch.arange(100 * i, 100 * i + 99), seq_len=8)
        for i, name in enumerate(["a", "b", "c"])
    }


def test_sampler_frequencies_match_weights_and_rows_match_domains() -> None:
    sampler = DomainSampler(_domains(), {"a": 0.6, "b": 0.3, "c": 0.1}, batch_size=64, seed=1)
    counts = torch.zeros(3)
    for _, (x, y, dom) in zip(range(100), sampler):
        counts += torch.bincount(dom, minlength=3)
        assert torch.equal(x // 100, dom[:, None].expand_as(x))  # each row from its domain
        assert torch.equal(y, x + 1)  # contiguous windows
    freq = counts / counts.sum()
    # 6400 draws: binomial standard deviation <= 0.0062; allow ~4 sigma.
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.025)
    assert sampler.batches_drawn == 100


def test_sampler_resumes_exactly_and_validates() -> None:
    s1 = DomainSampler(_domains(), torch.tensor([1.0, 1.0, 2.0]), batch_size=4, seed=3)
    for _ in range(5):
        s1.sample()
    state = s1.state_dict()
    expected = [s1.sample() for _ in range(3)]
    s2 = DomainSampler(_domains(), [1, 0, 0], batch_size=4, seed=99)
    s2.load_state_dict(state)
    for a, b in zip(expected, (s2.sample() for _ in range(3))):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="unknown domains"):
        DomainSampler(_domains(), {"a": 1, "b": 1, "c": 1, "z": 1}, batch_size=2)
    with pytest.raises(ValueError, match="not all zero"):
        DomainSampler(_domains(), [0, 0, 0], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        DomainSampler(_domains(), [1, 1, 1], batch_size=0)
