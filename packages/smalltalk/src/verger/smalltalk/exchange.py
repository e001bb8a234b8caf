"""What crosses between routers: one score per sequence and router, nothing else, counted.

Each router scores every sequence's prefix on its own; the balanced assignment needs the
whole ``[N, E]`` score matrix, so the routers all-gather their columns (the paper: one fp16
score per sequence, at most 5.6 MB per router per round). A :class:`ScoreExchange` does that
gather and counts its bytes with :class:`verger.core.distributed.ByteCounter`:

- :class:`LocalExchange`: every router lives in this process; the columns are rounded to the
  exchanged precision and counted as the all-gather would send them (per router: payload
  ``N x itemsize``, ring wire ``(E - 1) x N x itemsize``), so single-process runs report the
  traffic a distributed run has;
- :class:`ProcessGroupExchange`: one router per rank of a process group (gloo or NCCL), a
  real counted ``all_gather``.

Both return the same float32 matrix for the same scores: assignments agree bit for bit.
"""

from __future__ import annotations

from typing import Protocol

import torch

from verger.core.distributed import ByteCounter, all_gather, get_rank, get_world_size

SCORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _score_dtype(name: str) -> torch.dtype:
    if name not in SCORE_DTYPES:
        raise ValueError(f"score_dtype={name!r} must be one of {sorted(SCORE_DTYPES)}")
    return SCORE_DTYPES[name]


class ScoreExchange(Protocol):
    """Gathers the routers' score columns into the full ``[N, E]`` matrix, counting bytes."""

    num_experts: int
    counter: ByteCounter

    def owned(self) -> list[int]:
        """The routers (columns) this process computes."""
        ...

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """``local``: ``[N, len(owned())]`` scores; returns float32 ``[N, E]``, column = router."""
        ...


class LocalExchange:
    """All ``num_experts`` routers in this process (see the module docstring)."""

    def __init__(self, num_experts: int, *, score_dtype: str = "float32") -> None:
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
            raise ValueError(f"LocalExchange: num_experts={num_experts!r} must be an int >= 2")
        self.num_experts = num_experts
        self.dtype = _score_dtype(score_dtype)
        self.counter = ByteCounter()

    def owned(self) -> list[int]:
        return list(range(self.num_experts))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        if local.ndim != 2 or local.shape[1] != self.num_experts:
            raise ValueError(
                f"LocalExchange.gather: scores must be [N, {self.num_experts}], got "
                f"{tuple(local.shape)}"
            )
        sent = local.to(self.dtype)
        column_bytes = sent.shape[0] * sent.element_size()
        for _ in range(self.num_experts):
            self.counter.add("all_gather", column_bytes, (self.num_experts - 1) * column_bytes)
        return sent.float()


class ProcessGroupExchange:
    """Router ``r`` on rank ``r`` of ``group`` (default: the world), ``E`` = the group size."""

    def __init__(self, group: object = None, *, score_dtype: str = "float32") -> None:
        self.group = group
        self.num_experts = get_world_size(group)  # type: ignore[arg-type]
        if self.num_experts < 2:
            raise ValueError(
                "ProcessGroupExchange needs a process group of E >= 2 ranks (one router each); "
                "use LocalExchange in a single process"
            )
        self.dtype = _score_dtype(score_dtype)
        self.counter = ByteCounter()

    def owned(self) -> list[int]:
        return [get_rank(self.group)]  # type: ignore[arg-type]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        if local.ndim != 2 or local.shape[1] != 1:
            raise ValueError(
                f"ProcessGroupExchange.gather: scores must be [N, 1], got {tuple(local.shape)}"
            )
        sent = local[:, 0].to(self.dtype).contiguous()
        columns = all_gather(sent, group=self.group, counter=self.counter)  # type: ignore[arg-type]
        return torch.stack([c.float() for c in columns], dim=1)
