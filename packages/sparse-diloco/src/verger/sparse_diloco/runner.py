"""One training run from a picklable spec: simulated in-process or one worker per rank.

`TrainSpec` names the task (model + data), the subset plan and the DiLoCo config. `train_run`
runs it with any transport, resuming from ``checkpoint_dir`` when it holds a complete round;
`distributed_main` is the per-rank entry used by torchrun (``python -m verger.sparse_diloco
train ...``) and by ``verger.core.distributed.run_multiprocess`` in tests and the demo.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from verger.sparse_diloco.checkpoint import RunCheckpointer
from verger.sparse_diloco.config import DiLoCoConfig
from verger.sparse_diloco.engine import BatchSource, DiLoCo, LossFn
from verger.sparse_diloco.subset import OTHERS_POLICIES, SubsetPlan
from verger.sparse_diloco.transport import ProcessGroupTransport, Transport

if TYPE_CHECKING:
    from verger.sparse_diloco.torchft_engine import TorchFTOptions

PLANS = ("full", "mlp")
INNER_ENGINES = ("torch", "deepspeed")


@dataclass
class Task:
    """What a run trains: the initial model, its loss, its data and a validation loss."""

    model: nn.Module
    loss_fn: LossFn
    data: BatchSource
    evaluate: Callable[[nn.Module], float]
    tokens_per_step: int  # tokens (or samples) one worker consumes per inner step


TaskBuilder = Callable[[int, dict[str, Any]], Task]
TASKS: dict[str, TaskBuilder] = {}


def register_task(name: str) -> Callable[[TaskBuilder], TaskBuilder]:
    def wrap(builder: TaskBuilder) -> TaskBuilder:
        TASKS[name] = builder
        return builder

    return wrap


@register_task("toy")
def _toy_task(seed: int, options: dict[str, Any]) -> Task:
    from verger.sparse_diloco.toy import ToyData, toy_loss, toy_model

    model = toy_model(seed, **options.get("model", {}))
    data = ToyData(seed=seed, batch_size=options.get("batch_size", 16))
    held_out = [data.batch(worker=10_000, step=s) for s in range(4)]

    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        return sum(float(toy_loss(m, b)) for b in held_out) / len(held_out)

    return Task(model, toy_loss, data, evaluate, tokens_per_step=data.batch_size)


def get_task(name: str, seed: int, options: dict[str, Any]) -> Task:
    if name == "lm" and "lm" not in TASKS:
        import verger.sparse_diloco.lm  # noqa: F401  (registers "lm")
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not one of {sorted(TASKS)}")
    return TASKS[name](seed, options)


@dataclass(kw_only=True)
class TrainSpec:
    """Everything a run needs, picklable so that spawned ranks can rebuild it."""

    task: str = "toy"
    task_options: dict[str, Any] = field(default_factory=dict)
    plan: str = "mlp"
    num_slices: int | None = None
    overlap: float = 0.0
    others: str = "shared"
    config: DiLoCoConfig = field(default_factory=DiLoCoConfig)
    rounds: int = 10
    seed: int = 0
    checkpoint_dir: str | None = None
    eval_every: int = 1
    crash: tuple[int, int] | None = None  # (worker, round): that worker dies there (tests)
    # torchft engine fault injection (tests, bench): (worker, sync, inner step) SIGKILLs that
    # worker's process there; (worker, sync, seconds) stalls it before that round's training
    kill_at: tuple[int, int, int] | None = None
    stall_at: tuple[int, int, float] | None = None
    inner_engine: str = "torch"  # "deepspeed": each island a ZeRO engine (extra)
    zero_stage: int = 2

    def __post_init__(self) -> None:
        if self.inner_engine not in INNER_ENGINES:
            raise ValueError(f"inner_engine={self.inner_engine!r} must be one of {INNER_ENGINES}")
        self._validate()

    def _validate(self) -> None:
        if self.plan not in PLANS:
            raise ValueError(f"plan={self.plan!r} must be one of {PLANS}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds={self.rounds!r} must be a positive int")
        if not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise ValueError(f"eval_every={self.eval_every!r} must be a positive int")
        # the plan is built from the model later: check its options before any work starts
        if self.num_slices is not None and (
            not isinstance(self.num_slices, int)
            or isinstance(self.num_slices, bool)
            or self.num_slices < 1
        ):
            raise ValueError(f"num_slices={self.num_slices!r} must be a positive int or None")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap={self.overlap!r} must be in [0, 1)")
        if self.others not in OTHERS_POLICIES:
            raise ValueError(f"others={self.others!r} must be one of {OTHERS_POLICIES}")
        if self.zero_stage not in (1, 2):
            raise ValueError(f"zero_stage={self.zero_stage!r} must be 1 or 2")

    def make_plan(self, model: nn.Module) -> SubsetPlan:
        if self.plan == "full":
            return SubsetPlan.full(model, self.config.num_workers)
        return SubsetPlan.mlp_slices(
            model,
            self.config.num_workers,
            num_slices=self.num_slices,
            overlap=self.overlap,
            others=self.others,
        )


def train_run(
    spec: TrainSpec,
    transport: Transport | None = None,
    *,
    is_main: bool = True,
    island_group: dist.ProcessGroup | None = None,
    writes_workers: bool = True,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``spec``; returns the history and the final global parameters."""
    torch.manual_seed(spec.seed)
    task = get_task(spec.task, spec.seed, spec.task_options)
    plan = spec.make_plan(task.model)
    options: dict[str, Any] = {}
    engine_class: type[DiLoCo] = DiLoCo
    if spec.inner_engine == "deepspeed":
        from verger.sparse_diloco.deepspeed_island import DeepSpeedDiLoCo

        engine_class, options = DeepSpeedDiLoCo, {"zero_stage": spec.zero_stage}
    engine = engine_class(
        task.model,
        plan,
        spec.config,
        loss_fn=task.loss_fn,
        data=task.data,
        transport=transport,
        island_group=island_group,
        **options,
    )
    ckpt = RunCheckpointer(spec.checkpoint_dir) if spec.checkpoint_dir else None
    resumed = ckpt.load_latest(engine) if ckpt else None
    history: list[dict[str, float]] = []
    tokens_per_round = spec.config.inner_steps * spec.config.num_workers * task.tokens_per_step
    while engine.rounds_done < spec.rounds:
        if (
            spec.crash is not None
            and spec.crash[1] == engine.rounds_done
            and (spec.crash[0] in engine.workers)
        ):
            os._exit(17)  # a hard crash: no exception, no cleanup, like a lost node
        start = time.perf_counter()
        figures = engine.round()
        figures["round_s"] = time.perf_counter() - start
        r = engine.rounds_done
        if r % spec.eval_every == 0 or r == spec.rounds:
            figures["val_loss"] = task.evaluate(engine.model)
        figures.update(round=float(r), tokens=float(r * tokens_per_round))
        history.append(figures)
        if ckpt:
            ckpt.save(engine, write_global=is_main, write_workers=writes_workers)
        if progress:
            progress(r, figures)
    last = history[-1] if history else {}
    return {
        "history": history,
        "resumed_from": resumed,
        # the final validation loss (evaluated again when a resume found nothing left to do)
        "val_loss": last["val_loss"] if "val_loss" in last else task.evaluate(engine.model),
        "params": {n: p.detach().cpu().clone() for n, p in engine.model.named_parameters()},
        "bytes_sent": engine.bytes_sent,
        "plan": plan.summary(),
    }


