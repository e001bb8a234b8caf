"""SwiGLU gating, the specification: silu(gate) * up = gate * sigmoid(gate) * up, in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Elementwise ``silu(gate) * up``; the result has ``gate``'s dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
