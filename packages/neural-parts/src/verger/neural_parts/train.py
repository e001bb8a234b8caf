"""Training: verger-core's TrainLoop around the five losses, data-parallel under torchrun.

``train(model, shapes, ...)`` runs in one process, or in each of N processes started by
``torchrun --nproc-per-node N`` (DistributedDataParallel; gloo on CPU, NCCL on GPU): each
rank draws its own batches, gradients are averaged, rank 0 writes checkpoints and logs.
Checkpoints (``<out>/checkpoints``) hold the model, the optimizer, the RNG and the data
step, so a resumed run reproduces the uninterrupted one exactly (CPU).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from verger.core.distributed import init_distributed
from verger.core.train import Checkpointer, LoopConfig, MetricsLogger, TrainLoop
from verger.core.validation import finite_number, integer, one_of
from verger.neural_parts.config import LossConfig, SampleConfig
from verger.neural_parts.data.batches import Batch, BatchStream
from verger.neural_parts.data.samples import ShapeSamples
from verger.neural_parts.losses import neural_parts_loss
from verger.neural_parts.model import NeuralParts

OPTIMIZERS = ("adam", "radam")


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation settings (the paper: Adam, lr 5e-5, gradient clipping at 1).

    The paper trains for 1.5M iterations at lr 5e-5; short CPU runs need a larger rate
    (the demo and bench use 1e-3 to 2e-3).
    """

    steps: int = 1000
    batch_size: int = 4
    lr: float = 5e-5
    optimizer: str = "adam"
    grad_clip: float | None = 1.0
    log_every: int = 10
    checkpoint_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        integer("steps", self.steps, at_least=1)
        integer("batch_size", self.batch_size, at_least=1)
        self.lr = finite_number("lr", self.lr, above=0)
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        if self.grad_clip is not None:
            self.grad_clip = finite_number("grad_clip", self.grad_clip, above=0)
        integer("log_every", self.log_every, at_least=1)
        integer("checkpoint_every", self.checkpoint_every, at_least=0)
        integer("seed", self.seed, at_least=0)


class LossModule(nn.Module):
    """The model and its loss as one module, so DDP sees the whole forward pass.

    ``forward(batch)`` returns the weighted total and each term as ``loss_<name>`` (floats,
    logged by the loop); ``last`` keeps the terms of the latest call.
    """

    def __init__(self, model: NeuralParts, loss: LossConfig) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.last: dict[str, float] = {}

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        cond = self.model(batch.inputs)
        terms = neural_parts_loss(
            self.model,
            cond,
            directions=batch.directions,
            surface=batch.surface,
            normals=batch.normals,
            volume=batch.volume,
            occupancy=batch.occupancy,
            weights=batch.weights,
            config=self.loss,
        )
        self.last = terms.as_floats()
        return terms.total, {f"loss_{k}": v for k, v in self.last.items() if k != "total"}


@dataclass
class TrainResult:
    """What a call to :func:`train` did: per-step losses of this call, the last terms, time."""

    losses: list[float]
    terms: dict[str, float]
    seconds: float
    steps_run: int
    world_size: int = 1


def make_optimizer(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "radam":
        return torch.optim.RAdam(params, lr=config.lr)
    return torch.optim.Adam(params, lr=config.lr)


def train(
    model: NeuralParts,
    shapes: Sequence[ShapeSamples],
    *,
    config: TrainConfig,
    samples: SampleConfig | None = None,
    loss: LossConfig | None = None,
    out: str | Path | None = None,
    device: torch.device | str = "cpu",
    resume: bool = True,
    show_progress: bool | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place on ``shapes``; checkpoints and logs under ``out`` if given.

    With ``resume`` and a checkpoint in ``out/checkpoints``, training continues from it.
    Under torchrun every rank calls this with the same arguments.
    """
    samples = samples or SampleConfig()
    loss = loss or LossConfig()
    device = torch.device(device)
    info = init_distributed(device=device if device.type == "cuda" else None)
    module = LossModule(model.to(device), loss)
    wrapped: nn.Module = module
    if info.world_size > 1:
        wrapped = DistributedDataParallel(
            module, device_ids=[device.index or 0] if device.type == "cuda" else None
        )
    stream = BatchStream(
        shapes,
        samples=samples,
        batch_size=config.batch_size,
        encoder=model.config.encoder,
        image_size=model.config.image_size,
        seed=config.seed,
        rank=info.rank,
    )
    data = _OnDevice(stream, device)
    checkpointer = logger = None
    if out is not None:  # every rank resumes from the checkpoints; the loop lets rank 0 write
        checkpointer = Checkpointer(Path(out) / "checkpoints")
        if info.is_main:
            logger = MetricsLogger(Path(out) / "logs", tensorboard=False)
    optimizer = make_optimizer(model.parameters(), config)
    # The loop checkpoints the plain module (the same keys at any world size) and computes
    # the loss with the DDP wrapper (gradients averaged across ranks). Each rank draws its own
    # batches, so each rank's RNG and data position go into the checkpoint.
    loop = TrainLoop(
        module,
        optimizer,
        config=LoopConfig(
            max_steps=config.steps,
            grad_clip=config.grad_clip,
            log_every=config.log_every,
            checkpoint_every=config.checkpoint_every,
        ),
        loss_fn=lambda forward, batch: forward(batch),
        forward_model=wrapped,
        per_rank_state=True,
        checkpointer=checkpointer,
        logger=logger,
        show_progress=show_progress if info.is_main else False,
        desc=desc,
    )
    start = time.perf_counter()
    try:
        stats = loop.run(data, resume=resume)
    finally:
        if logger is not None:
            logger.close()
    return TrainResult(
        losses=[s.loss for s in stats],
        terms=dict(module.last),
        seconds=time.perf_counter() - start,
        steps_run=len(stats),
        world_size=info.world_size,
    )


class _OnDevice:
    """The batch stream, moved to the device, keeping its resumable state."""

    def __init__(self, stream: BatchStream, device: torch.device) -> None:
        self.stream, self.device = stream, device

    def __iter__(self) -> _OnDevice:
        return self

    def __next__(self) -> Batch:
        return next(self.stream).to(self.device)

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)
