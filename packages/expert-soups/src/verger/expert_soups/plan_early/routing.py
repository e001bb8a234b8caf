"""SLM-mix: clusters grouped into experts, and each target routed to one expert.

With fewer experts than clusters, the cluster centroids are grouped by k-means (weighted by
the clusters' sizes), so an expert owns clusters that look alike; with as many experts as
clusters each expert owns one (the paper's setting). A target goes to the expert whose
clusters hold most of its histogram.
"""

from __future__ import annotations

import numpy as np
import torch

from verger.core.validation import integer
from verger.expert_soups.config import check_domain_weights


def group_clusters(
    centroids: np.ndarray, sizes: np.ndarray | torch.Tensor, n_groups: int, *, seed: int = 0
) -> np.ndarray:
    """The group (expert) of each of the k clusters: ``[k]`` ints in ``[0, n_groups)``, each
    group non-empty."""
    k = len(centroids)
    integer("n_groups", n_groups, at_least=1)
    if n_groups > k:
        raise ValueError(f"n_groups={n_groups} exceeds the {k} clusters")
    if n_groups == k:
        return np.arange(k)
    from sklearn.cluster import KMeans

    weights = np.asarray(sizes, dtype=np.float64)
    km = KMeans(n_clusters=n_groups, n_init=10, random_state=seed)
    groups = km.fit_predict(np.asarray(centroids, dtype=np.float64), sample_weight=weights)
    if len(np.unique(groups)) != n_groups:  # pragma: no cover - k-means left a group empty
        raise RuntimeError(f"grouping {k} clusters left an expert without clusters")
    return groups.astype(np.int64)


def group_mass(h: torch.Tensor, groups: np.ndarray, n_groups: int) -> torch.Tensor:
    """The histogram h summed per group: ``[n_groups]``."""
    weights = check_domain_weights(h, len(groups), what="target histogram")
    mass = torch.zeros(n_groups, dtype=torch.float64)
    mass.index_add_(0, torch.as_tensor(groups, dtype=torch.long), weights.double())
    return mass


def route(h: torch.Tensor, groups: np.ndarray, n_groups: int) -> int:
    """The expert of a target: the group holding most of its histogram (lowest on ties)."""
    return int(torch.argmax(group_mass(h, groups, n_groups)))
