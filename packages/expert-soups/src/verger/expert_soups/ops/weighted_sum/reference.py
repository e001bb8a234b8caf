"""The weighted sum of a soup, the specification: ``out = base + sum_j alpha_j experts[j]``.

``base`` has any shape P, ``experts`` is ``[n, *P]`` and ``alpha`` is ``[n]``. The sum is
computed in fp32 and returned in ``base``'s dtype. No Triton import here.
"""

from __future__ import annotations

import torch


def weighted_sum_reference(
    base: torch.Tensor, experts: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """``base + sum_j alpha[j] * experts[j]`` (fp32 math, ``base.dtype`` result)."""
    n = experts.shape[0]
    mixed = (alpha.float().reshape(n, *([1] * base.ndim)) * experts.float()).sum(0)
    return (base.float() + mixed).to(base.dtype)
