"""DeepSpeed ZeRO as an island's inner engine: equals the torch island, resumes exactly (gloo)."""

from dataclasses import replace

import pytest
import torch

from verger.core.distributed import run_multiprocess
from verger.core.testing import assert_close
from verger.sparse_diloco import DiLoCoConfig, ProcessGroupTransport, SubsetPlan
from verger.sparse_diloco.partial import PartialLinear, build_worker_model, merge_slices
from verger.sparse_diloco.runner import TrainSpec, train_run
from verger.sparse_diloco.toy import ToyData, toy_loss, toy_model


def test_standalone_slices_match_views():
    """A standalone slice trains exactly like the view-based one once merged."""
    model = toy_model(0)
    plan = SubsetPlan.mlp_slices(model, 4)
    batch = ToyData(seed=0).batch(0, 0)
    models = [build_worker_model(model, plan, 1, standalone=s) for s in (False, True)]
    assert any(isinstance(m, PartialLinear) and m.standalone for m in models[1].modules())
    for m in models:
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1)
        for _ in range(2):
            toy_loss(m, batch).backward()
            opt.step()
            opt.zero_grad()
        merge_slices(m)
    view_state, standalone_state = (m.state_dict() for m in models)
    for name, value in view_state.items():
        if not name.endswith("trainable"):
            assert_close(standalone_state[name], value, rtol=1e-6, name=name)
    assert not torch.equal(view_state["blocks.0.mlp.w_up.weight"], model.blocks[0].mlp.w_up.weight)


def _skip_shm_op() -> None:
    import sys

    import deepspeed.comm  # noqa: F401  (loads the submodule patched below)

    # Skip compiling DeepSpeed's CPU shared-memory all-reduce op (only a speed-up over gloo;
    # the first build takes minutes on a busy 2-core machine), as verger-core's tests do.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _torch_vs_deepspeed(spec: TrainSpec, stage: int) -> dict:
    import torch.distributed as dist

    _skip_shm_op()
    from verger.core.distributed.deepspeed import zero_stage
    from verger.sparse_diloco.deepspeed_island import DeepSpeedDiLoCo

    stages: list[int] = []
    make_worker = DeepSpeedDiLoCo.make_worker

    def spy(self: DeepSpeedDiLoCo, k: int):  # records that ZeRO really ran each worker
        worker = make_worker(self, k)
        stages.append(zero_stage(self.engines[k]))
        return worker

    DeepSpeedDiLoCo.make_worker = spy  # type: ignore[method-assign]
    torch.set_num_threads(1)
    plain = train_run(spec, island_group=dist.group.WORLD)
    zero = train_run(replace(spec, inner_engine="deepspeed", zero_stage=stage))
    return {"plain": plain, "zero": zero, "stages": stages}


TOY_SPEC = TrainSpec(
    task="toy",
    plan="mlp",
    config=DiLoCoConfig(num_workers=2, inner_steps=3, inner_lr=3e-3, inner_warmup=2),
    rounds=2,
)


