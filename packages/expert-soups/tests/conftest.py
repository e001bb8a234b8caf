import torch

from verger.core.testing import setup_triton_interpreter

setup_triton_interpreter()  # before anything defines a Triton kernel
torch.set_num_threads(1)  # tiny models on small shared machines: threads only contend


import numpy as np  # noqa: E402
import pytest  # noqa: E402

TOPICS = 3


def topic_texts(topic: int, count: int, seed: int) -> list[str]:
    """Documents over a topic's own vocabulary (``t<topic>w<j>``): clusters known by design."""
    rng = np.random.default_rng([topic, seed])
    return [" ".join(f"t{topic}w{j}" for j in rng.integers(0, 25, 40)) for _ in range(count)]


@pytest.fixture(scope="session")
def make_topic_texts():
    """``make_topic_texts(topic, count, seed)``: fresh documents of a topic."""
    return topic_texts


@pytest.fixture(scope="session")
def synthetic():
    """A 3-topic corpus clustered into 3 clusters of byte-token windows (seq_len 16)."""
    from verger.core.data import ByteTokenizer
    from verger.expert_soups.domains import ClusteredCorpus

    texts, labels = [], []
    for t in range(TOPICS):
        docs = topic_texts(t, 30, seed=0)
        texts += docs
        labels += [t] * len(docs)
    clusters = ClusteredCorpus.build(
        texts, n_clusters=TOPICS, tokenizer=ByteTokenizer(), seq_len=16, embed_dim=8
    )
    return clusters, texts, labels


@pytest.fixture(scope="session")
def tiny_bench():
    """A Workbench over a 3-domain synthetic corpus (3 clusters, 16-token windows)."""
    from verger.core.data import Corpus
    from verger.expert_soups.workbench import DataSettings, Workbench

    docs = {
        name: {"train": topic_texts(t, 24, seed=0), "validation": topic_texts(t, 4, seed=1)}
        for t, name in enumerate(("a", "b", "c"))
    }
    settings = DataSettings(n_clusters=3, seq_len=16, val_windows=4, fit_documents=None)
    return Workbench.from_corpus(Corpus(docs=docs), settings)
