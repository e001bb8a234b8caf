"""Training: CLIP, MAE and MAE+CLIP on verger-core's ``TrainLoop``, single process or torchrun.

Launch several processes with ``torchrun --nproc_per_node N -m verger.maeclip train ...``: each
rank reads a disjoint slice of every global batch, ``ClipLoss`` gathers the features of all
ranks (so the contrastive batch is the global batch) and DDP averages the gradients (the
loop's ``forward_model``). Checkpoints (``verger.core.train.Checkpointer``) hold the model,
optimizer, scheduler and, per rank (``per_rank_state=True``), the RNG state (each rank draws
its own MAE masks) and the data position of :class:`TrainBatches`: the step for in-memory and
map-style data, an (epoch, batch) pair for streamed data. Resuming reproduces the
uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from verger.core import resolve_device, seed_everything
from verger.core.train import (
    Checkpointer,
    LoopConfig,
    MetricsLogger,
    StepStats,
    TrainLoop,
    cosine_schedule,
    lambda_lr,
)
from verger.core.validation import finite_number, integer, non_negative_int, positive_int
from verger.maeclip.data import ImageTextCollate, ImageTextSet
from verger.maeclip.model import MAECLIP, MAECLIPConfig, build_model
from verger.maeclip.towers import CaptionTokenizer

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(kw_only=True)
class TrainConfig:
    """How to train. ``batch_size`` is the global batch (split evenly across ranks).

    ``warmup_steps=None`` warms up over a fifth of the steps, at most 20. ``log_every=0``
    writes no ``metrics.jsonl``; ``checkpoint_every=0`` saves only at the end (both need
    ``out_dir``).
    """

    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "auto"
    out_dir: str | Path | None = None
    checkpoint_every: int = 0
    log_every: int = 10
    num_workers: int = 0
    progress: bool | None = None
    desc: str = "train"

    def __post_init__(self) -> None:
        positive_int("steps", self.steps)
        integer("batch_size", self.batch_size, at_least=2)  # a contrastive batch needs pairs
        if self.warmup_steps is None:
            self.warmup_steps = min(20, self.steps // 5)
        non_negative_int("warmup_steps", self.warmup_steps)
        for name in ("checkpoint_every", "log_every", "num_workers"):
            non_negative_int(name, getattr(self, name))
        integer("seed", self.seed)
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be < steps={self.steps}")
        finite_number("lr", self.lr, above=0)
        finite_number("weight_decay", self.weight_decay, at_least=0)
        if self.grad_clip is not None:
            finite_number("grad_clip", self.grad_clip, above=0)
        if self.checkpoint_every and self.out_dir is None:
            raise ValueError("checkpoint_every > 0 needs out_dir")


@dataclass
class TrainResult:
    """The trained model (unwrapped), per-step history and the measured throughput.

    ``history`` holds this call's steps (``{"step", "loss", "clip_loss"?, "mae_loss"?, "lr",
    "grad_norm"}``); ``images_per_s`` counts every step of the run, resumed ones included.
    """

    model: MAECLIP
    history: list[dict[str, float]] = field(default_factory=list)
    images_per_s: float = 0.0
    resumed_from: int | None = None


class StepBatchSampler(Sampler[list[int]]):
    """Index batches for steps ``start..steps-1``: a seeded permutation per epoch, rank slice.

    Batch ``s`` depends only on (seed, s), which makes resuming at any step exact.
    """

    def __init__(
        self,
        n: int,
        *,
        batch_size: int,
        steps: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
    ) -> None:
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {world} ranks")
        check_batch_fits(n, batch_size)
        self.n, self.batch, self.steps, self.seed = n, batch_size, steps, seed
        self.rank, self.world, self.start = rank, world, start
        self.per_epoch = n // batch_size

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[list[int]]:
        local = self.batch // self.world
        perm, epoch = None, -1
        for step in range(self.start, self.steps):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                perm = torch.randperm(
                    self.n, generator=torch.Generator().manual_seed(self.seed + epoch)
                )
            assert perm is not None
            b = (step % self.per_epoch) * self.batch + self.rank * local
            yield perm[b : b + local].tolist()


def check_batch_fits(pairs: int, batch_size: int) -> None:
    """Refuse a global batch larger than the dataset (an epoch must hold one batch)."""
    if pairs < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the dataset ({pairs} pairs): use a "
            f"batch_size <= {pairs}"
        )


@dataclass
class StreamPosition:
    """Where this rank is in a streamed dataset: ``batch`` batches of ``epoch`` already used."""

    epoch: int = 0
    batch: int = 0


class TrainBatches:
    """This rank's ``(images, token ids)`` batches, one per step, resumable.

    In-memory and map-style data are indexed by the step (:class:`StepBatchSampler`); streamed
    data (an ``IterableDataset``) cycles epochs from a :class:`StreamPosition`. ``state_dict``
    is the position after the batches handed out so far, which ``TrainLoop`` saves with each
    checkpoint and gives back through ``load_state_dict`` before iterating.
    """

    def __init__(
        self,
        dataset: Dataset,
        tokenizer: CaptionTokenizer,
        cfg: TrainConfig,
        *,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.dataset, self.tokenizer, self.cfg = dataset, tokenizer, cfg
        self.rank, self.world = rank, world
        self.step = 0
        self.position = StreamPosition()
        self.restored = False

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "stream": asdict(self.position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.position = StreamPosition(**state["stream"])
        self.restored = True

    def __iter__(self) -> Iterator[Batch]:
        if isinstance(self.dataset, IterableDataset):  # streamed shards: cycle epochs
            yield from self._stream()
            return
        for batch in self._indexed():
            self.step += 1
            yield batch

    def _sampler(self) -> StepBatchSampler:
        return StepBatchSampler(
            len(self.dataset),  # type: ignore[arg-type]
            batch_size=self.cfg.batch_size,
            steps=self.cfg.steps,
            seed=self.cfg.seed,
            rank=self.rank,
            world=self.world,
            start=self.step,
        )

    def _indexed(self) -> Iterator[Batch]:
        data = self.dataset
        if isinstance(data, ImageTextSet):  # in memory: index directly, no worker overhead
            for idx in self._sampler():
                yield data.images[idx], self.tokenizer([data.captions[i] for i in idx])
            return
        yield from DataLoader(
            data,
            batch_sampler=self._sampler(),
            collate_fn=ImageTextCollate(self.tokenizer),
            num_workers=self.cfg.num_workers,
            # its own generator: a loader would otherwise draw its worker seed from the global
            # RNG and shift the MAE masks of every later step (a resume starts a loader where
            # the uninterrupted run did not)
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def _stream(self) -> Iterator[Batch]:
        """Cycle epochs from ``self.position``, updated as batches are handed out.

        A resume replays ``position.epoch`` (``set_epoch`` fixes its order) and drops the
        batches already trained on: exact whenever the stream's order depends only on the epoch.
        """
        dataset, cfg, position = self.dataset, self.cfg, self.position
        skip = position.batch
        while True:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(position.epoch)
            loader = DataLoader(
                dataset,
                batch_size=cfg.batch_size // self.world,
                collate_fn=ImageTextCollate(self.tokenizer),
                num_workers=cfg.num_workers,
                drop_last=True,
                generator=torch.Generator().manual_seed(cfg.seed + position.epoch),
            )
            count = 0
            for batch in loader:
                count += 1
                if skip > 0:  # already trained on before the checkpoint
                    skip -= 1
                    continue
                position.batch = count
                yield batch
            if count == 0:
                raise ValueError("the streamed dataset yields fewer pairs than one batch per rank")
            position.epoch, position.batch = position.epoch + 1, 0


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms, embeddings, tokens and logit_scale (open_clip)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(
            k in name for k in ("embedding", "token", "logit_scale", "bn", "ln")
        )
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_checkpoint_dir(out_dir: str | Path | None, *, steps: int, resume: bool) -> None:
    """Refuse a run that ``out_dir``'s checkpoints would make meaningless, before any work.

    Resuming at or past ``steps`` would train nothing; starting over (``resume=False``) beside
    an earlier run's checkpoints would mix the two (its metrics log, and its checkpoints of
    later steps until the new run's first save replaces them).
    """
    if out_dir is None:
        return
    folder = Path(out_dir) / "checkpoints"
    latest = Checkpointer(folder).latest_step()
    if latest is None:
        return
    if not resume:
        raise ValueError(
            f"{folder} holds checkpoints of an earlier run (latest step {latest}); starting over "
            "there would mix the two runs: delete that folder or choose another output folder"
        )
    if latest >= steps:
        raise ValueError(
            f"{folder} holds step {latest}, which already reaches steps={steps}: the run is "
            "complete; ask for more steps to continue it, or start over in another folder"
        )


def _new_model(model_config: MAECLIPConfig, seed: int, device: torch.device) -> MAECLIP:
    with torch.random.fork_rng(devices=[]):  # the same init on every rank, masks untouched
        torch.manual_seed(seed)
        return build_model(model_config, device=device)


def _device(cfg: TrainConfig, world: int) -> torch.device:
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _Throughput:
    """Images per second of busy step time (data loading excluded), over the whole run."""

    def __init__(self, world: int, device: torch.device) -> None:
        self.world, self.device = world, device
        self.images, self.busy_s, self.started, self.batch = 0, 0.0, 0.0, 0
        self.last: dict[str, float] = {}

    def begin(self, images: torch.Tensor) -> None:
        self.started = time.perf_counter()
        self.batch = images.shape[0] * self.world

    def end(self, stats: StepStats) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.busy_s += time.perf_counter() - self.started
        self.images += self.batch
        self.last = record(stats)

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "busy_s": self.busy_s, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images, self.busy_s = int(state["images"]), float(state["busy_s"])
        self.last = dict(state["last"])

    @property
    def images_per_s(self) -> float:
        return self.images / self.busy_s if self.busy_s > 0 else math.nan


def record(stats: StepStats) -> dict[str, float]:
    """One step as a history record: step, loss, the parts, lr, grad_norm."""
    return {
        "step": stats.step,
        "loss": stats.loss,
        **stats.extras,
        "lr": stats.lr,
        "grad_norm": stats.grad_norm,
    }


def train(
    model_config: MAECLIPConfig,
    cfg: TrainConfig,
    dataset: Dataset,
    *,
    model: MAECLIP | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train ``model_config``'s objective on ``dataset`` for ``cfg.steps`` steps.

    With ``cfg.out_dir`` set, metrics go to ``out_dir/metrics.jsonl`` (+ TensorBoard under
    ``out_dir/tb`` when installed) and checkpoints to ``out_dir/checkpoints``; ``resume=True``
    continues from the latest one (a checkpoint of another model size or decoder raises
    ``verger.core.train.CheckpointError``, one line naming the differing shapes). Inside an
    initialised process group every rank must call this. A NaN/inf loss raises
    ``verger.core.train.NonFiniteLossError``.
    """
    rank, world = _dist_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {world} ranks")
    if not isinstance(dataset, IterableDataset):  # before any model or file is made
        check_batch_fits(len(dataset), cfg.batch_size)  # type: ignore[arg-type]
    check_checkpoint_dir(cfg.out_dir, steps=cfg.steps, resume=resume)
    device = _device(cfg, world)
    seed_everything(cfg.seed + rank)  # each rank draws its own MAE masks
    if model is None:
        model = _new_model(model_config, cfg.seed, device)
    model.to(device)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    scheduler = lambda_lr(optimizer, cosine_schedule(cfg.steps, warmup_steps=cfg.warmup_steps or 0))
    out = Path(cfg.out_dir) if cfg.out_dir is not None else None
    # every rank holds the checkpointer (only rank 0 writes): each reads its own state back
    checkpointer = Checkpointer(out / "checkpoints") if out is not None else None
    forward_model: torch.nn.Module = model
    if world > 1:
        forward_model = DistributedDataParallel(
            model, find_unused_parameters=model_config.method != "maeclip"
        )
    batches = TrainBatches(
        dataset, CaptionTokenizer(model.context_length), cfg, rank=rank, world=world
    )
    speed = _Throughput(world, device)

    def loss_fn(m: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, texts = batch
        speed.begin(images)
        output = m(images.to(device, non_blocking=True), texts.to(device, non_blocking=True))
        parts = {"clip_loss": output.clip_loss, "mae_loss": output.mae_loss}
        return output.loss, {k: float(v.detach()) for k, v in parts.items() if v is not None}

    def after_step(loop: TrainLoop, stats: StepStats) -> None:
        model.clamp_logit_scale()
        speed.end(stats)

    logger = MetricsLogger(out) if out is not None and rank == 0 and cfg.log_every else None
    loop = TrainLoop(
        model,
        optimizer,
        config=LoopConfig(
            max_steps=cfg.steps,
            grad_clip=cfg.grad_clip,
            log_every=max(cfg.log_every, 1),
            checkpoint_every=cfg.checkpoint_every,
        ),
        scheduler=scheduler,
        loss_fn=loss_fn,
        checkpointer=checkpointer,
        logger=logger,
        show_progress=cfg.progress if rank == 0 else False,
        desc=cfg.desc,
        forward_model=forward_model,
        after_step=after_step,
        extra_state=speed.state_dict,
        load_extra_state=speed.load_state_dict,
        per_rank_state=True,
    )
    resumed_from = None
    try:
        if resume and loop.resume(batches):
            resumed_from = loop.step
            if not batches.restored:
                raise ValueError(
                    f"{checkpointer.directory if checkpointer else out} step {loop.step} holds no "
                    "data position (written by verger-maeclip 0.1): resume it with that version, "
                    "or start over in another folder"
                )
        history = loop.run(batches, resume=False)
    finally:
        if logger is not None:
            logger.close()
    return TrainResult(
        model=model,
        history=[record(s) for s in history],
        images_per_s=speed.images_per_s,
        resumed_from=resumed_from,
    )


def load_finished(model_config: MAECLIPConfig, cfg: TrainConfig) -> TrainResult | None:
    """The result of a run whose checkpoint in ``cfg.out_dir`` already reaches ``cfg.steps``
    (killed after its last step, e.g. while evaluating), else None: the model of that
    checkpoint, its last step as ``history`` and its throughput."""
    if cfg.out_dir is None:
        return None
    checkpointer = Checkpointer(Path(cfg.out_dir) / "checkpoints")
    if checkpointer.latest_step() != cfg.steps:
        return None
    model = _new_model(model_config, cfg.seed, _device(cfg, _dist_info()[1]))
    ckpt = checkpointer.load(model=model, restore_rng=False)
    speed = _Throughput(1, torch.device("cpu"))
    if "user" in ckpt.extra:
        speed.load_state_dict(ckpt.extra["user"])
    return TrainResult(
        model=model,
        history=[speed.last] if speed.last else [],
        images_per_s=speed.images_per_s,
        resumed_from=ckpt.step,
    )
