"""SLM-is: importance sampling of clustered generic data toward a specialist domain.

w(c) = P(c | specific) / P(c | generic) per cluster c, with P(c | specific) the cluster
histogram of the in-domain sample and P(c | generic) the clusters' share of the generic
training windows. Resampling generic windows with probability proportional to w(c(x))
gives a stream whose cluster histogram is P(c | specific) and whose windows inside a
cluster stay uniform; :func:`importance_sampler` draws exactly that distribution directly
(a cluster with probability w(c) P(c | generic), then a uniform window of it), which costs
no rejected draws.
"""

from __future__ import annotations

import torch

from verger.core.data import DomainSampler
from verger.expert_soups.config import check_domain_weights
from verger.expert_soups.domains import ClusteredCorpus


def importance_weights(specific: torch.Tensor, generic: torch.Tensor) -> torch.Tensor:
    """w(c) = P(c | specific) / P(c | generic), 0 where the specialist has no mass.

    Both are cluster histograms (points of the simplex of the same length). A cluster the
    specialist uses but the generic data lacks cannot be resampled: ``ValueError``.
    """
    k = len(generic)
    p_spec = check_domain_weights(specific, k, what="P(c | specific)").double()
    p_gen = check_domain_weights(generic, k, what="P(c | generic)").double()
    missing = (p_spec > 0) & (p_gen == 0)
    if bool(missing.any()):
        raise ValueError(
            f"clusters {missing.nonzero().flatten().tolist()} carry specialist mass but no "
            "generic data: they cannot be importance-sampled"
        )
    w = torch.zeros_like(p_spec)
    keep = p_spec > 0
    w[keep] = p_spec[keep] / p_gen[keep]
    return w


def resampled_histogram(weights: torch.Tensor, generic: torch.Tensor) -> torch.Tensor:
    """The cluster histogram of generic data resampled with ``weights``: w P / sum(w P)."""
    mass = weights.double() * generic.double()
    if not float(mass.sum()) > 0:
        raise ValueError("the importance weights give the generic data no mass")
    return (mass / mass.sum()).float()


def importance_sampler(
    clusters: ClusteredCorpus, specific: torch.Tensor, *, batch_size: int, seed: int
) -> DomainSampler:
    """Batches of generic windows resampled toward ``specific`` (SLM-is's pretraining data)."""
    generic = clusters.natural_weights()
    weights = importance_weights(specific, generic)
    return clusters.sampler(resampled_histogram(weights, generic), batch_size=batch_size, seed=seed)
