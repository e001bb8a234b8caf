"""The plain specification of SmallTalk LM's pieces: short loops, no vectorization, for tests.

- :func:`brute_force_assign`: the best capacity-respecting assignment by enumeration.
- :func:`greedy_assign_reference`: the paper's greedy balanced assignment, one row at a time.
- :func:`prefix_log_likelihood_reference`: a sequence's prefix score, one position at a time.
- :func:`route_reference`: inference routing, ``argmax_e log p(x_1..M | router_e)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch


def brute_force_assign(scores: np.ndarray, capacity: Sequence[int]) -> tuple[float, np.ndarray]:
    """The optimal total and one optimal assignment, by trying all ``E^N`` assignments."""
    n, num_experts = scores.shape
    best, best_assignment = -np.inf, None
    for assignment in itertools.product(range(num_experts), repeat=n):
        counts = np.bincount(assignment, minlength=num_experts)
        if (counts > np.asarray(capacity)).any():
            continue
        total = float(sum(scores[i, e] for i, e in enumerate(assignment)))
        if total > best:
            best, best_assignment = total, np.asarray(assignment)
    if best_assignment is None:
        raise ValueError("no assignment fits the capacities")
    return best, best_assignment


def greedy_assign_reference(scores: np.ndarray, capacity: Sequence[int]) -> np.ndarray:
    """The paper's rule: most confident sequence first (largest best score, stable order),
    each to its best expert that still has room (lowest index on ties)."""
    left = list(capacity)
    experts = np.full(scores.shape[0], -1, dtype=np.int64)
    for i in np.argsort(-scores.max(axis=1), kind="stable"):
        ranked = sorted(range(scores.shape[1]), key=lambda e: (-scores[i, e], e))
        for e in ranked:
            if left[e] > 0:
                experts[i] = e
                left[e] -= 1
                break
    return experts


@torch.no_grad()
def prefix_log_likelihood_reference(
    model: torch.nn.Module, window: torch.Tensor, prefix_len: int
) -> float:
    """``log p(x_2..x_M | x_1)`` of one window's first ``M`` tokens, position by position."""
    total = 0.0
    for t in range(1, prefix_len):
        logits = model(window[None, :t]).logits[0, -1].double()
        total += float(torch.log_softmax(logits, dim=-1)[window[t]])
    return total


def route_reference(
    routers: Sequence[torch.nn.Module], window: torch.Tensor, prefix_len: int
) -> int:
    """The expert whose router gives the prefix the highest likelihood (lowest index on ties)."""
    scores = [prefix_log_likelihood_reference(r, window, prefix_len) for r in routers]
    return int(np.argmax(scores))
