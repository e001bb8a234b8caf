"""Two-level process groups: ``islands x replicas`` (a device-mesh of shape (islands, replicas)).

Global rank ``r`` sits in island ``r // replicas`` at replica position ``r % replicas``:

- ``intra_island``: the ``replicas`` ranks of my island (e.g. data-parallel all-reduce every
  step, or a DeepSpeed engine's group);
- ``cross_island``: the ``islands`` ranks that share my replica position (e.g. a DiLoCo outer
  synchronization every H steps between workers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch.distributed as dist

from verger.core.distributed.env import get_rank, get_world_size, is_initialized


@dataclass(frozen=True)
class MeshGroups:
    """This rank's coordinates and its two process groups (None when not distributed)."""

    islands: int
    replicas: int
    island: int
    replica: int
    intra_island_ranks: tuple[int, ...]
    cross_island_ranks: tuple[int, ...]
    intra_island: dist.ProcessGroup | None
    cross_island: dist.ProcessGroup | None


def mesh_ranks(islands: int, replicas: int) -> tuple[list[list[int]], list[list[int]]]:
    """The rank lists of every intra-island group and every cross-island group."""
    intra = [[i * replicas + r for r in range(replicas)] for i in range(islands)]
    cross = [[i * replicas + r for i in range(islands)] for r in range(replicas)]
    return intra, cross


def make_groups(islands: int, replicas: int = 1) -> MeshGroups:
    """Create the groups of an ``islands x replicas`` mesh; every rank must call this.

    Requires ``islands * replicas == world_size``. Without a process group (a single process)
    it returns the 1 x 1 mesh with ``None`` groups, so callers need no special case.
    """
    for name, value in (("islands", islands), ("replicas", replicas)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    world = get_world_size()
    if islands * replicas != world:
        raise ValueError(
            f"islands x replicas = {islands} x {replicas} = {islands * replicas} must equal "
            f"the world size {world}"
        )
    rank = get_rank()
    island, replica = divmod(rank, replicas)
    intra, cross = mesh_ranks(islands, replicas)
    my_intra: dist.ProcessGroup | None = None
    my_cross: dist.ProcessGroup | None = None
    if is_initialized():
        # new_group is collective: every rank creates every group, in the same order.
        for ranks in intra:
            g = dist.new_group(ranks)
            if rank in ranks:
                my_intra = cast(dist.ProcessGroup, g)
        for ranks in cross:
            g = dist.new_group(ranks)
            if rank in ranks:
                my_cross = cast(dist.ProcessGroup, g)
    return MeshGroups(
        islands=islands,
        replicas=replicas,
        island=island,
        replica=replica,
        intra_island_ranks=tuple(intra[island]),
        cross_island_ranks=tuple(cross[replica]),
        intra_island=my_intra,
        cross_island=my_cross,
    )
