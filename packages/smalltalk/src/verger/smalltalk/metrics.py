"""How well routing recovers the corpus's domains, and perplexity bookkeeping."""

from __future__ import annotations

import math
from typing import Any

import torch


def routing_purity(
    experts: torch.Tensor, domains: torch.Tensor, num_experts: int, num_domains: int
) -> dict[str, Any]:
    """Purity of an assignment against known domain labels (both int ``[N]``).

    ``purity``: the fraction of sequences whose expert's majority domain is their own (1: every
    expert holds one domain; 1/E-ish for a random split). ``by_domain[d]``: the fraction of
    domain ``d``'s sequences that went to its most common expert (1: the domain is not split).
    ``confusion[e][d]``: sequence counts.
    """
    if experts.shape != domains.shape or experts.ndim != 1 or experts.numel() == 0:
        raise ValueError(
            f"routing_purity: experts {tuple(experts.shape)} and domains "
            f"{tuple(domains.shape)} must be the same non-empty [N]"
        )
    pairs = experts.long() * num_domains + domains.long()
    confusion = torch.bincount(pairs, minlength=num_experts * num_domains)
    confusion = confusion.reshape(num_experts, num_domains)
    per_domain = confusion.sum(dim=0)
    by_domain = [
        float(confusion[:, d].max() / per_domain[d]) if per_domain[d] > 0 else math.nan
        for d in range(num_domains)
    ]
    return {
        "purity": float(confusion.max(dim=1).values.sum()) / experts.numel(),
        "by_domain": by_domain,
        "confusion": confusion.tolist(),
    }


def perplexity(total_nll: float, tokens: int) -> float:
    """``exp(total_nll / tokens)``."""
    if tokens <= 0:
        raise ValueError(f"perplexity: tokens={tokens} must be > 0")
    return math.exp(total_nll / tokens)
