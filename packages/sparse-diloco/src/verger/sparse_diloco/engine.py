"""DiLoCo with partial parameter updates: inner AdamW on each worker's subset, outer Nesterov.

One `DiLoCo` object drives the workers that live in its process (all W in the simulator, one
per rank under torch.distributed) and holds a copy of the global state: the anchor parameters
(the global model) and the outer momentum. Every process applies the same deterministic outer
update to the same gathered payloads, so the global state stays identical everywhere.

Pseudo-gradient sign: delta_k = anchor - local_k (a descent direction, like a gradient);
outer step: g[i] = (1/m[i]) sum_{k trains i} delta_k[i], then SGD(nesterov) on the anchor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from verger.sparse_diloco.config import DiLoCoConfig
from verger.sparse_diloco.partial import build_worker_model, get_tensor, trainable_parameters
from verger.sparse_diloco.subset import SubsetPlan, iter_selected
from verger.sparse_diloco.transport import LocalTransport, Transport


class BatchSource(Protocol):
    """Deterministic data: the batch worker ``worker`` uses at its inner step ``step``.

    Being a pure function of (worker, step) makes the data position one integer per worker,
    which is what exact resume and simulator/multi-process equality need.
    """

    def batch(self, worker: int, step: int) -> Any: ...


LossFn = Callable[[nn.Module, Any], torch.Tensor]


class NonFiniteLossError(RuntimeError):
    """A worker's inner loss became NaN or inf."""


@dataclass
class Worker:
    """One worker's local model, inner optimizer and data position."""

    index: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    losses: list[float] = field(default_factory=list)


