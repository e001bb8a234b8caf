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

    With islands (several ranks per worker), pass the *replica* group that links the ranks
    holding the same shard in every island; ``worker`` is this rank's island index.
    """

    def __init__(
        self, group: dist.ProcessGroup | None = None, *, worker: int | None = None
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupTransport needs torch.distributed to be initialized")
        self.group = group
        self.num_workers = dist.get_world_size(group)
        self.worker = dist.get_rank(group) if worker is None else worker
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
        try:
            if len(set(sizes)) == 1:  # equal sizes: one all-gather
                gathered = [torch.empty_like(mine) for _ in range(self.num_workers)]
                dist.all_gather(gathered, mine, group=self.group)
            else:
                # Unequal sizes (uneven plans): an all-gather would pad every payload to the
                # longest and put more on the wire than the bytes counted; one broadcast per
                # worker sends exactly its own bytes, received in worker order as before.
                gathered = []
                for k, n in enumerate(sizes):
                    buf = (
                        mine
                        if k == self.worker
                        else torch.empty(n, dtype=torch.uint8, device=self.device)
                    )
                    if n:
                        dist.broadcast(buf, src=self._global_rank(k), group=self.group)
                    gathered.append(buf)
        except Exception as exc:  # gloo/NCCL report a dead peer as a generic RuntimeError
            raise WorkerLostError(
                f"worker {self.worker}: a peer left during the pseudo-gradient exchange "
                f"({type(exc).__name__}: {exc}); restart the run to resume from the last "
                "checkpoint"
            ) from exc
        return gathered

    def _global_rank(self, worker: int) -> int:
        """The global rank of ``worker`` (its rank in ``group``), as broadcast's ``src`` wants."""
        return worker if self.group is None else dist.get_global_rank(self.group, worker)
