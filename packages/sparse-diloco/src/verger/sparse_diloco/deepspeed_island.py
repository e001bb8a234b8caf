"""DeepSpeed ZeRO as the inner engine of an island (extra ``[deepspeed]``).

ZeRO (stages 1-2) moves every trained Parameter into flat buffers and keeps the fp32 master
copy, sharded over the island, inside its optimizer; a Parameter that is a *view* of a larger
weight (the default `PartialLinear`) would be cut loose from that weight. So a DeepSpeed
worker is built with standalone slices: each trained slice is its own Parameter, copied into
the full frozen weight at every forward pass. At a sync the slices are merged into the full
weights (`merge_slices`), the pseudo-gradients are taken as usual, and the new anchor is
written back into the engine's fp32 master weights with
`verger.core.distributed.deepspeed.set_full_fp32_params` (which refreshes the module copies).

Each worker is an island spanning the whole process group: every rank runs every local worker
on its rows of the batch (``rank::size``), ZeRO averages the gradients over the ranks and
shards the AdamW state. Islands on sub-groups of a larger world are not supported yet.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from verger.sparse_diloco.engine import DiLoCo, NonFiniteLossError, Worker, _island_mean
from verger.sparse_diloco.partial import (
    PartialLinear,
    build_worker_model,
    merge_slices,
)

ZERO_STAGES = (1, 2)


class DeepSpeedDiLoCo(DiLoCo):
    """`DiLoCo` whose workers take their inner steps with a DeepSpeed ZeRO engine.

    Needs an initialized process group; the island is the whole world (``island_group`` is
    set to it). ``zero_stage`` is 1 or 2; ``config.grad_clip`` maps to DeepSpeed's
    ``gradient_clipping``, the inner warm-up to a LambdaLR the engine steps. The numbers equal
    the plain torch island (`DiLoCo` with ``island_group=WORLD``) up to reduction order.
    Worker checkpoints (inner optimizer state) are not supported with this engine.
    """

    def __init__(self, *args: Any, zero_stage: int = 2, **kwargs: Any) -> None:
        if zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage={zero_stage!r} must be one of {ZERO_STAGES}")
        if not dist.is_initialized():
            raise ValueError("DeepSpeedDiLoCo needs an initialized torch.distributed group")
        if kwargs.get("island_group") not in (None, dist.group.WORLD):
            raise ValueError(
                "DeepSpeedDiLoCo: island_group must be the whole world (None or "
                "dist.group.WORLD); islands on sub-groups are not supported"
            )
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
        engine = build_engine(local, ds_config, optimizer=opt, lr_scheduler=sched)
        self.engines[k] = engine
        return Worker(index=k, model=engine.module, optimizer=opt, scheduler=sched)

    def inner_step(self, worker: Worker) -> float:
        """One ZeRO AdamW step on the island's share of the batch; returns the island loss."""
        engine = self.engines[worker.index]
        batch = self.data.batch(worker.index, worker.step)
        batch = tuple(t[self.island_rank :: self.island_size] for t in batch)
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
        from verger.core.distributed.deepspeed import set_full_fp32_params

        for k, w in self.workers.items():
            for module in w.model.modules():
                if isinstance(module, PartialLinear):  # the slice follows the merged weight
                    module.trainable.copy_(module.selection.view(module.weight))
            values = {
                n: p.detach().clone() for n, p in w.model.named_parameters() if p.requires_grad
            }
            set_full_fp32_params(self.engines[k], values)

    def load_global_state_dict(self, state: dict[str, Any]) -> None:
        super().load_global_state_dict(state)
        self._after_sync()

    def worker_state_dict(self, k: int) -> dict[str, Any]:
        raise NotImplementedError(
            "worker checkpoints are not supported with the DeepSpeed inner engine; "
            "checkpoint the global state (anchor, outer momentum) and restart the workers"
        )

    def load_worker_state_dict(self, k: int, state: dict[str, Any]) -> None:
        self.worker_state_dict(k)
