"""How workers exchange pseudo-gradient payloads: in one process, or over torch.distributed.

Both transports return every worker's payload in worker order, and every receiver sums them in
that order, so the simulator and a multi-process run produce bit-identical global states.
(An all-reduce would leave the summation order to the backend.) Payloads are byte tensors
whose sizes every rank knows in advance from the plan; a worker sends only its own, unpadded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.distributed as dist


class WorkerLostError(RuntimeError):
    """A peer worker stopped answering during a sync; resume from the last checkpoint."""


class Transport(Protocol):
    """Exchange of one sync's payloads (uint8 tensors), one per worker."""

    num_workers: int

    def local_workers(self) -> list[int]:
        """The workers whose inner training happens in this process."""
        ...

    def exchange(
        self, payloads: Mapping[int, torch.Tensor], sizes: Sequence[int]
    ) -> list[torch.Tensor]:
        """Every worker's payload, in worker order; ``sizes[k]`` is worker k's byte count."""
        ...


class LocalTransport:
    """All W workers live in this process (the single-process simulator)."""

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers

    def local_workers(self) -> list[int]:
        return list(range(self.num_workers))

    def exchange(
        self, payloads: Mapping[int, torch.Tensor], sizes: Sequence[int]
    ) -> list[torch.Tensor]:
        missing = [k for k in range(self.num_workers) if k not in payloads]
        if missing:
            raise ValueError(f"LocalTransport needs every worker's payload; missing {missing}")
        return [payloads[k] for k in range(self.num_workers)]


class ProcessGroupTransport:
    """One worker per rank of a torch.distributed group (gloo on CPU, NCCL on GPU).

    ``group`` links the workers: one rank per worker (None: the default group). With islands
    (world W x R, each worker an island of R data-parallel ranks), pass the *cross-island*
    group of this rank's replica position as ``group``, this rank's island index as
    ``worker`` and the island's ranks as ``island_group``: replica r of every island then
    sends only share r of its worker's payload across islands, so the inter-island traffic
    is ``bytes_sent``, not R x it, and the island rebuilds the W payloads over its own
    (fast) links. The R ranks of an island must hold the same payload (data parallel).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        worker: int | None = None,
        island_group: dist.ProcessGroup | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupTransport needs torch.distributed to be initialized")
        self.group = group
        self.num_workers = dist.get_world_size(group)
        self.worker = dist.get_rank(group) if worker is None else worker
        self.island_group = island_group
        self.island_size = 1 if island_group is None else dist.get_world_size(island_group)
        self.island_rank = 0 if island_group is None else dist.get_rank(island_group)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if (dist.get_backend(group) == "nccl")
            else torch.device("cpu")
        )

    def local_workers(self) -> list[int]:
        return [self.worker]

    def exchange(
        self, payloads: Mapping[int, torch.Tensor], sizes: Sequence[int]
    ) -> list[torch.Tensor]:
        if set(payloads) != {self.worker}:
            raise ValueError(f"rank of worker {self.worker} got payloads for {sorted(payloads)}")
        if not any(sizes):  # nothing trained in this fragment anywhere: nothing to send
            return [torch.zeros(0, dtype=torch.uint8) for _ in sizes]
        mine = payloads[self.worker].to(self.device)
        if mine.numel() != sizes[self.worker]:
            raise ValueError(
                f"worker {self.worker}: payload of {mine.numel()} bytes, the plan says "
                f"{sizes[self.worker]}"
            )
        try:
            if self.island_size == 1:
                return self._gather(mine, sizes)
            return self._sharded_exchange(mine, sizes)
        except Exception as exc:  # gloo/NCCL report a dead peer as a generic RuntimeError
            raise WorkerLostError(
                f"worker {self.worker}: a peer left during the pseudo-gradient exchange "
                f"({type(exc).__name__}: {exc}); restart the run to resume from the last "
                "checkpoint"
            ) from exc

    def _gather(self, mine: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
        """Every worker's ``mine`` over ``group``, in worker order; ``sizes[k]`` is worker k's."""
        if not any(sizes):
            return [torch.zeros(0, dtype=torch.uint8, device=self.device) for _ in sizes]
        if len(set(sizes)) == 1:  # equal sizes: one all-gather
            gathered = [torch.empty_like(mine) for _ in range(self.num_workers)]
            dist.all_gather(gathered, mine, group=self.group)
            return gathered
        # Unequal sizes (uneven plans): an all-gather would pad every payload to the longest
        # and put more on the wire than the bytes counted; one broadcast per worker sends
        # exactly its own bytes, received in worker order as before.
        gathered = []
        for k, n in enumerate(sizes):
            buf = (
                mine if k == self.worker else torch.empty(n, dtype=torch.uint8, device=self.device)
            )
            if n:
                dist.broadcast(buf, src=self._global_rank(k), group=self.group)
            gathered.append(buf)
        return gathered

    def _sharded_exchange(self, mine: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
        """Shares across islands (each byte once), then the full payloads inside the island."""
        bounds = [share_bounds(n, self.island_size) for n in sizes]
        r = self.island_rank
        lo, hi = bounds[self.worker][r], bounds[self.worker][r + 1]
        shares = self._gather(mine[lo:hi], [b[r + 1] - b[r] for b in bounds])  # cross-island
        # Inside the island: one all-gather of each replica's W shares, padded to the longest
        # replica's total (shares differ by a byte per worker at most). The padding only
        # crosses the fast intra-island links; one collective beats R exact broadcasts.
        lengths = [sum(b[q + 1] - b[q] for b in bounds) for q in range(self.island_size)]
        packed = torch.zeros(max(lengths), dtype=torch.uint8, device=self.device)
        packed[: lengths[r]] = torch.cat(shares)
        rows = [torch.empty_like(packed) for _ in range(self.island_size)]
        dist.all_gather(rows, packed, group=self.island_group)
        parts = [  # parts[q][k]: replica q's share of worker k's payload
            rows[q][: lengths[q]].split([b[q + 1] - b[q] for b in bounds])
            for q in range(self.island_size)
        ]
        return [
            torch.cat([parts[q][k] for q in range(self.island_size)])
            for k in range(self.num_workers)
        ]

    def _global_rank(self, worker: int) -> int:
        """The global rank of ``worker`` (its rank in ``group``), as broadcast's ``src`` wants."""
        return worker if self.group is None else dist.get_global_rank(self.group, worker)


def share_bounds(size: int, parts: int) -> list[int]:
    """Offsets cutting ``size`` bytes into ``parts`` contiguous shares, ``[0, ..., size]``.

    Share q is ``[bounds[q], bounds[q + 1])``; shares differ by at most one byte (some may be
    empty when ``size < parts``).
    """
    return [size * q // parts for q in range(parts + 1)]
