"""The training loop every package uses: accumulation, clipping, NaN/inf stop, logging, checkpoints.

It owns no model or data logic: a ``loss_fn(model, batch)`` says how a batch becomes a loss
(default: ``model(input, target).loss`` for a ``(input, target, ...)`` batch); it may return
``(loss, {"name": value, ...})`` to log more figures per step. Hooks cover what the packages
need without a loop of their own:

- ``forward_model``: the module the loss is computed with (a ``DistributedDataParallel``
  wrapper), while ``model`` is what is checkpointed;
- ``after_step(loop, stats)``: work after each optimizer step (clamping a parameter, EMA
  weights, a metric), and ``extra_state()`` / ``load_extra_state(state)`` for what else a
  checkpoint must hold;
- ``per_rank_state=True``: inside a process group, each rank's RNG and data position are
  gathered into the checkpoint (rank 0 writes it) and each rank gets its own back on resume,
  so ranks that draw different randomness (masks, dropout, sampling) resume exactly;
- :meth:`TrainLoop.train_step` alone: one optimizer step with no logging or checkpointing
  (an inner step inside another algorithm's outer loop).

Exact resume: checkpoints hold model, optimizer, scheduler, RNG and the data source's
``state_dict()``, so a resumed run reproduces the uninterrupted losses bit for bit (on CPU; on
GPU up to non-deterministic kernels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from verger.core.progress import progress_bar
from verger.core.train.checkpoint import Checkpointer, rng_state, set_rng_state
from verger.core.train.metrics import MetricsLogger

LossResult = torch.Tensor | tuple[torch.Tensor, Mapping[str, float]]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient norm; the optimizer step was skipped."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def default_loss(model: torch.nn.Module, batch: Any) -> LossResult:
    """``model(batch[0], batch[1]).loss`` (or the output itself when it is a tensor)."""
    out = model(batch[0], batch[1])
    loss = getattr(out, "loss", out)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "the default loss_fn expects model(input, target) to return a tensor or an object "
            f"with .loss; got {type(out).__name__}: pass loss_fn=..."
        )
    return loss


@dataclass(kw_only=True)
class LoopConfig:
    """Loop settings. ``checkpoint_every=0`` saves only at the end (when a checkpointer is set)."""

    max_steps: int
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    log_every: int = 10
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        for name, low in (
            ("max_steps", 1),
            ("grad_accum", 1),
            ("log_every", 1),
            ("checkpoint_every", 0),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"LoopConfig.{name}={value!r} must be an int >= {low}")
        if self.grad_clip is not None and not (
            isinstance(self.grad_clip, int | float) and self.grad_clip > 0
        ):
            raise ValueError(f"LoopConfig.grad_clip={self.grad_clip!r} must be None or > 0")


@dataclass(frozen=True)
class StepStats:
    """One optimizer step: mean micro-batch loss, pre-clipping gradient norm, learning rate,
    and the mean of any extra figures the loss function returned."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    extras: Mapping[str, float] = field(default_factory=dict)


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainLoop:
    """Drive ``optimizer`` on ``model`` for ``config.max_steps`` optimizer steps.

    ``loop.run(data)`` resumes from ``checkpointer``'s latest checkpoint when there is one,
    then pulls ``grad_accum`` batches per step from ``iter(data)``; if ``data`` has
    ``state_dict``/``load_state_dict`` (e.g. :class:`verger.core.data.DomainSampler`), its
    position is saved and restored with the checkpoint.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        config: LoopConfig,
        scheduler: Any = None,
        loss_fn: Callable[[torch.nn.Module, Any], LossResult] = default_loss,
        checkpointer: Checkpointer | None = None,
        logger: MetricsLogger | None = None,
        show_progress: bool | None = None,
        desc: str = "train",
        forward_model: torch.nn.Module | None = None,
        after_step: Callable[[TrainLoop, StepStats], None] | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        load_extra_state: Callable[[dict[str, Any]], None] | None = None,
        per_rank_state: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.checkpointer = checkpointer
        self.logger = logger
        self.show_progress = show_progress
        self.desc = desc  # the progress bar's label
        self.forward_model = forward_model if forward_model is not None else model
        self.after_step = after_step
        self.extra_state = extra_state
        self.load_extra_state = load_extra_state
        self.per_rank_state = per_rank_state
        self.step = 0
        self._params = [p for g in optimizer.param_groups for p in g["params"]]

    def train_step(self, micro_batches: Iterable[Any]) -> StepStats:
        """One optimizer step over ``micro_batches`` (their losses are averaged)."""
        batches = list(micro_batches)
        if not batches:
            raise ValueError("train_step needs at least one micro-batch")
        self.forward_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        extras: dict[str, float] = {}
        for batch in batches:
            result = self.loss_fn(self.forward_model, batch)
            loss, more = result if isinstance(result, tuple) else (result, {})
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"loss is {value} at step {self.step}; the optimizer step was skipped. "
                    "Lower the learning rate, enable grad_clip, or check the inputs."
                )
            (loss / len(batches)).backward()
            total += value
            for name, figure in more.items():
                extras[name] = extras.get(name, 0.0) + float(figure) / len(batches)
        clip = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, clip))
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"gradient norm is {grad_norm} at step {self.step} (loss {total / len(batches):.4g}); "
                "the optimizer step was skipped. Lower the learning rate or check for overflow."
            )
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        stats = StepStats(
            step=self.step, loss=total / len(batches), grad_norm=grad_norm, lr=lr, extras=extras
        )
        if self.after_step is not None:
            self.after_step(self, stats)
        return stats

    def _local_state(self, data: Any) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if hasattr(data, "state_dict"):
            state["data"] = data.state_dict()
        if self.per_rank_state:
            state["rng"] = rng_state()
        return state

    def save(self, data: Any = None) -> None:
        """Checkpoint now (no-op without a checkpointer). Inside a process group only rank 0
        writes; with ``per_rank_state`` every rank must call this (their states are
        gathered), and every rank should hold the same checkpointer so that all resume."""
        rank, world = _dist_rank_world()
        local = self._local_state(data)
        if self.per_rank_state and world > 1:
            states: list[Any] = [None] * world
            dist.all_gather_object(states, local)
        else:
            states = [local]
        if self.checkpointer is not None and rank == 0:
            extra: dict[str, Any] = {"ranks": states} if self.per_rank_state else dict(local)
            if self.extra_state is not None:
                extra["user"] = self.extra_state()
            self.checkpointer.save(
                self.step,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                extra=extra,
            )
        if self.per_rank_state and world > 1:
            dist.barrier()  # no rank runs ahead of a checkpoint that is still being written

    def resume(self, data: Any = None) -> bool:
        """Restore the latest checkpoint if any (model, optimizer, scheduler, RNG, data).

        With ``per_rank_state`` each rank restores its own RNG and data position (a checkpoint
        from another world size restores the model and optimizer only, and says so). The
        logger, if any, is rewound to the restored step (:meth:`MetricsLogger.rewind`).
        """
        if self.checkpointer is None:
            return False
        ckpt = self.checkpointer.load_latest(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, map_location="cpu"
        )
        if ckpt is None:
            if self.logger is not None:
                self.logger.rewind(0)  # killed before its first checkpoint: every step reruns
            return False
        self.step = ckpt.step
        rank, world = _dist_rank_world()
        if self.per_rank_state:
            ranks = ckpt.extra.get("ranks")
            if not isinstance(ranks, list) or len(ranks) != world:
                saved = len(ranks) if isinstance(ranks, list) else "no"
                raise ValueError(
                    f"the checkpoint at step {ckpt.step} holds {saved} per-rank state(s) for a "
                    f"run of {world} rank(s): resume with the world size it was saved with"
                )
            local = ranks[rank]
            set_rng_state(local["rng"])
        else:
            local = ckpt.extra
        if "data" in local and hasattr(data, "load_state_dict"):
            data.load_state_dict(local["data"])
        if self.load_extra_state is not None and "user" in ckpt.extra:
            self.load_extra_state(ckpt.extra["user"])
        if self.logger is not None:
            # The steps after the checkpoint are run again: drop their first records so the
            # log stays one series per step.
            self.logger.rewind(self.step)
        return True

    def run(self, data: Iterable[Any], *, resume: bool = True) -> list[StepStats]:
        """Train until ``config.max_steps``; returns the stats of the steps run by this call."""
        cfg = self.config
        if resume:
            self.resume(data)
        batches: Iterator[Any] = iter(data)
        history: list[StepStats] = []
        bar = progress_bar(total=cfg.max_steps, desc=self.desc, enabled=self.show_progress)
        bar.update(self.step)
        try:
            while self.step < cfg.max_steps:
                micro = []
                for _ in range(cfg.grad_accum):
                    try:
                        micro.append(next(batches))
                    except StopIteration:
                        raise ValueError(
                            f"data ran out at step {self.step}: it must yield max_steps x "
                            f"grad_accum = {cfg.max_steps * cfg.grad_accum} batches"
                        ) from None
                stats = self.train_step(micro)
                history.append(stats)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    bar.set_postfix(loss=f"{stats.loss:.4f}")
                    if self.logger is not None:
                        self.logger.log(
                            self.step,
                            loss=stats.loss,
                            grad_norm=stats.grad_norm,
                            lr=stats.lr,
                            **stats.extras,
                        )
                every = cfg.checkpoint_every
                if (every and self.step % every == 0) or self.step == cfg.max_steps:
                    self.save(data)
        finally:
            bar.close()
        return history
