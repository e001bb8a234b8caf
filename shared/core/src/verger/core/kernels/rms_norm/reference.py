"""RMSNorm, the specification: y = x / sqrt(mean(x^2, -1) + eps) * weight, computed in fp32.

The output has x's dtype; the weight may have another dtype (fp32 master weights under
autocast). No Triton import here.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalize the last dimension of ``x`` and scale it by ``weight``."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)