class DiLoCo:
    """The training engine. ``model`` is the initial global model and becomes the anchor.

    ``loss_fn(model, batch)`` returns a scalar loss; ``data.batch(worker, step)`` gives batches.
    ``transport`` defaults to `LocalTransport` (all workers simulated in this process).
    ``island_group``: this worker is an *island* of several data-parallel ranks; each rank
    takes its share of every batch (rows ``rank::size``; batches must be tuples of tensors)
    and gradients are averaged over the island before each inner step.
    """

    #: True when `worker_state_dict` is collective over the island (every rank must call it).
    collective_worker_state = False

    def __init__(
        self,
        model: nn.Module,
        plan: SubsetPlan,
        config: DiLoCoConfig,
        *,
        loss_fn: LossFn,
        data: BatchSource,
        transport: Transport | None = None,
        island_group: dist.ProcessGroup | None = None,
    ) -> None:
        if plan.num_workers != config.num_workers:
            raise ValueError(
                f"plan has {plan.num_workers} workers but config.num_workers={config.num_workers}"
            )
        self.transport = transport or LocalTransport(config.num_workers)
        if self.transport.num_workers != config.num_workers:
            raise ValueError(
                f"transport links {self.transport.num_workers} workers, config expects "
                f"{config.num_workers}"
            )
        self.model, self.plan, self.config = model, plan, config
        self.loss_fn, self.data = loss_fn, data
        self.island_group = island_group
        self.island_size = dist.get_world_size(island_group) if island_group is not None else 1
        self.island_rank = dist.get_rank(island_group) if island_group is not None else 0
        self.codec = config.codec()
        self.anchor: dict[str, nn.Parameter] = dict(model.named_parameters())
        if list(self.anchor) != plan.names:
            raise ValueError("the plan was built for another model (parameter names differ)")
        for n, p in self.anchor.items():  # same names, other sizes: fail now, not at the sync
            if p.shape != plan.shapes[n]:
                raise ValueError(
                    f"the plan was built for another model: {n!r} has shape {tuple(p.shape)} "
                    f"here, {tuple(plan.shapes[n])} in the plan"
                )
        idle = [k for k in range(plan.num_workers) if plan.trained_numel(k) == 0]
        if idle:
            raise ValueError(
                f"worker(s) {idle} train no parameter under this plan; give every worker a "
                "non-empty subset (or use fewer workers)"
            )
        self.outer = torch.optim.SGD(
            list(self.anchor.values()),
            lr=config.outer_lr,
            momentum=config.outer_momentum,
            nesterov=config.nesterov,
        )
        self.fragments = plan.fragments(config.num_fragments)
        self.workers = {k: self.make_worker(k) for k in self.transport.local_workers()}
        self.syncs = 0  # fragment syncs done (= outer steps when num_fragments == 1)
        self.bytes_sent = 0  # payload bytes put on the wire by all workers together

    def make_worker(self, k: int) -> Worker:
        """A fresh worker ``k`` (local model from the current anchor, new AdamW state)."""
        local = build_worker_model(self.model, self.plan, k)
        opt, sched = self.inner_optimizer(local, k)
        return Worker(index=k, model=local, optimizer=opt, scheduler=sched)

    def inner_optimizer(
        self, local: nn.Module, k: int
    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
        """Worker ``k``'s AdamW over its trainable subset, with the linear inner warm-up."""
        c = self.config
        opt = torch.optim.AdamW(
            trainable_parameters(local),
            lr=c.worker_inner_lr(self.plan.trained_fraction(k)),
            betas=c.inner_betas,
            weight_decay=c.inner_weight_decay,
            foreach=False,  # per-tensor math: identical numbers whatever the grouping
        )
        warm = c.inner_warmup
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )
        return opt, sched

    # ---- inner steps ----------------------------------------------------------------------
    def inner_step(self, worker: Worker) -> float:
        """One AdamW step on the worker's subset; returns the loss."""
        batch = self.data.batch(worker.index, worker.step)
        if self.island_size > 1:
            batch = island_share(batch, self.island_rank, self.island_size)
        loss = self.loss_fn(worker.model, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"worker {worker.index}: loss {value} at inner step {worker.step}; lower "
                "inner_lr or enable grad_clip"
            )
        loss.backward()
        params = worker.optimizer.param_groups[0]["params"]
        if self.island_size > 1:  # data parallel inside the island: average the gradients
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.island_group)
                    p.grad.div_(self.island_size)
            value = _island_mean(value, self.island_group, self.island_size)
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip, foreach=False)
        worker.optimizer.step()
        worker.scheduler.step()
        worker.optimizer.zero_grad(set_to_none=True)
        worker.step += 1
        worker.losses.append(value)
        return value

    # ---- outer step -----------------------------------------------------------------------
    def _sizes(self, names: list[str]) -> list[int]:
        return [
            self.codec.nbytes(
                sum(sel.numel(self.plan.shapes[n]) for n, sel in iter_selected(self.plan, k, names))
            )
            for k in range(self.plan.num_workers)
        ]

    @torch.no_grad()
    def pseudo_gradient(self, worker: Worker, names: list[str]) -> torch.Tensor:
        """Worker's encoded delta = anchor - local on its trained coordinates of ``names``."""
        parts = [
            (sel.view(self.anchor[n]) - sel.view(get_tensor(worker.model, n))).reshape(-1)
            for n, sel in iter_selected(self.plan, worker.index, names)
        ]
        flat = torch.cat(parts) if parts else torch.zeros(0, device=self._device())
        return self.codec.encode(flat)

    def _device(self) -> torch.device:
        return next(iter(self.anchor.values())).device

    @torch.no_grad()
    def sync(self, names: list[str]) -> None:
        """Exchange pseudo-gradients of ``names``, take the outer step, reset the locals."""
        sizes = self._sizes(names)
        self._before_sync()
        payloads = {k: self.pseudo_gradient(w, names) for k, w in self.workers.items()}
        gathered = self.transport.exchange(payloads, sizes)
        self.bytes_sent += sum(sizes)
        # SGD steps every tensor holding a .grad: drop any left on the global model (by the
        # user, before or between rounds) so that only the synced ``names`` move
        self.outer.zero_grad(set_to_none=True)
        sums = {n: torch.zeros_like(self.anchor[n]) for n in names}
        for k, payload in enumerate(gathered):
            selected = list(iter_selected(self.plan, k, names))
            numel = sum(sel.numel(self.plan.shapes[n]) for n, sel in selected)
            values = self.codec.decode(payload.to(self._device()), numel)
            offset = 0
            for n, sel in selected:
                shape = sel.shape(self.plan.shapes[n])
                count = math.prod(shape)
                sel.view(sums[n]).add_(values[offset : offset + count].view(shape))
                offset += count
        for n in names:
            counts = self.plan.counts(n).to(sums[n].device)
            mean = sums[n] / counts.clamp_min(1.0)
            self.anchor[n].grad = mean * self.config.outer_scale(counts)
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        for w in self.workers.values():
            for n in names:
                get_tensor(w.model, n).copy_(self.anchor[n])
        self._after_sync()
        self.syncs += 1

    def _before_sync(self) -> None:
        """Hook for inner engines whose local state is not the model's tensors (DeepSpeed)."""

    def _after_sync(self) -> None:
        """Hook: the workers' models now hold the new anchor on the synced names."""

    # ---- rounds ---------------------------------------------------------------------------
    def round(self) -> dict[str, float]:
        """H inner steps per local worker with the syncs due in them; returns round figures."""
        c = self.config
        losses: list[float] = []
        for _ in range(c.num_fragments):
            for w in self.workers.values():
                losses += [self.inner_step(w) for _ in range(c.sync_interval)]
            self.sync(self.fragments[self.syncs % len(self.fragments)])
        return {"inner_loss": sum(losses) / len(losses), "bytes_sent": float(self.bytes_sent)}

    def train(
        self, rounds: int, *, callback: Callable[[int, dict[str, float]], None] | None = None
    ) -> list[dict[str, float]]:
        """Run ``rounds`` rounds (outer steps); ``callback(round_index, figures)`` after each."""
        history = []
        for _ in range(rounds):
            figures = self.round()
            history.append(figures)
            if callback is not None:
                callback(self.rounds_done, figures)
        return history

    @property
    def rounds_done(self) -> int:
        return self.syncs // self.config.num_fragments

    # ---- state ----------------------------------------------------------------------------
    def run_setup(self) -> dict[str, Any]:
        """What a checkpoint of this run can only be resumed with (JSON-serializable).

        The worker count, the fragments (the sync counter means rounds x F), the parameter
        shapes and every worker's selections: the saved worker states and outer momentum
        are laid out for exactly these. Hyper-parameters such as learning rates may change.
        """
        return {
            "num_workers": self.config.num_workers,
            "num_fragments": self.config.num_fragments,
            "shapes": {n: list(s) for n, s in self.plan.shapes.items()},
            "plan": [
                {n: [sel.dim, sel.start, sel.stop] for n, sel in a.items()}
                for a in self.plan.assignments
            ],
        }

    def global_state_dict(self) -> dict[str, Any]:
        """Anchor parameters, outer momentum and counters (identical on every process)."""
        return {
            "anchor": {n: p.detach().clone() for n, p in self.anchor.items()},
            "outer": self.outer.state_dict(),
            "syncs": self.syncs,
            "bytes_sent": self.bytes_sent,
        }

    def worker_state_dict(self, k: int) -> dict[str, Any]:
        """Worker ``k``'s trained coordinates, inner optimizer/scheduler state, data position."""
        w = self.workers[k]
        return {
            "trained": {
                n: sel.view(get_tensor(w.model, n)).detach().clone()
                for n, sel in iter_selected(self.plan, k, self.plan.names)
            },
            "optimizer": w.optimizer.state_dict(),
            "scheduler": w.scheduler.state_dict(),
            "step": w.step,
        }

    @torch.no_grad()
    def load_global_state_dict(self, state: dict[str, Any]) -> None:
        for n, p in self.anchor.items():
            p.copy_(state["anchor"][n])
        self.outer.load_state_dict(state["outer"])
        self.syncs, self.bytes_sent = int(state["syncs"]), int(state["bytes_sent"])
        for w in self.workers.values():  # frozen coordinates of a worker equal the anchor
            for n in self.plan.names:
                get_tensor(w.model, n).copy_(self.anchor[n])

    @torch.no_grad()
    def load_worker_state_dict(self, k: int, state: dict[str, Any]) -> None:
        """Call after `load_global_state_dict`."""
        w = self.workers[k]
        for n, sel in iter_selected(self.plan, k, self.plan.names):
            sel.view(get_tensor(w.model, n)).copy_(state["trained"][n])
        w.optimizer.load_state_dict(state["optimizer"])
        w.scheduler.load_state_dict(state["scheduler"])
        w.step = int(state["step"])


def inner_state_numel(worker: Worker) -> dict[str, int]:
    """Elements of gradient-capable parameters and of optimizer state held by a worker."""
    trainable = sum(p.numel() for p in trainable_parameters(worker.model))
    state = sum(
        t.numel()
        for s in worker.optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    return {"trainable": trainable, "optimizer_state": state}


def island_share(batch: Any, rank: int, size: int) -> tuple[torch.Tensor, ...]:
    """Island rank ``rank``'s rows (``rank::size``) of every tensor of ``batch``.

    The island averages its ranks' gradients of per-rank mean losses; that equals the
    gradient of the whole batch only when every rank gets the same number of rows.
    """
    rows = {t.shape[0] for t in batch}
    if len(rows) != 1 or next(iter(rows)) % size:
        raise ValueError(
            f"an island of {size} ranks needs batches whose tensors share a row count "
            f"divisible by {size}; got row counts {sorted(rows)}"
        )
    return tuple(t[rank::size] for t in batch)


def _island_mean(value: float, group: dist.ProcessGroup | None, size: int) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return float(t) / size
