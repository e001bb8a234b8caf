"""DeepSpeed ZeRO as the inner engine of an island (extra ``[deepspeed]``).

ZeRO (stages 1-2) moves every trained Parameter into flat buffers and keeps the fp32 master
copy, sharded over the island, inside its optimizer; a Parameter that is a *view* of a larger
weight (the default `PartialLinear`) would be cut loose from that weight. So a DeepSpeed
worker is built with standalone slices: each trained slice is its own Parameter, copied into
the full frozen weight at every forward pass. At a sync the slices are merged into the full
weights (`merge_slices`), the pseudo-gradients are taken as usual, and the new anchor is
written back into the engine's fp32 master weights with
`verger.core.distributed.deepspeed.set_full_fp32_params` (which refreshes the module copies).

Each worker is an island of data-parallel ranks: either the whole process group (every rank
runs every local worker on its rows of the batch, ``rank::size``), or a sub-group of a larger
world (``island_group``, e.g. world 4 = 2 islands x 2 ranks, the W islands running in
parallel); ZeRO averages the gradients over the island's ranks and shards the AdamW state
among them (`build_engine(..., data_parallel_group=island_group)`).

Worker checkpoints: `worker_state_dict` is collective over the island. Each rank's ZeRO shard
(``engine.optimizer.state_dict()``: the AdamW state and fp32 master partition) is gathered to
the island's rank 0 and stored rank-keyed in the worker's one file, beside the trained
coordinates, the LR scheduler, the engine's step counters and the data position. Loading
needs an island of the same size (ZeRO shards are cut for it) and raises ``ValueError``
otherwise. The file holds the worker's whole optimizer state, gathered on one rank at save
time (the sharding saves memory while training, not while checkpointing).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from verger.sparse_diloco.engine import (
    DiLoCo,
    NonFiniteLossError,
    Worker,
    _island_mean,
    island_share,
)
from verger.sparse_diloco.partial import (
    PartialLinear,
    build_worker_model,
    get_tensor,
    merge_slices,
)
from verger.sparse_diloco.subset import iter_selected

ZERO_STAGES = (1, 2)


class DeepSpeedDiLoCo(DiLoCo):
    """`DiLoCo` whose workers take their inner steps with a DeepSpeed ZeRO engine.

    Needs an initialized process group. ``island_group`` is the island's ranks: None (or
    ``dist.group.WORLD``) for the whole world, or a sub-group (e.g.
    ``make_groups(W, R).intra_island``, with ``ProcessGroupTransport(mesh.cross_island,
    worker=mesh.island, island_group=mesh.intra_island)``), each island then having its own
    ZeRO engine. ZeRO-1/2 shard only optimizer state and gradients: after each step every
    island rank holds the full, identical parameters, so the island's ranks compute the same
    payload, as that transport's sharded exchange needs. ``zero_stage`` is 1 or 2;
    ``config.grad_clip`` maps to DeepSpeed's ``gradient_clipping``, the inner warm-up to a
    LambdaLR the engine steps. The numbers equal the plain torch island (`DiLoCo` with the
    same ``island_group``) up to reduction order. Worker checkpoints are collective over the
    island (see the module docstring).
    """

    collective_worker_state = True  # every island rank must call worker_state_dict

    def __init__(self, *args: Any, zero_stage: int = 2, **kwargs: Any) -> None:
        if zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage={zero_stage!r} must be one of {ZERO_STAGES}")
        if not dist.is_initialized():
            raise ValueError("DeepSpeedDiLoCo needs an initialized torch.distributed group")
        if kwargs.get("island_group") is None:
            kwargs["island_group"] = dist.group.WORLD
        self.zero_stage = zero_stage
        self.engines: dict[int, Any] = {}
        super().__init__(*args, **kwargs)

    def make_worker(self, k: int) -> Worker:
        from verger.core.distributed.deepspeed import build_engine

        local = build_worker_model(self.model, self.plan, k, standalone=True)
        opt, sched = self.inner_optimizer(local, k)
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,  # nominal: batches come from data.batch
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": self.zero_stage},
            "steps_per_print": 10**9,
        }
        if self.config.grad_clip is not None:
            ds_config["gradient_clipping"] = self.config.grad_clip
        group = None if self.island_group is dist.group.WORLD else self.island_group
        engine = build_engine(
            local, ds_config, optimizer=opt, lr_scheduler=sched, data_parallel_group=group
        )
        self.engines[k] = engine
        return Worker(index=k, model=engine.module, optimizer=opt, scheduler=sched)

    def inner_step(self, worker: Worker) -> float:
        """One ZeRO AdamW step on the island's share of the batch; returns the island loss."""
        engine = self.engines[worker.index]
        batch = self.data.batch(worker.data_shard, worker.step)
        batch = island_share(batch, self.island_rank, self.island_size)
        loss = self.loss_fn(engine, batch)  # the engine's forward is the module's
        value = _island_mean(float(loss.detach()), self.island_group, self.island_size)
        if not torch.isfinite(torch.tensor(value)):
            raise NonFiniteLossError(
                f"worker {worker.index}: loss {value} at inner step {worker.step}; lower "
                "inner_lr or enable grad_clip"
            )
        engine.backward(loss)
        engine.step()  # averages gradients over the island, clips, AdamW, scheduler
        worker.step += 1
        worker.losses.append(value)
        return value

    def _before_sync(self) -> None:
        for w in self.workers.values():
            merge_slices(w.model)

    @torch.no_grad()
    def _after_sync(self) -> None:
        for k in self.workers:
            self._push_to_engine(k)

    @torch.no_grad()
    def _push_to_engine(self, k: int) -> None:
        """Worker ``k``'s full weights -> its standalone slices and ZeRO's fp32 master copy."""
        from verger.core.distributed.deepspeed import set_full_fp32_params

        w = self.workers[k]
        for module in w.model.modules():
            if isinstance(module, PartialLinear):  # the slice follows the merged weight
                module.trainable.copy_(module.selection.view(module.weight))
        values = {n: p.detach().clone() for n, p in w.model.named_parameters() if p.requires_grad}
        set_full_fp32_params(self.engines[k], values)

    def load_global_state_dict(self, state: dict[str, Any]) -> None:
        super().load_global_state_dict(state)
        self._after_sync()

    def _island_root(self) -> int:
        group = self.island_group if self.island_group is not None else dist.group.WORLD
        assert group is not None  # set in __init__: a DeepSpeed island always has a group
        return dist.get_global_rank(group, 0)

    @torch.no_grad()
    def worker_state_dict(self, k: int) -> dict[str, Any]:
        """Worker ``k``'s state with every island rank's ZeRO shard; collective over the island.

        Every rank of the island must call it; the ``"zero"`` entry holds the shards (rank-keyed,
        in island rank order) on the island's rank 0 only, ``None`` elsewhere.
        """
        w, engine = self.workers[k], self.engines[k]
        merge_slices(w.model)  # the full weights hold the trained slices
        shard = _to_cpu(engine.optimizer.state_dict())
        shards: list[Any] | None = [None] * self.island_size if self.island_rank == 0 else None
        dist.gather_object(shard, shards, dst=self._island_root(), group=self.island_group)
        return {
            "trained": {
                n: sel.view(get_tensor(w.model, n)).detach().cpu().clone()
                for n, sel in iter_selected(self.plan, k, self.plan.names)
            },
            "scheduler": w.scheduler.state_dict(),
            "engine_steps": _engine_counters(engine),
            "step": w.step,
            "zero_stage": self.zero_stage,
            "island_size": self.island_size,
            "zero": None if shards is None else dict(enumerate(shards)),
        }

    @torch.no_grad()
    def load_worker_state_dict(self, k: int, state: dict[str, Any]) -> None:
        """Call after `load_global_state_dict`, on every rank of the island, with the saved state."""
        if "zero" not in state:
            raise ValueError(
                f"worker {k}: this checkpoint was not written by the DeepSpeed inner engine "
                "(no ZeRO shards); resume it with inner_engine='torch'"
            )
        saved = int(state["island_size"])
        if saved != self.island_size:
            raise ValueError(
                f"worker {k}: the checkpoint holds ZeRO shards for an island of {saved} ranks, "
                f"but this run's island has {self.island_size}; resume with the same world size "
                "(and number of workers) as the run that saved it"
            )
        if int(state["zero_stage"]) != self.zero_stage:
            raise ValueError(
                f"worker {k}: the checkpoint was saved at ZeRO stage {state['zero_stage']}, "
                f"this run uses zero_stage={self.zero_stage}"
            )
        shards = state["zero"]
        if not isinstance(shards, dict) or sorted(shards) != list(range(saved)):
            raise ValueError(f"worker {k}: the checkpoint lacks ZeRO shards (got {shards!r:.80})")
        w, engine = self.workers[k], self.engines[k]
        for n, sel in iter_selected(self.plan, k, self.plan.names):
            sel.view(get_tensor(w.model, n)).copy_(state["trained"][n])
        self._push_to_engine(k)
        engine.optimizer.load_state_dict(
            [shards[r] for r in range(saved)],
            load_optimizer_states=True,
            load_from_fp32_weights=True,
        )
        engine.optimizer.update_lp_params()  # module copies = the restored fp32 master
        w.scheduler.load_state_dict(state["scheduler"])
        for name, value in state["engine_steps"].items():
            setattr(engine, name, value)
        w.step = int(state["step"])


_ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def _engine_counters(engine: Any) -> dict[str, int]:
    return {n: int(getattr(engine, n)) for n in _ENGINE_COUNTERS if hasattr(engine, n)}


def _to_cpu(value: Any) -> Any:
    """``value`` with every tensor moved to the CPU (for pickling across ranks and to disk)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if type(value) is dict:
        return {key: _to_cpu(v) for key, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value