def torchft_main(
    spec: TrainSpec,
    options: TorchFTOptions,
    *,
    event: Callable[[str, dict[str, Any]], None] | None = None,
    island_group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Run one replica group (worker ``options.worker``) of ``spec`` on torchft.

    ``spec.rounds`` is the number of data blocks per worker (R): the run ends when all
    W x R blocks are applied, after R syncs without faults and more with them (see
    `verger.sparse_diloco.torchft_engine`). ``event(name, data)`` reports progress
    (``joined``, ``healed``, ``sync``) to a launcher.
    """
    from verger.sparse_diloco.torchft_engine import TorchFTDiLoCo

    if spec.inner_engine != "torch":
        raise ValueError("the torchft engine trains with inner_engine='torch'")
    notify = event or (lambda name, data: None)
    notify("started", {})
    torch.manual_seed(spec.seed)
    task = get_task(spec.task, spec.seed, spec.task_options)
    plan = spec.make_plan(task.model)
    engine = TorchFTDiLoCo(
        task.model,
        plan,
        spec.config,
        loss_fn=task.loss_fn,
        data=task.data,
        options=options,
        blocks=spec.rounds,
        island_group=island_group,
    )
    engine.before_inner_step = _fault_hook(spec, engine.index)
    notify("connected", {})
    history: list[dict[str, float]] = []
    tokens_per_block = spec.config.inner_steps * task.tokens_per_step
    try:
        engine.join()  # a restarted group heals here, before training
        notify("joined", {"syncs": engine.syncs})
        if engine.heal_times:
            notify("healed", {"syncs": engine.syncs, "time": engine.heal_times[-1]})
        while not engine.finished:
            healed = len(engine.heal_times)
            figures = engine.round()
            if len(engine.heal_times) > healed:
                notify("healed", {"syncs": engine.syncs, "time": engine.heal_times[-1]})
            if engine.finished or engine.syncs % spec.eval_every == 0:
                figures["val_loss"] = task.evaluate(engine.model)
            figures.update(
                round=float(engine.syncs), tokens=float(int(engine.done.sum()) * tokens_per_block)
            )
            history.append(figures)
            notify("sync", {"syncs": engine.syncs})
        engine.linger()
    finally:
        engine.shutdown()
    return {
        "history": history,
        "params": {n: p.detach().cpu().clone() for n, p in engine.model.named_parameters()},
        "bytes_sent": engine.bytes_sent,
        "plan": plan.summary(),
        "val_loss": history[-1]["val_loss"] if history else task.evaluate(engine.model),
        **engine.summary(),
    }


def _fault_hook(spec: TrainSpec, worker: int) -> Callable[[int, int], None] | None:
    """The test faults of ``spec`` that concern ``worker``, as a before-inner-step hook."""
    kill, stall = spec.kill_at, spec.stall_at
    if not ((kill and kill[0] == worker) or (stall and stall[0] == worker)):
        return None

    def hook(sync: int, step: int) -> None:
        if stall and stall[0] == worker and (sync, step) == (stall[1], 0):
            time.sleep(stall[2])
        if kill and kill[0] == worker and (sync, step) == (kill[1], kill[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # mid-round, no cleanup: a lost node

    return hook


def distributed_main(spec: TrainSpec) -> dict[str, Any]:
    """Per-rank entry (process group initialized).

    With world size W (= ``config.num_workers``) each rank is a worker. With world size
    W x R, worker k is the island of ranks [k R, (k+1) R): data parallel inside the island;
    each rank sends its 1/R share of the island's pseudo-gradient to the ranks that share its
    island position, then the island all-gathers the shares (`ProcessGroupTransport`). With
    ``inner_engine="deepspeed"`` each island is a ZeRO engine over its R ranks, the W islands
    running in parallel; when the world size is not W x R with R > 1, every rank runs all W
    workers instead, each a ZeRO island over the whole world.
    """
    from verger.core.distributed import make_groups

    world_size, workers = dist.get_world_size(), spec.config.num_workers
    rank = dist.get_rank()
    if spec.inner_engine == "deepspeed" and (world_size <= workers or world_size % workers):
        # every worker is a ZeRO island over all the ranks; rank 0 writes every file
        return train_run(spec, is_main=rank == 0, writes_workers=rank == 0)
    if world_size % workers:
        raise ValueError(
            f"world size {world_size} is not a multiple of config.num_workers={workers}: "
            "run one process (or the same number of processes) per worker"
        )
    if world_size == workers:
        return train_run(spec, ProcessGroupTransport(), is_main=dist.get_rank() == 0)
    mesh = make_groups(workers, world_size // workers)
    # each replica sends 1/R of its island's payload across islands; the island rebuilds
    transport = ProcessGroupTransport(
        mesh.cross_island, worker=mesh.island, island_group=mesh.intra_island
    )
    return train_run(
        spec,
        transport,
        is_main=dist.get_rank() == 0,
        island_group=mesh.intra_island,
        writes_workers=mesh.replica == 0,
    )


def distributed_runs(specs: list[TrainSpec]) -> list[dict[str, Any]]:
    """Several runs in one set of processes (process start-up dominates small runs)."""
    return [distributed_main(s) for s in specs]
