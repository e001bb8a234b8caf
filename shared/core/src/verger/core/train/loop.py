"""A small training loop: gradient accumulation, clipping, NaN/inf stop, logging, checkpoints.

It owns no model or data logic: a ``loss_fn(model, batch) -> scalar tensor`` says how a batch
becomes a loss (default: ``model(input, target).loss`` for a ``(input, target, ...)`` batch).
Exact resume: the loop's checkpoints hold model, optimizer, scheduler, RNG and the data
source's ``state_dict()``, so a resumed run reproduces the uninterrupted losses bit for bit
(on CPU; on GPU up to non-deterministic kernels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from verger.core.train.checkpoint import Checkpointer
from verger.core.train.metrics import MetricsLogger
from verger.core.progress import progress_bar


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient norm; the optimizer step was skipped."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
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
    """One optimizer step: mean micro-batch loss, pre-clipping gradient norm, learning rate."""

    step: int
    loss: float
    grad_norm: float
    lr: float


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
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] = default_loss,
        checkpointer: Checkpointer | None = None,
        logger: MetricsLogger | None = None,
        show_progress: bool | None = None,
        desc: str = "train",
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
        self.step = 0
        self._params = [p for g in optimizer.param_groups for p in g["params"]]

    def train_step(self, micro_batches: Iterable[Any]) -> StepStats:
        """One optimizer step over ``micro_batches`` (their losses are averaged)."""
        batches = list(micro_batches)
        if not batches:
            raise ValueError("train_step needs at least one micro-batch")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            loss = self.loss_fn(self.model, batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"loss is {value} at step {self.step}; the optimizer step was skipped. "
                    "Lower the learning rate, enable grad_clip, or check the inputs."
                )
            (loss / len(batches)).backward()
            total += value
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
        return StepStats(step=self.step, loss=total / len(batches), grad_norm=grad_norm, lr=lr)

    def save(self, data: Any = None) -> None:
        """Checkpoint now (no-op without a checkpointer)."""
        if self.checkpointer is None:
            return
        extra = {"data": data.state_dict()} if hasattr(data, "state_dict") else {}
        self.checkpointer.save(
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra=extra,
        )

    def resume(self, data: Any = None) -> bool:
        """Restore the latest checkpoint if any (model, optimizer, scheduler, RNG, data).

        The logger, if any, is rewound to the restored step (:meth:`MetricsLogger.rewind`).
        """
        if self.checkpointer is None:
            return False
        ckpt = self.checkpointer.load_latest(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        if ckpt is None:
            return False
        self.step = ckpt.step
        if "data" in ckpt.extra and hasattr(data, "load_state_dict"):
            data.load_state_dict(ckpt.extra["data"])
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
                            self.step, loss=stats.loss, grad_norm=stats.grad_norm, lr=stats.lr
                        )
                every = cfg.checkpoint_every
                if (every and self.step % every == 0) or self.step == cfg.max_steps:
                    self.save(data)
        finally:
            bar.close()
        return history
