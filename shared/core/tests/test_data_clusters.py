"""Domains as clusters: embeddings, k-means recovery of known domains, save/load, weights."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from verger.core.data import KMeansClusterer, embed_texts, estimate_domain_weights

WORDS = {
    "code": [
        "def",
        "return",
        "self",
        "import",
        "class",
        "lambda",
        "yield",
        "assert",
        "tensor",
        "module",
        "kwargs",
    ],
    "sea": [
        "wave",
        "tide",
        "ship",
        "sail",
        "harbour",
        "anchor",
        "storm",
        "gull",
        "salt",
        "coral",
        "reef",
    ],
    "farm": [
        "barn",
        "wheat",
        "plough",
        "cattle",
        "harvest",
        "orchard",
        "hay",
        "tractor",
        "goat",
        "silo",
    ],
}


def _texts(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS[domain], k=30)) for _ in range(n)]


def test_embeddings_are_unit_length() -> None:
    z = embed_texts(_texts("sea", 10, 0) + _texts("farm", 10, 1), dim=8)
    assert z.shape == (20, 8) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="method"):
        embed_texts(["a"], method="word2vec")


def test_kmeans_recovers_domains_saves_and_estimates_weights(tmp_path) -> None:
    names = list(WORDS)
    texts, labels = [], []
    for i, name in enumerate(names):
        texts += _texts(name, 40, i)
        labels += [i] * 40
    km = KMeansClusterer(3, dim=16, seed=0).fit(texts)
    pred = km.predict(texts)
    # Purity 1: each true domain maps to exactly one cluster, and the clusters differ.
    mapping = {label: set(pred[np.array(labels) == label]) for label in range(3)}
    assert all(len(s) == 1 for s in mapping.values())
    assert len(set().union(*mapping.values())) == 3

    km.save(tmp_path / "km.npz")
    loaded = KMeansClusterer.load(tmp_path / "km.npz")
    fresh = _texts("sea", 5, 7) + _texts("code", 15, 8)
    assert np.array_equal(loaded.predict(fresh), km.predict(fresh))

    h = estimate_domain_weights(fresh, loaded)
    sea, code = mapping[1].pop(), mapping[0].pop()
    expected = torch.zeros(3)
    expected[sea], expected[code] = 0.25, 0.75
    assert torch.allclose(h, expected)
    smoothed = estimate_domain_weights(fresh, loaded, smoothing=1.0)
    assert float(smoothed.min()) > 0 and float(smoothed.sum()) == pytest.approx(1.0)


def test_clusterer_file_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"none\.npz does not exist.*refit"):
        KMeansClusterer.load(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"bad\.npz is corrupt"):
        KMeansClusterer.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="n_clusters"):
        KMeansClusterer(5).fit(["one text"])
