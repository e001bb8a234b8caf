"""Linear + cross-entropy, the specification: ``F.cross_entropy(x @ weight.T, targets)``.

Logits are computed in fp32; rows whose target equals ``ignore_index`` contribute nothing and
are left out of the mean (as in ``torch.nn.functional.cross_entropy``). This materializes the
full [tokens, vocab] logits: the fused op exists to avoid that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the logits ``x @ weight.T`` (x [N, D], weight [V, D], targets [N])."""
    logits = x.float() @ weight.float().T
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
