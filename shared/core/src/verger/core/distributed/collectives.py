"""Collectives that count the bytes they move, for communication budgets in papers' units.

Two figures per operation (``ByteCounter.payload`` and ``ByteCounter.wire``):

- payload: the bytes of the tensor this rank hands to the collective (what the papers count
  as "communicated": e.g. one full copy of the pseudo-gradient per all-reduce);
- wire: what a bandwidth-optimal ring algorithm sends from this rank: all-reduce
  ``2 (n-1)/n · B``, all-gather ``(n-1) · B`` (B = this rank's shard), broadcast ``B`` on
  the source (0 elsewhere: receives are not sends), reduce-scatter ``(n-1)/n · B``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from verger.core.distributed.env import get_rank, get_world_size, is_initialized


@dataclass
class ByteCounter:
    """Per-operation tallies of calls, payload bytes and estimated wire bytes sent."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    payload: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wire: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, op: str, payload_bytes: int, wire_bytes: float) -> None:
        self.calls[op] += 1
        self.payload[op] += int(payload_bytes)
        self.wire[op] += float(wire_bytes)

    @property
    def total_payload(self) -> int:
        return sum(self.payload.values())

    @property
    def total_wire(self) -> float:
        return sum(self.wire.values())

    def reset(self) -> None:
        self.calls.clear()
        self.payload.clear()
        self.wire.clear()

    def as_dict(self) -> dict[str, float]:
        """Flat figures for a metrics file: ``<op>_calls``, ``<op>_payload_bytes``, totals."""
        out: dict[str, float] = {}
        for op in self.calls:
            out[f"{op}_calls"] = self.calls[op]
            out[f"{op}_payload_bytes"] = self.payload[op]
            out[f"{op}_wire_bytes"] = self.wire[op]
        out["total_payload_bytes"] = self.total_payload
        out["total_wire_bytes"] = self.total_wire
        return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


_OPS: dict[str, Any] = {
    "sum": dist.ReduceOp.SUM,
    "avg": "avg",
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
}


def all_reduce(
    tensor: torch.Tensor,
    op: str = "sum",
    *,
    group: dist.ProcessGroup | None = None,
    counter: ByteCounter | None = None,
) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` with ``op`` in sum|avg|max|min|product; returns it.

    ``"avg"`` is a sum followed by a division (gloo has no native average). Without a process
    group this is the identity (and counts nothing).
    """
    if op not in _OPS:
        raise ValueError(f"op={op!r} must be one of {sorted(_OPS)}")
    n = get_world_size(group)
    if not is_initialized() or n == 1:
        return tensor
    if counter is not None:
        b = _nbytes(tensor)
        counter.add("all_reduce", b, 2 * (n - 1) / n * b)
    reduce_op = dist.ReduceOp.SUM if op == "avg" else _OPS[op]
    dist.all_reduce(tensor, op=reduce_op, group=group)
    if op == "avg":
        tensor.div_(n)
    return tensor


def broadcast(
    tensor: torch.Tensor,
    src: int = 0,
    *,
    group: dist.ProcessGroup | None = None,
    counter: ByteCounter | None = None,
) -> torch.Tensor:
    """In-place broadcast from global rank ``src``; returns ``tensor``."""
    n = get_world_size(group)
    if not is_initialized() or n == 1:
        return tensor
    if counter is not None:
        b = _nbytes(tensor)
        counter.add("broadcast", b, b if get_rank() == src else 0.0)
    dist.broadcast(tensor, src=src, group=group)
    return tensor


def all_gather(
    tensor: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    counter: ByteCounter | None = None,
) -> list[torch.Tensor]:
    """Gather ``tensor`` (same shape on every rank) from all ranks of ``group``, rank order."""
    n = get_world_size(group)
    if not is_initialized() or n == 1:
        return [tensor]
    if counter is not None:
        b = _nbytes(tensor)
        counter.add("all_gather", b, (n - 1) * b)
    out = [torch.empty_like(tensor) for _ in range(n)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def all_gather_object(obj: object, *, group: dist.ProcessGroup | None = None) -> list[object]:
    """Gather one picklable object per rank (not counted: for control data only)."""
    if not is_initialized():
        return [obj]
    out: list[object] = [None] * get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
