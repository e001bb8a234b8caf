"""Counted collectives, mesh groups and the multi-process runner on 4 gloo processes."""

from __future__ import annotations

import pytest
import torch

from verger.core.distributed import (
    ByteCounter,
    MultiprocessError,
    all_gather,
    all_reduce,
    broadcast,
    get_rank,
    get_world_size,
    init_distributed,
    make_groups,
    mesh_ranks,
    run_multiprocess,
)


def _collectives_on_each_rank() -> dict:
    info = init_distributed()  # joins the group run_multiprocess made (idempotent)
    rank = get_rank()
    counter = ByteCounter()
    summed = all_reduce(torch.full((3,), rank + 1.0), "sum", counter=counter)
    avg = all_reduce(torch.tensor([float(rank)]), "avg", counter=counter)
    top = all_reduce(torch.tensor([float(rank)]), "max")
    src = broadcast(torch.tensor([float(rank * 10)]), src=2, counter=counter)
    gathered = all_gather(torch.tensor([rank, rank * rank]), counter=counter)
    mesh = make_groups(islands=2, replicas=2)
    intra = all_reduce(torch.tensor([float(rank)]), group=mesh.intra_island)
    cross = all_reduce(torch.tensor([float(rank)]), group=mesh.cross_island)
    return {
        "info": (info.rank, info.world_size, info.backend),
        "sum": summed.tolist(),
        "avg": avg.item(),
        "max": top.item(),
        "bcast": src.item(),
        "gathered": torch.stack(gathered).tolist(),
        "mesh": (mesh.island, mesh.replica, mesh.intra_island_ranks, mesh.cross_island_ranks),
        "intra": intra.item(),
        "cross": cross.item(),
        "bytes": counter.as_dict(),
    }


def _fail_on_rank_one() -> int:
    if get_rank() == 1:
        raise ArithmeticError("boom on purpose")
    return get_world_size()


def test_four_process_gloo_collectives(multiprocess) -> None:
    results = multiprocess(_collectives_on_each_rank, 4)
    for rank, r in enumerate(results):
        assert r["info"] == (rank, 4, "gloo")
        assert r["sum"] == [10.0, 10.0, 10.0] and r["avg"] == 1.5 and r["max"] == 3.0
        assert r["bcast"] == 20.0
        assert r["gathered"] == [[0, 0], [1, 1], [2, 4], [3, 9]]
        island, replica = divmod(rank, 2)
        assert r["mesh"][:2] == (island, replica)
        assert r["intra"] == sum(r["mesh"][2]) and r["cross"] == sum(r["mesh"][3])
        b = r["bytes"]
        # payload: 3 fp32 + 1 fp32 for the two all-reduces; ring wire bytes 2 (n-1)/n B
        assert b["all_reduce_calls"] == 2 and b["all_reduce_payload_bytes"] == 16
        assert b["all_reduce_wire_bytes"] == pytest.approx(2 * 3 / 4 * 16)
        assert b["broadcast_wire_bytes"] == (4 if rank == 2 else 0)
        assert b["all_gather_payload_bytes"] == 16 and b["all_gather_wire_bytes"] == 3 * 16


def test_failing_rank_raises_with_its_traceback() -> None:
    with pytest.raises(MultiprocessError, match=r"rank 1 of 2 failed(.|\n)*boom on purpose"):
        run_multiprocess(_fail_on_rank_one, 2)


def test_runner_rejects_lambdas_and_bad_sizes() -> None:
    with pytest.raises(TypeError, match="module-level"):
        run_multiprocess(lambda: 0, 2)
    with pytest.raises(ValueError, match="world_size"):
        run_multiprocess(_fail_on_rank_one, 0)


def test_single_process_fallbacks(monkeypatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.backend, info.device.type) == (0, 1, None, "cpu")
    t = torch.ones(2)
    assert all_reduce(t, "sum") is t and t.tolist() == [1.0, 1.0]
    mesh = make_groups(1, 1)
    assert mesh.intra_island is None and mesh.cross_island is None
    with pytest.raises(ValueError, match="world size"):
        make_groups(2, 2)
    with pytest.raises(ValueError, match="op="):
        all_reduce(t, "mean")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        init_distributed()


def test_mesh_ranks_layout() -> None:
    intra, cross = mesh_ranks(3, 2)
    assert intra == [[0, 1], [2, 3], [4, 5]]
    assert cross == [[0, 2, 4], [1, 3, 5]]
