"""The check of a point-cloud argument (the numbers and choices use verger.core.validation).

It raises a ``ValueError``/``TypeError`` that names the argument, the value and what is
allowed.
"""

from __future__ import annotations

import torch


def points(name: str, value: object, *, batched: bool | None = None) -> torch.Tensor:
    """A floating tensor ``[..., N, 3]`` with N >= 1 and finite coordinates.

    ``batched=True`` requires ``[B, N, 3]``, ``False`` requires ``[N, 3]``, ``None`` either.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [..., N, 3], got {type(value)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {value.dtype}")
    dims = {True: (3,), False: (2,), None: (2, 3)}[batched]
    if value.dim() not in dims or value.shape[-1] != 3:
        want = {True: "[B, N, 3]", False: "[N, 3]", None: "[N, 3] or [B, N, 3]"}[batched]
        raise ValueError(f"{name} must have shape {want}, got {list(value.shape)}")
    if value.shape[-2] == 0 or value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {list(value.shape)}): need at least one point")
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).any(-1).sum())
        raise ValueError(f"{name} holds {bad} point(s) with NaN or infinite coordinates")
    return value
