"""Distributed helpers on torch.distributed (gloo on CPU, NCCL on GPU) and DeepSpeed.

- :func:`init_distributed` (from torchrun's environment) -> :class:`DistInfo`;
  :func:`get_rank`, :func:`get_world_size`, :func:`is_main_process`, :func:`barrier`.
- Counted collectives: :func:`all_reduce`, :func:`broadcast`, :func:`all_gather` with a
  :class:`ByteCounter` (payload and ring-wire bytes).
- :func:`make_groups`: ``islands x replicas`` process groups.
- :func:`run_multiprocess`: run a function on N local gloo processes, collect results
  (pytest fixture ``multiprocess`` in :mod:`verger.core.distributed.testing`).
- DeepSpeed: :mod:`verger.core.distributed.deepspeed` (imported on demand).
"""

from verger.core.distributed.collectives import (
    ByteCounter,
    all_gather,
    all_gather_object,
    all_reduce,
    broadcast,
)
from verger.core.distributed.env import (
    DistInfo,
    barrier,
    destroy_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_initialized,
    is_main_process,
)
from verger.core.distributed.launch import MultiprocessError, free_port, run_multiprocess
from verger.core.distributed.mesh import MeshGroups, make_groups, mesh_ranks

__all__ = [
    "ByteCounter",
    "DistInfo",
    "MeshGroups",
    "MultiprocessError",
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "barrier",
    "broadcast",
    "destroy_distributed",
    "free_port",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_initialized",
    "is_main_process",
    "make_groups",
    "mesh_ranks",
    "run_multiprocess",
]
