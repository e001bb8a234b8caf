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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from verger.core.train import LoopConfig, NonFiniteLossError, TrainLoop
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


def _check_inputs(
    model: object,
    plan: object,
    config: object,
    loss_fn: object,
    data: object,
    transport: object,
) -> None:
    """The engine's arguments have the types it needs (a TypeError naming the argument)."""
    expected = (("model", model, nn.Module), ("plan", plan, SubsetPlan))
    for name, value, kind in (*expected, ("config", config, DiLoCoConfig)):
        if not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (model, batch) -> loss, got {loss_fn!r}")
    if not callable(getattr(data, "batch", None)):
        raise TypeError(f"data must have a batch(worker, step) method, got {type(data).__name__}")
    if transport is not None and not all(
        callable(getattr(transport, m, None)) for m in ("exchange", "local_workers")
    ):
        raise TypeError(
            f"transport must be a Transport (exchange, local_workers), got {type(transport).__name__}"
        )


def _scalar_loss(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` whose result is checked: a one-element floating-point tensor that can be
    back-propagated (a model output object or a per-token loss is named, not misread)."""

    def checked(model: nn.Module, batch: Any) -> torch.Tensor:
        loss = loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"loss_fn must return a scalar loss tensor, got {type(loss).__name__} "
                "(e.g. return model(x, targets=y).loss for verger.core's TransformerLM)"
            )
        if loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError(
                f"loss_fn must return a scalar floating-point loss, got a {loss.dtype} tensor "
                f"of shape {tuple(loss.shape)} (reduce it, e.g. with .mean())"
            )
        return loss

    checked.__wrapped__ = loss_fn  # type: ignore[attr-defined]
    return checked


@dataclass
class Worker:
    """One worker's local model, inner optimizer and data position.

    The worker reads batches ``data.batch(shard, step)``; ``shard`` is its own index except
    when a fault-tolerant run has it train data another worker did not get to.
    """

    index: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    losses: list[float] = field(default_factory=list)
    shard: int | None = None
    loop: TrainLoop | None = field(default=None, repr=False)  # the inner step (`inner_loop`)

    @property
    def data_shard(self) -> int:
        return self.index if self.shard is None else self.shard


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
        _check_inputs(model, plan, config, loss_fn, data, transport)
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
        self.loss_fn, self.data = _scalar_loss(loss_fn), data
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
        worker = Worker(index=k, model=local, optimizer=opt, scheduler=sched)
        worker.loop = self.inner_loop(worker)
        return worker

    def inner_loop(self, worker: Worker) -> TrainLoop:
        """verger-core's training step for ``worker``: its loss, clipping, NaN check, AdamW.

        In an island the loss goes through ``DistributedDataParallel`` over the island's
        ranks, which averages the gradients before they are clipped (data parallel).
        """
        forward: nn.Module = worker.model
        if self.island_size > 1:
            import inspect

            from torch.nn.parallel import DistributedDataParallel

            # the island's ranks hold the same buffers (frozen weights): no per-forward sync
            quiet: dict[str, Any] = (
                {"forward_sync_buffers": False}
                if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": False}  # torch < 2.14
            )
            forward = DistributedDataParallel(
                worker.model, process_group=self.island_group, **quiet
            )
        return TrainLoop(
            worker.model,
            worker.optimizer,
            config=LoopConfig(max_steps=self.config.inner_steps, grad_clip=self.config.grad_clip),
            scheduler=worker.scheduler,
            loss_fn=self.loss_fn,
            forward_model=forward,
            show_progress=False,
            desc=f"worker {worker.index}",
        )

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
        """One AdamW step on the worker's subset; returns the loss (the island's mean)."""
        batch = self.data.batch(worker.data_shard, worker.step)
        if self.island_size > 1:
            batch = island_share(batch, self.island_rank, self.island_size)
        loop = worker.loop if worker.loop is not None else self.inner_loop(worker)
        worker.loop = loop
        try:
            value = loop.train_step([batch]).loss
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(
                f"worker {worker.index}, inner step {worker.step}: {exc}"
            ) from exc
        if self.island_size > 1:
            value = _island_mean(value, self.island_group, self.island_size)
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
        self.apply_outer_step(names, dict(enumerate(gathered)))
        self.reset_locals(names)
        self._after_sync()
        self.syncs += 1

    @torch.no_grad()
    def apply_outer_step(self, names: list[str], payloads: Mapping[int, torch.Tensor]) -> None:
        """The outer step on ``names`` from the payloads of the workers that sent one.

        ``payloads`` maps worker index -> its encoded pseudo-gradient. Each coordinate is
        averaged over the m[i] workers *among these* that trained it (summed in worker order,
        so every process gets the same bits). A coordinate that none of them trained keeps
        its value, and its outer momentum is left as it is (neither decayed nor applied):
        with every worker present this only concerns coordinates no worker trains, whose
        momentum is zero anyway.
        """
        contributors = sorted(payloads)
        # SGD steps every tensor holding a .grad: drop any left on the global model (by the
        # user, before or between rounds) so that only the synced ``names`` move
        self.outer.zero_grad(set_to_none=True)
        sums = {n: torch.zeros_like(self.anchor[n]) for n in names}
        for k in contributors:
            selected = list(iter_selected(self.plan, k, names))
            numel = sum(sel.numel(self.plan.shapes[n]) for n, sel in selected)
            values = self.codec.decode(payloads[k].to(self._device()), numel)
            offset = 0
            for n, sel in selected:
                shape = sel.shape(self.plan.shapes[n])
                count = math.prod(shape)
                sel.view(sums[n]).add_(values[offset : offset + count].view(shape))
                offset += count
        untouched: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        for n in names:
            counts = self.plan.counts(n, contributors).to(sums[n].device)
            mean = sums[n] / counts.clamp_min(1.0)
            self.anchor[n].grad = mean * self.config.outer_scale(counts, len(contributors))
            if bool((counts == 0).any()):
                buf = self.outer.state.get(self.anchor[n], {}).get("momentum_buffer")
                untouched[n] = (
                    counts == 0,
                    self.anchor[n].detach().clone(),
                    None if buf is None else buf.clone(),
                )
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        for n, (frozen, before, buf_before) in untouched.items():
            p = self.anchor[n]
            p.copy_(torch.where(frozen, before, p))
            buf = self.outer.state[p]["momentum_buffer"]
            if buf is not None:  # first step: SGD created the buffer from the (zero) grads
                buf.copy_(torch.where(frozen, 0.0 if buf_before is None else buf_before, buf))

    @torch.no_grad()
    def reset_locals(self, names: list[str]) -> None:
        """Every local worker restarts from the anchor on ``names``."""
        for w in self.workers.values():
            for n in names:
                get_tensor(w.model, n).copy_(self.anchor[n])

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
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
            raise ValueError(f"rounds={rounds!r} must be an int >= 0")
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