def _assert_zero_equals_plain(r: dict, sim: dict) -> None:
    """One rank's DeepSpeed run equals its torch run and the one-process simulator."""
    for n, p in r["plain"]["params"].items():
        assert_close(r["zero"]["params"][n], p, rtol=1e-5, name=n)
        assert_close(p, sim["params"][n], rtol=1e-5, name=n)
    assert not torch.equal(r["zero"]["params"][n], toy_model(0).state_dict()[n])
    assert r["zero"]["bytes_sent"] == r["plain"]["bytes_sent"]
    zl = [h["val_loss"] for h in r["zero"]["history"]]
    pl = [h["val_loss"] for h in r["plain"]["history"]]
    assert zl == pytest.approx(pl, rel=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_zero_island_equals_torch_island(stage):
    pytest.importorskip("deepspeed")
    spec = TOY_SPEC
    sim = train_run(spec)  # one process: the island's batch halves average to the full batch
    ranks = run_multiprocess(_torch_vs_deepspeed, 2, spec, stage, timeout=280)
    for r in ranks:
        assert r["stages"] == [stage, stage]  # one ZeRO engine per worker
        _assert_zero_equals_plain(r, sim)


def test_deepspeed_engine_validation():
    with pytest.raises(ValueError, match="inner_engine="):
        TrainSpec(inner_engine="fsdp")
    TrainSpec(inner_engine="deepspeed", checkpoint_dir="ckpt")  # worker checkpoints allowed


def _resume_runs(spec: TrainSpec, directory: str, stop: int) -> dict:
    """Straight run; run to ``stop`` with checkpoints; resume to the end; size-check refusal."""
    import torch.distributed as dist

    from verger.sparse_diloco.runner import distributed_main

    _skip_shm_op()
    torch.set_num_threads(1)
    straight = distributed_main(spec)
    distributed_main(replace(spec, rounds=stop, checkpoint_dir=directory))
    dist.barrier()  # every file of round `stop` is on disk before anyone resumes
    resumed = distributed_main(replace(spec, checkpoint_dir=directory))
    # The same worker file claiming another island size must be refused, not misloaded.
    from pathlib import Path

    from verger.sparse_diloco.deepspeed_island import DeepSpeedDiLoCo
    from verger.sparse_diloco.runner import get_task

    folder = Path(directory) / f"round_{spec.rounds:06d}"
    state = torch.load(folder / "worker_0.pt", weights_only=False)
    task = get_task(spec.task, spec.seed, spec.task_options)
    engine = DeepSpeedDiLoCo(
        task.model,
        spec.make_plan(task.model),
        spec.config,
        loss_fn=task.loss_fn,
        data=task.data,
        zero_stage=spec.zero_stage,
    )
    error = ""
    try:
        engine.load_worker_state_dict(0, {**state, "island_size": 4})
    except ValueError as exc:
        error = str(exc)
    return {"straight": straight, "resumed": resumed, "error": error}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_zero_worker_checkpoint_resume_is_exact(tmp_path, stage):
    """Checkpoint a 2-rank ZeRO run (streaming: mid-way between a fragment's syncs), resume."""
    pytest.importorskip("deepspeed")
    spec = TrainSpec(
        task="toy",
        plan="mlp",
        config=DiLoCoConfig(
            num_workers=2, inner_steps=4, inner_lr=3e-3, inner_warmup=3, num_fragments=2
        ),
        rounds=3,
        inner_engine="deepspeed",
        zero_stage=stage,
    )
    ranks = run_multiprocess(_resume_runs, 2, spec, str(tmp_path), 1, timeout=280)
    for r in ranks:
        assert r["resumed"]["resumed_from"] == 1
        assert len(r["resumed"]["history"]) == 2  # rounds 2 and 3 only
        for n, p in r["straight"]["params"].items():
            assert_close(r["resumed"]["params"][n], p, rtol=1e-6, name=n)
        assert r["resumed"]["bytes_sent"] == r["straight"]["bytes_sent"]
        straight_losses = [h["inner_loss"] for h in r["straight"]["history"][1:]]
        resumed_losses = [h["inner_loss"] for h in r["resumed"]["history"]]
        assert resumed_losses == pytest.approx(straight_losses, rel=1e-6)
        assert "island of 4 ranks" in r["error"] and "same world size" in r["error"]
    files = sorted(p.name for p in (tmp_path / "round_000003").iterdir())
    assert files == ["global.pt", "worker_0.pt", "worker_1.pt"]
    state = torch.load(tmp_path / "round_000003" / "worker_1.pt", weights_only=False)
    assert sorted(state["zero"]) == [0, 1] and state["island_size"] == 2


def _torch_vs_deepspeed_islands(spec: TrainSpec) -> dict:
    """World 4 = 2 islands x 2 ranks: the torch islands, then one ZeRO engine per island."""
    from verger.core.distributed.deepspeed import zero_stage
    from verger.sparse_diloco.deepspeed_island import DeepSpeedDiLoCo
    from verger.sparse_diloco.runner import distributed_main

    _skip_shm_op()
    torch.set_num_threads(1)
    seen: list[tuple[int, int, int]] = []
    make_worker = DeepSpeedDiLoCo.make_worker

    def spy(self: DeepSpeedDiLoCo, k: int):  # records each worker's ZeRO engine and island
        worker = make_worker(self, k)
        engine = self.engines[k]
        seen.append((k, zero_stage(engine), engine.dp_world_size))
        return worker

    DeepSpeedDiLoCo.make_worker = spy  # type: ignore[method-assign]
    payloads: list[torch.Tensor] = []  # what this rank hands the transport, sync after sync
    exchange = ProcessGroupTransport.exchange

    def record(self: ProcessGroupTransport, mine: dict, sizes: list[int]) -> list:
        assert self.island_size == 2  # the sharded exchange: each rank sends half across
        payloads.extend(p.clone() for p in mine.values())
        return exchange(self, mine, sizes)

    ProcessGroupTransport.exchange = record  # type: ignore[method-assign]
    plain = distributed_main(spec)
    zero = distributed_main(replace(spec, inner_engine="deepspeed", zero_stage=2))
    return {"plain": plain, "zero": zero, "seen": seen, "payloads": payloads}


@pytest.mark.slow  # 4 DeepSpeed processes; the 2-rank island test covers ZeRO by default
@pytest.mark.timeout(400)
def test_zero_islands_on_subgroups_equal_torch_islands():
    pytest.importorskip("deepspeed")
    spec = TOY_SPEC
    sim = train_run(spec)
    ranks = run_multiprocess(_torch_vs_deepspeed_islands, 4, spec, timeout=380)
    for rank, r in enumerate(ranks):
        assert r["seen"] == [(rank // 2, 2, 2)]  # one ZeRO-2 engine, over its island's 2 ranks
        _assert_zero_equals_plain(r, sim)
    # ZeRO-1/2 keep full replicated parameters: an island's ranks hand the sharded exchange
    # bit-identical payloads (torch islands, then ZeRO islands), as it assumes
    for island in (ranks[:2], ranks[2:]):
        a, b = (r["payloads"] for r in island)
        assert len(a) == len(b) == 2 * spec.rounds * spec.config.num_fragments
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(ranks[0]["payloads"][0], ranks[2]["payloads"][0])
