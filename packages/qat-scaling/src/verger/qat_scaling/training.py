"""Train one sweep run: the shared FP trunk up to a branch point, and a branch from there.

Both use verger-core's ``TrainLoop`` (clipping, NaN stop, checkpoints with the optimizer,
RNG and data position) with the LR set from the global step (:class:`StepLR`), so a run
resumed from any checkpoint, or branched from the trunk, repeats the uninterrupted run
bit for bit on CPU.

A branch loads the trunk checkpoint at its ``branch_step`` into the full-precision model
and optimizer, then :func:`~verger.qat_scaling.prepare` adds the quantizers (same weight
tensors) and their scales join the optimizer as a group without weight decay. It trains
the FP cooldown when there is one, switches fake quantization on at ``switch_step``
(scales initialized from the weights at that moment) and trains QAT to the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from verger.core.train import Checkpointer, LoopConfig, TrainLoop
from verger.core.validation import finite_number, integer, one_of, probability
from verger.qat_scaling.config import QuantConfig
from verger.qat_scaling.data import LMData
from verger.qat_scaling.prepare import enable_fake_quant, fake_quantizers, prepare, scale_parameters
from verger.qat_scaling.schedule import COOLDOWNS, QATSchedule, trunk_lr


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """Optimizer and schedule of every run of a sweep (AdamW; LR multipliers from
    :class:`~verger.qat_scaling.QATSchedule`)."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    beta2: float = 0.95
    warmup_steps: int = 20
    cooldown_fraction: float = 0.2
    cooldown: str = "1-sqrt"
    qat_warmup_steps: int = 10
    qat_lr_ratio: float = 1.0
    grad_clip: float = 1.0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        finite_number("lr", self.lr, above=0.0)
        finite_number("weight_decay", self.weight_decay, at_least=0.0)
        probability("beta2", self.beta2, open_right=True)
        integer("warmup_steps", self.warmup_steps, at_least=0)
        integer("qat_warmup_steps", self.qat_warmup_steps, at_least=0)
        integer("checkpoint_every", self.checkpoint_every, at_least=1)
        probability("cooldown_fraction", self.cooldown_fraction, open_right=True)
        one_of("cooldown", self.cooldown, COOLDOWNS)
        finite_number("qat_lr_ratio", self.qat_lr_ratio, above=0.0)
        finite_number("grad_clip", self.grad_clip, above=0.0)

    def schedule(self, total_steps: int, qat_fraction: float, fused: bool) -> QATSchedule:
        return QATSchedule(
            total_steps=total_steps,
            qat_fraction=qat_fraction,
            fused=fused,
            warmup_steps=self.warmup_steps,
            cooldown_fraction=self.cooldown_fraction,
            cooldown=self.cooldown,
            qat_warmup_steps=self.qat_warmup_steps,
            qat_lr_ratio=1.0 if fused else self.qat_lr_ratio,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepLR:
    """Sets each group's ``lr`` to ``peak_lr * schedule(step)``; its state is the step, so
    it needs nothing but the step to resume (``TrainLoop`` saves it with the checkpoint)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, schedule: Callable[[int], float], step: int
    ) -> None:
        self.optimizer, self.schedule, self.last_step = optimizer, schedule, step
        self._apply()

    def _apply(self) -> None:
        factor = self.schedule(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state["step"])
        self._apply()


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW: weight decay on matrices, none on norms (vectors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    for g in groups:
        g["peak_lr"] = config.lr
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.beta2))


def add_quantizers(
    model: nn.Module, optimizer: torch.optim.Optimizer, config: QuantConfig, lr: float
) -> None:
    """:func:`prepare` the model and give the learned scales their own group (no decay)."""
    prepare(model, config)
    scales = scale_parameters(model)
    if scales:
        optimizer.add_param_group({"params": scales, "weight_decay": 0.0, "peak_lr": lr, "lr": lr})


def _loss_fn(device: torch.device) -> Callable[[nn.Module, Any], torch.Tensor]:
    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        out = model(batch[0].to(device), batch[1].to(device)).loss
        assert out is not None
        return out

    return loss


@torch.no_grad()
def evaluate(model: nn.Module, data: LMData, device: torch.device) -> dict[str, float]:
    """Mean token loss (nats) on each domain's fixed validation windows."""
    was_training = model.training
    model.eval()
    losses = {}
    for domain in data.val:
        total = count = 0.0
        for x, y in data.val_batches(domain):
            loss = model(x.to(device), y.to(device)).loss
            assert loss is not None
            total += float(loss) * y.numel()
            count += y.numel()
        losses[domain] = total / count
    model.train(was_training)
    return losses


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: LMData,
    *,
    seed: int,
    start: int,
    stop: int,
    lr: Callable[[int], float],
    checkpointer: Checkpointer,
    config: TrainConfig,
    device: torch.device,
    desc: str,
    show_progress: bool | None,
) -> None:
    if start >= stop:
        return
    loop = TrainLoop(
        model,
        optimizer,
        config=LoopConfig(
            max_steps=stop,
            grad_clip=config.grad_clip,
            checkpoint_every=config.checkpoint_every,
            log_every=max(1, stop // 10),
        ),
        scheduler=StepLR(optimizer, lr, start),
        loss_fn=_loss_fn(device),
        checkpointer=checkpointer,
        show_progress=show_progress,
        desc=desc,
    )
    loop.step = start
    loop.run(data.batches(seed, start), resume=False)


@dataclass(frozen=True)
class TrunkState:
    """Where the trunk of one (size, seed) keeps its branch points and resume checkpoints."""

    directory: Path

    def point(self, step: int) -> Checkpointer:
        return Checkpointer(self.directory / f"point-{step:08d}", keep=1)

    def points(self) -> list[int]:
        found = []
        for child in self.directory.glob("point-*"):
            step = int(child.name.split("-")[1])
            if self.point(step).latest_step() == step:
                found.append(step)
        return sorted(found)

    @property
    def resume(self) -> Checkpointer:
        return Checkpointer(self.directory / "ckpt", keep=2)


def train_trunk(
    trunk: TrunkState,
    point: int,
    *,
    build: Callable[[], nn.Module],
    data: LMData,
    seed: int,
    config: TrainConfig,
    device: torch.device,
    show_progress: bool | None = None,
) -> int:
    """Make sure the trunk checkpoint at step ``point`` exists; returns the steps trained.

    Starts from the latest state at or before ``point``: a saved branch point, the trunk's
    resume checkpoint, or the initial weights.
    """
    if point in trunk.points():
        return 0
    model = build().to(device)
    optimizer = make_optimizer(model, config)
    start = max([p for p in trunk.points() if p <= point], default=0)
    resume_step = trunk.resume.latest_step()
    if resume_step is not None and start < resume_step <= point:
        trunk.resume.load(resume_step, model=model, optimizer=optimizer)
        start = resume_step
    elif start > 0:
        trunk.point(start).load(start, model=model, optimizer=optimizer)
    _train(
        model, optimizer, data, seed=seed, start=start, stop=point,
        lr=lambda s: trunk_lr(s, config.warmup_steps), checkpointer=trunk.resume,
        config=config, device=device, desc=f"trunk->{point}", show_progress=show_progress,
    )  # fmt: skip
    trunk.point(point).save(
        point, model=model, optimizer=optimizer, extra={"data": {"step": point}}
    )
    return point - start


@dataclass(frozen=True)
class BranchResult:
    val_loss_by_domain: dict[str, float]
    steps_trained: int
    model: nn.Module


def train_branch(
    *,
    trunk: TrunkState,
    run_dir: Path,
    schedule: QATSchedule,
    quant: QuantConfig | None,
    build: Callable[[], nn.Module],
    data: LMData,
    seed: int,
    config: TrainConfig,
    device: torch.device,
    show_progress: bool | None = None,
) -> BranchResult:
    """Train one run from the trunk's checkpoint at ``schedule.branch_step`` to its end
    (``quant=None``: a full-precision run); resumes from ``run_dir/ckpt`` when present."""
    model = build().to(device)
    optimizer = make_optimizer(model, config)
    checkpointer = Checkpointer(run_dir / "ckpt", keep=2)
    resumed = checkpointer.latest_step()
    if resumed is not None:
        if quant is not None:
            add_quantizers(model, optimizer, quant, config.lr)
        checkpointer.load(resumed, model=model, optimizer=optimizer)
        step = resumed
    else:
        step = schedule.branch_step
        trunk.point(step).load(step, model=model, optimizer=optimizer)
        if quant is not None:
            add_quantizers(model, optimizer, quant, config.lr)
    start = step
    phases = [(schedule.switch_step, False), (schedule.total_steps, True)]
    for stop, qat in phases:
        if step >= stop:
            continue
        if qat and quant is not None and not fake_quantizers(model)[0][1].enabled:
            enable_fake_quant(model, True)
        _train(
            model, optimizer, data, seed=seed, start=step, stop=stop, lr=schedule.lr,
            checkpointer=checkpointer, config=config, device=device,
            desc="qat" if qat else "fp", show_progress=show_progress,
        )  # fmt: skip
        step = stop
    if quant is not None and schedule.qat_steps > 0:
        assert fake_quantizers(model)[0][1].enabled
    losses = evaluate(model, data, device)
    if not all(math.isfinite(v) for v in losses.values()):
        raise FloatingPointError(f"non-finite validation loss {losses}")
    return BranchResult(losses, schedule.total_steps - start, model)
