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


class Collectives(Protocol):
    """The two collectives a payload exchange needs, over one group of ``size`` ranks.

    ``rank`` and ``src`` are ranks in that group. `C10dCollectives` runs them on a
    torch.distributed group; the torchft engine runs them on the quorum's process group.
    """

    rank: int
    size: int

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> None: ...

    def broadcast(self, tensor: torch.Tensor, src: int) -> None: ...


class C10dCollectives:
    """`Collectives` over a torch.distributed group (None: the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> None:
        dist.all_gather(outputs, tensor, group=self.group)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        # broadcast's ``src`` is a global rank
        root = src if self.group is None else dist.get_global_rank(self.group, src)
        dist.broadcast(tensor, src=root, group=self.group)


def gather_payloads(
    coll: Collectives, mine: torch.Tensor, sizes: Sequence[int]
) -> list[torch.Tensor]:
    """Every rank's byte payload, in rank order; ``sizes[q]`` is rank q's byte count.

    Equal sizes: one all-gather. Unequal sizes (uneven plans): an all-gather would pad every
    payload to the longest and put more on the wire than the bytes counted, so each rank's
    payload goes out as one exact-size broadcast, received in rank order. Zero-byte
    payloads send nothing.
    """
    device = mine.device
    if not any(sizes):
        return [torch.zeros(0, dtype=torch.uint8, device=device) for _ in sizes]
    if len(set(sizes)) == 1:  # equal sizes: one all-gather
        gathered = [torch.empty_like(mine) for _ in range(coll.size)]
        coll.all_gather(gathered, mine)
        return gathered
    out = []
    for q, n in enumerate(sizes):
        buf = mine if q == coll.rank else torch.empty(n, dtype=torch.uint8, device=device)
        if n:
            coll.broadcast(buf, q)
        out.append(buf)
    return out


def sharded_gather(
    cross: Collectives, island: Collectives, mine: torch.Tensor, sizes: Sequence[int]
) -> list[torch.Tensor]:
    """`gather_payloads` for islands: shares across islands (each byte once), then inside.

    ``cross`` links replica r of every island (rank = island index), ``island`` the R ranks
    of this island, which all hold the same ``mine``. Replica r sends only its contiguous
    share r of the payload across islands; then each island all-gathers its R ranks' shares
    over its own links, padded to the longest rank's total (shares differ by a byte per
    worker at most: the padding only crosses the fast intra-island links, and one collective
    beats R exact broadcasts), and rebuilds every island's payload in island order.
    """
    replicas, r = island.size, island.rank
    bounds = [share_bounds(n, replicas) for n in sizes]
    lo, hi = bounds[cross.rank][r], bounds[cross.rank][r + 1]
    shares = gather_payloads(cross, mine[lo:hi], [b[r + 1] - b[r] for b in bounds])
    lengths = [sum(b[q + 1] - b[q] for b in bounds) for q in range(replicas)]
    packed = torch.zeros(max(lengths), dtype=torch.uint8, device=mine.device)
    packed[: lengths[r]] = torch.cat(shares)
    rows = [torch.empty_like(packed) for _ in range(replicas)]
    island.all_gather(rows, packed)
    parts = [  # parts[q][k]: replica q's share of island k's payload
        rows[q][: lengths[q]].split([b[q + 1] - b[q] for b in bounds]) for q in range(replicas)
    ]
    return [torch.cat([parts[q][k] for q in range(replicas)]) for k in range(len(sizes))]


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
        self.cross = C10dCollectives(group)
        self.num_workers = self.cross.size
        self.worker = self.cross.rank if worker is None else worker
        if self.worker != self.cross.rank:
            raise ValueError(
                f"worker={worker} must be this rank's index in the workers' group "
                f"({self.cross.rank}): payloads are exchanged in rank order"
            )
        self.island = None if island_group is None else C10dCollectives(island_group)
        self.island_size = 1 if self.island is None else self.island.size
        self.island_rank = 0 if self.island is None else self.island.rank
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
            if self.island is None or self.island_size == 1:
                return gather_payloads(self.cross, mine, sizes)
            return sharded_gather(self.cross, self.island, mine, sizes)
        except Exception as exc:  # gloo/NCCL report a dead peer as a generic RuntimeError
            raise WorkerLostError(
                f"worker {self.worker}: a peer left during the pseudo-gradient exchange "
                f"({type(exc).__name__}: {exc}); restart the run to resume from the last "
                "checkpoint"
            ) from exc


def share_bounds(size: int, parts: int) -> list[int]:
    """Offsets cutting ``size`` bytes into ``parts`` contiguous shares, ``[0, ..., size]``.

    Share q is ``[bounds[q], bounds[q + 1])``; shares differ by at most one byte (some may be
    empty when ``size < parts``).
    """
    return [size * q // parts for q in range(parts + 1)]
