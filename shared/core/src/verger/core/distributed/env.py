"""Process-group setup from torchrun's environment, and rank/world helpers.

``init_distributed()`` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` (set by ``torchrun``); without them it describes a single process and starts
nothing, so the same script runs with ``python`` and with ``torchrun --nproc-per-node N``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, device, backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when running as a single, non-distributed process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def init_distributed(
    backend: str | None = None,
    *,
    timeout_s: float = 600.0,
    device: str | torch.device | None = None,
) -> DistInfo:
    """Join the process group described by the environment (idempotent).

    ``backend=None`` picks NCCL when CUDA is available, else gloo. On CUDA each process uses
    ``cuda:LOCAL_RANK``. With no ``WORLD_SIZE`` (or 1) and no group yet, nothing is started
    and a single-process :class:`DistInfo` is returned.
    """
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} must be None (auto) or one of {_BACKENDS}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA, which is not available; use 'gloo' on CPU")
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if device is not None:
        dev = torch.device(device)
    elif chosen == "nccl":
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())
    if world == 1:
        return DistInfo(0, 1, 0, dev, None)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(
                f"WORLD_SIZE={world} but {var} is not set: launch with torchrun, or set "
                "MASTER_ADDR and MASTER_PORT"
            )
    dist.init_process_group(
        backend=chosen,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=dev if chosen == "nccl" else None,
    )
    return DistInfo(rank, world, local_rank, dev, chosen)


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size(group) if is_initialized() else 1


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every process of ``group`` (no-op when not distributed)."""
    if is_initialized():
        dist.barrier(group=group)


def destroy_distributed() -> None:
    """Tear the default process group down if there is one."""
    if is_initialized():
        dist.destroy_process_group()
