"""The meta-distribution over h and the mixture stream: frequencies (chi-square), resume."""

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from verger.expert_soups import MetaDistributionConfig
from verger.expert_soups.mixture import MetaDistribution
from verger.expert_soups.training import soup_stream


def _chi2_ok(observed, expected, p=1e-3):
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    keep = expected > 0
    assert observed[~keep].sum() == 0, "mass where none is expected"
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    return stat < chi2.ppf(1 - p, keep.sum() - 1)


def test_meta_distribution_support_and_simplex():
    meta = MetaDistribution(MetaDistributionConfig(support_size=3, concentration=0.5), 10, seed=0)
    draws = torch.stack([meta.sample() for _ in range(3000)])
    assert torch.allclose(draws.sum(1), torch.ones(3000))
    assert bool(((draws > 0).sum(1) == 3).all())
    # each domain is in the support with probability 3/10
    assert _chi2_ok((draws > 0).sum(0), np.full(10, 3000 * 3 / 10))
    # symmetric Dirichlet on the support: mean weight 1/3
    assert float(draws[draws > 0].mean()) == pytest.approx(1 / 3, abs=0.01)


def test_support_range_and_size_proportional_support():
    ranged = MetaDistribution(MetaDistributionConfig(support_size=1, max_support_size=4), 6, seed=1)
    sizes = [int((ranged.sample() > 0).sum()) for _ in range(2000)]
    assert _chi2_ok(np.bincount(sizes, minlength=5)[1:], np.full(4, 500))
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    by_size = MetaDistribution(
        MetaDistributionConfig(support_size=1, support="size"), 4, sizes=weights, seed=2
    )
    picks = [int(by_size.sample().argmax()) for _ in range(4000)]
    assert _chi2_ok(np.bincount(picks, minlength=4), 4000 * weights / weights.sum())


def test_meta_distribution_errors():
    with pytest.raises(ValueError, match="exceed the 3 domains"):
        MetaDistribution(MetaDistributionConfig(support_size=4), 3)
    with pytest.raises(ValueError, match="needs sizes"):
        MetaDistribution(MetaDistributionConfig(support="size"), 3)
    with pytest.raises(ValueError, match="concentration"):
        MetaDistributionConfig(concentration=0)
    with pytest.raises(ValueError, match="max_support_size"):
        MetaDistributionConfig(support_size=3, max_support_size=2)
    with pytest.raises(ValueError, match="support"):
        MetaDistributionConfig(support="random")


def test_mixture_stream_frequencies_match_h(synthetic):
    clusters = synthetic[0]
    stream = soup_stream(
        clusters, MetaDistributionConfig(support_size=2), batch_size=24, seed=0, groups=2
    )
    observed, expected = np.zeros(3), np.zeros(3)
    for _ in range(400):
        inputs, targets, h, domains = stream.next()
        assert h.shape == (2, 3) and inputs.shape == targets.shape == (24, 16)
        for g in range(2):  # rows of group g come from mix(h_g)
            observed += np.bincount(domains[g * 12 : (g + 1) * 12].numpy(), minlength=3)
            expected += 12 * h[g].numpy()
    assert _chi2_ok(observed, expected)
    # the windows of a row come from the cluster it names
    row = int((domains == 1).nonzero()[0])
    window = clusters.datasets["c01"].tokens
    text = window.unfold(0, 17, 1)
    assert bool((text[:, :16] == inputs[row]).all(1).any())


def test_mixture_stream_resumes_exactly(synthetic):
    clusters = synthetic[0]
    meta = MetaDistributionConfig(support_size=1, max_support_size=3)
    a = soup_stream(clusters, meta, batch_size=4, seed=3, micro_batches=2)
    for _ in range(5):
        a.next()
    state = a.state_dict()
    tail = [a.next() for _ in range(6)]
    b = soup_stream(clusters, meta, batch_size=4, seed=3, micro_batches=2)
    b.load_state_dict(state)
    for x, y in zip(tail, (b.next() for _ in range(6))):
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    # micro-batches of one step share their h, consecutive steps draw new ones
    c = soup_stream(clusters, meta, batch_size=4, seed=3, micro_batches=2)
    hs = [c.next()[2] for _ in range(4)]
    assert torch.equal(hs[0], hs[1]) and torch.equal(hs[2], hs[3])
    assert not torch.equal(hs[1], hs[2])
    with pytest.raises(ValueError, match="multiple of groups"):
        soup_stream(clusters, meta, batch_size=5, seed=0, groups=2)
