"""Clusters of a corpus with known groups, domain weights of a sample, files."""

import numpy as np
import pytest
import torch

from verger.core.data import ByteTokenizer
from verger.expert_soups.domains import ClusteredCorpus, named_weights, pack

TOPICS = 3  # the synthetic fixture's topics


def _topic_to_cluster(clusters, labels):
    labels = np.asarray(labels)
    mapping = {}
    for t in range(TOPICS):
        found = np.unique(clusters.assignments[labels == t])
        assert len(found) == 1, f"topic {t} split over clusters {found}"
        mapping[t] = int(found[0])
    assert sorted(mapping.values()) == list(range(TOPICS)), "two topics share a cluster"
    return mapping


def test_clusters_recover_known_groups(synthetic):
    clusters, texts, labels = synthetic
    mapping = _topic_to_cluster(clusters, labels)
    tok = ByteTokenizer()
    for t, c in mapping.items():
        docs = [x for x, lab in zip(texts, labels) if lab == t]
        expected = sum(len(tok.encode(d)) + 1 for d in docs)  # + eos per document
        assert clusters.token_counts[c] == expected
    assert clusters.names == ("c00", "c01", "c02")
    assert float(clusters.natural_weights().sum()) == pytest.approx(1.0)
    rows = clusters.composition(labels, ["a", "b", "c"])
    assert sum(r["a"] + r["b"] + r["c"] for r in rows) == len(texts)


def test_domain_weights_of_a_sample_are_its_cluster_histogram(synthetic, make_topic_texts):
    clusters, _, labels = synthetic
    mapping = _topic_to_cluster(clusters, labels)
    sample = make_topic_texts(0, 3, 7) + make_topic_texts(2, 1, 7)  # unseen documents
    h = clusters.weights_of(sample, by="documents")
    expected = torch.zeros(TOPICS)
    expected[mapping[0]], expected[mapping[2]] = 0.75, 0.25
    torch.testing.assert_close(h, expected)
    smoothed = clusters.weights_of(sample, by="documents", smoothing=1.0)  # (3+1, 0+1, 1+1) / 7
    assert float(smoothed[mapping[1]]) == pytest.approx(1 / 7)
    # by tokens: one long document outweighs two short ones
    long_doc = " ".join(make_topic_texts(1, 6, 8))
    short = [make_topic_texts(0, 1, 9)[0][:40], make_topic_texts(0, 1, 10)[0][:40]]
    sizes = torch.tensor([len(long_doc.encode()) + 1, 41 + 41], dtype=torch.float64)
    by_tokens = clusters.weights_of([long_doc, *short])
    assert float(by_tokens[mapping[1]]) == pytest.approx(float(sizes[0] / sizes.sum()), rel=1e-6)
    assert float(
        clusters.weights_of([long_doc, *short], by="documents")[mapping[1]]
    ) == pytest.approx(1 / 3)
    assert named_weights(h, clusters.names) == {
        clusters.names[mapping[0]]: 0.75,
        clusters.names[mapping[2]]: 0.25,
    }


def test_save_load_keeps_clusters(synthetic, make_topic_texts, tmp_path):
    clusters, texts, _ = synthetic
    clusters.save(tmp_path)
    again = ClusteredCorpus.load(tmp_path, texts, tokenizer=ByteTokenizer(), seq_len=16)
    assert np.array_equal(again.assignments, clusters.assignments)
    assert torch.equal(again.token_counts, clusters.token_counts)
    probe = make_topic_texts(1, 4, 3)
    assert torch.equal(again.weights_of(probe), clusters.weights_of(probe))


def test_empty_cluster_and_bad_inputs(synthetic):
    clusters, texts, _ = synthetic
    assignments = np.zeros(len(texts), dtype=np.int64)
    with pytest.raises(ValueError, match="cluster c01 received no document"):
        ClusteredCorpus.from_assignments(
            texts, assignments, clusters.clusterer, tokenizer=ByteTokenizer(), seq_len=16
        )
    with pytest.raises(ValueError, match="empty"):
        ClusteredCorpus.build([], n_clusters=2, tokenizer=ByteTokenizer(), seq_len=8)
    with pytest.raises(ValueError, match="n_clusters"):
        ClusteredCorpus.build(texts, n_clusters=0, tokenizer=ByteTokenizer(), seq_len=8)


def test_pack_tiles_a_short_stream():
    data = pack(torch.arange(5), 8)  # 5 tokens tiled to 10 >= 9
    assert len(data) == 1
    x, y = data[0]
    assert x.tolist() == [0, 1, 2, 3, 4, 0, 1, 2] and y.tolist() == [1, 2, 3, 4, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="empty"):
        pack(torch.zeros(0, dtype=torch.long), 4)
