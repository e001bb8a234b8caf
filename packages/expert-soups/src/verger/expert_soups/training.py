"""Training a soup or a plain LM with verger-core's ``TrainLoop``, alone or under torchrun (DDP).

One function, :func:`train_model`, trains anything whose loss is a function of a batch: the
soup (batches ``(inputs, targets, h)`` from a :class:`~verger.expert_soups.MixtureStream`)
and plain ``TransformerLM`` baselines (batches from a ``DomainSampler``). With an initialized
process group of several ranks the model is wrapped in ``DistributedDataParallel``; each
rank draws its own windows, and rank 0 alone writes checkpoints and metrics. A checkpoint
holds every rank's data position and RNG (verger-core's ``TrainLoop(per_rank_state=True)``),
so resume is exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from verger.core.distributed import get_rank, get_world_size, is_initialized
from verger.core.train import (
    Checkpointer,
    LoopConfig,
    MetricsLogger,
    TrainLoop,
    cosine_schedule,
    lambda_lr,
)
from verger.core.validation import finite_number, integer
from verger.expert_soups.config import MetaDistributionConfig
from verger.expert_soups.domains import ClusteredCorpus
from verger.expert_soups.mixture import MetaDistribution, MixtureStream

Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@dataclass(kw_only=True)
class TrainSettings:
    """Optimizer and loop settings shared by the soup and every plain-model run.

    AdamW (betas 0.9/0.95) at peak ``lr``, linear warm-up over ``warmup_steps`` then cosine
    decay to ``min_lr_ratio * lr``; ``steps`` optimizer steps of ``batch_size`` windows per
    rank; gradient clipping at ``grad_clip`` (None: off). ``checkpoint_every=0`` saves only
    at the end (when an output folder is given).
    """

    steps: int
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    log_every: int = 25
    checkpoint_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        integer("TrainSettings.steps", self.steps, at_least=1)
        integer("TrainSettings.batch_size", self.batch_size, at_least=1)
        finite_number("TrainSettings.lr", self.lr, above=0)
        integer("TrainSettings.warmup_steps", self.warmup_steps, at_least=0)
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"TrainSettings.warmup_steps={self.warmup_steps} must be < steps={self.steps}"
            )
        ratio = finite_number("TrainSettings.min_lr_ratio", self.min_lr_ratio, at_least=0)
        if ratio > 1:
            raise ValueError(f"TrainSettings.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        finite_number("TrainSettings.weight_decay", self.weight_decay, at_least=0)
        if self.grad_clip is not None:
            finite_number("TrainSettings.grad_clip", self.grad_clip, above=0)
        integer("TrainSettings.log_every", self.log_every, at_least=1)
        integer("TrainSettings.checkpoint_every", self.checkpoint_every, at_least=0)
        integer("TrainSettings.seed", self.seed, at_least=0)


@dataclass
class TrainResult:
    """What a run did: steps and tokens (all ranks), wall seconds of this call, losses."""

    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        """Mean loss of the last tenth of the steps run by this call (nan when none)."""
        if not self.losses:
            return math.nan
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)


def rank_seed(seed: int, rank: int) -> int:
    """The data seed of ``rank`` (different windows per rank, reproducible)."""
    return seed * 100_003 + rank


def soup_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Loss of a soup on ``(inputs, targets, h, ...)``: h ``[k]`` for the whole batch, or
    ``[groups, k]`` for equal contiguous row groups (the mean of the groups' losses)."""
    inputs, targets, h = batch[0], batch[1], batch[2]
    if h.ndim == 1:
        return model(inputs, targets, h=h).loss
    rows = inputs.shape[0] // h.shape[0]
    losses = [
        model(inputs[g * rows : (g + 1) * rows], targets[g * rows : (g + 1) * rows], h=h[g]).loss
        for g in range(h.shape[0])
    ]
    return torch.stack(losses).mean()


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Loss of a plain LM on ``(inputs, targets, ...)``."""
    return model(batch[0], batch[1]).loss


def soup_stream(
    clusters: ClusteredCorpus,
    meta: MetaDistributionConfig,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    groups: int = 1,
    micro_batches: int = 1,
) -> MixtureStream:
    """The soup's stream on one rank: ``batch_size`` windows per step in ``groups`` groups,
    h from ``meta`` seeded alike on every rank (the step's h are shared by the ranks),
    windows from a sampler seeded per rank."""
    integer("groups", groups, at_least=1)
    if batch_size % groups:
        raise ValueError(f"batch_size={batch_size} must be a multiple of groups={groups}")
    pi = MetaDistribution(meta, clusters.n_clusters, sizes=clusters.token_counts, seed=seed)
    sampler = clusters.sampler(
        clusters.uniform_weights(), batch_size=batch_size // groups, seed=rank_seed(seed, rank)
    )
    return MixtureStream(pi, sampler, groups=groups, micro_batches=micro_batches)


def _to(batch: Batch, device: torch.device) -> Batch:
    return tuple(t.to(device, non_blocking=True) for t in batch)


def train_model(
    model: nn.Module,
    data: Iterable[Batch],
    settings: TrainSettings,
    *,
    loss_fn: LossFn = lm_loss,
    device: torch.device | str = "cpu",
    out_dir: str | Path | None = None,
    resume: bool = True,
    show_progress: bool | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place for ``settings.steps`` optimizer steps on ``data``.

    With ``out_dir`` the run checkpoints to ``out_dir/checkpoints`` (model, optimizer,
    schedule, RNG and data position of every rank) and logs ``out_dir/logs/metrics.jsonl``;
    ``resume=True`` continues from the latest checkpoint there. Under an initialized process
    group with several ranks the gradients are averaged by DDP.
    """
    device = torch.device(device)
    model.to(device)
    distributed = is_initialized() and get_world_size() > 1
    wrapped: nn.Module = model
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay
    )
    sched = lambda_lr(
        opt,
        cosine_schedule(
            settings.steps, warmup_steps=settings.warmup_steps, min_ratio=settings.min_lr_ratio
        ),
    )
    checkpointer = logger = None
    if out_dir is not None:
        checkpointer = Checkpointer(Path(out_dir) / "checkpoints")
        if get_rank() == 0:
            logger = MetricsLogger(Path(out_dir) / "logs", tensorboard=False)
    window_tokens: list[int] = []

    def counted_loss(forward: nn.Module, batch: Batch) -> torch.Tensor:
        if not window_tokens:
            window_tokens.append(batch[1].numel())
        return loss_fn(forward, _to(batch, device))

    loop = TrainLoop(
        model,
        opt,
        config=LoopConfig(
            max_steps=settings.steps,
            grad_clip=settings.grad_clip,
            log_every=settings.log_every,
            checkpoint_every=settings.checkpoint_every,
        ),
        scheduler=sched,
        loss_fn=counted_loss,
        forward_model=wrapped,
        per_rank_state=distributed,  # each rank's windows and RNG, gathered by rank 0
        checkpointer=checkpointer,
        logger=logger,
        show_progress=show_progress if get_rank() == 0 else False,
        desc=desc,
    )
    start = time.perf_counter()
    try:
        history = loop.run(data, resume=resume)
    finally:
        if logger is not None:
            logger.close()
    seconds = time.perf_counter() - start
    if not window_tokens and loop.step > 0:  # resumed a finished run: measure one batch
        window_tokens.append(next(iter(data))[1].numel())
    # every micro-batch has the same shape: tokens = steps x (targets per batch) x ranks
    tokens_per_step = (window_tokens[0] if window_tokens else 0) * get_world_size()
    return TrainResult(
        steps=loop.step,
        tokens=loop.step * tokens_per_step,
        seconds=seconds,
        losses=[s.loss for s in history],
    )
