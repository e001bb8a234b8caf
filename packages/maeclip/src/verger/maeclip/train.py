"""Training: one loop for CLIP, MAE and MAE+CLIP, single process or torchrun (gloo / NCCL).

Launch several processes with ``torchrun --nproc_per_node N -m verger.maeclip train ...``: each
rank reads a disjoint slice of every global batch, ``ClipLoss`` gathers the features of all
ranks (so the contrastive batch is the global batch) and DDP averages the gradients.
Checkpoints (``verger.core.train.Checkpointer``) hold the model, optimizer, scheduler and the
RNG state of every rank (each rank draws its own MAE masks); the data position is the step
itself for in-memory and map-style data and a saved (epoch, batch) per rank for streamed data,
so resuming reproduces the uninterrupted run.
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
    MetricsLogger,
    cosine_schedule,
    lambda_lr,
    progress_bar,
    rng_state,
    set_rng_state,
)
from verger.core.validation import finite_number
from verger.maeclip.data import ImageTextCollate, ImageTextSet
from verger.maeclip.model import MAECLIP, MAECLIPConfig, build_model
from verger.maeclip.towers import CaptionTokenizer


@dataclass(kw_only=True)
class TrainConfig:
    """How to train. ``batch_size`` is the global batch (split evenly across ranks)."""

    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
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
        for name, low in (("steps", 1), ("batch_size", 2), ("warmup_steps", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r} must be an int >= {low}")
        for name in ("checkpoint_every", "log_every", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0")
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
    """The trained model (unwrapped), per-step history and the measured throughput."""

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
        if n < batch_size:
            raise ValueError(f"the dataset has {n} pairs, fewer than batch_size={batch_size}")
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


def _step_sampler(n: int, cfg: TrainConfig, rank: int, world: int, start: int) -> StepBatchSampler:
    """This rank's share of each step's global batch, resumable at step ``start``."""
    return StepBatchSampler(
        n,
        batch_size=cfg.batch_size,
        steps=cfg.steps,
        seed=cfg.seed,
        rank=rank,
        world=world,
        start=start,
    )


@dataclass
class StreamPosition:
    """Where this rank is in a streamed dataset: ``batch`` batches of ``epoch`` already used."""

    epoch: int = 0
    batch: int = 0


def _stream_batches(
    dataset: IterableDataset,
    collate: ImageTextCollate,
    cfg: TrainConfig,
    world: int,
    position: StreamPosition,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Cycle epochs of a streamed dataset from ``position``, which is updated in place.

    A resume replays ``position.epoch`` (``set_epoch`` fixes its order) and drops the batches
    already trained on: exact whenever the stream's order depends only on the epoch.
    """
    skip = position.batch
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(position.epoch)
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size // world,
            collate_fn=collate,
            num_workers=cfg.num_workers,
            drop_last=True,
            # its own generator: each new loader would otherwise draw its worker seed from the
            # global RNG and shift the MAE masks of every later step (a resume starts a loader
            # where the uninterrupted run did not)
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


def _batches(
    dataset: Dataset,
    tokenizer: CaptionTokenizer,
    cfg: TrainConfig,
    rank: int,
    world: int,
    start: int,
    position: StreamPosition,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    collate = ImageTextCollate(tokenizer)
    if isinstance(dataset, ImageTextSet):  # in memory: index directly, no worker overhead
        for idx in _step_sampler(len(dataset), cfg, rank, world, start):
            yield dataset.images[idx], tokenizer([dataset.captions[i] for i in idx])
    elif isinstance(dataset, IterableDataset):  # streamed shards: cycle epochs
        yield from _stream_batches(dataset, collate, cfg, world, position)
    else:
        sampler = _step_sampler(len(dataset), cfg, rank, world, start)  # type: ignore[arg-type]
        yield from DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed),  # not the global RNG: see above
        )


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


def _rank_states(world: int, position: StreamPosition) -> list[dict[str, Any]]:
    """Every rank's RNG state and stream position, gathered on every rank (all must call).

    The core checkpoint keeps the saving rank's RNG only; the other ranks draw different masks
    (seeded ``seed + rank``), so each needs its own state back for an exact resume.
    """
    state = {"rng": rng_state(), "stream": asdict(position)}
    if world == 1:
        return [state]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, state)
    return states


def train(
    model_config: MAECLIPConfig,
    cfg: TrainConfig,
    dataset: Dataset,
    *,
    model: MAECLIP | None = None,
    resume: bool = True,
) -> TrainResult:
    """Train ``model_config``'s objective on ``dataset`` for ``cfg.steps`` steps.

    With ``cfg.out_dir`` set, metrics go to ``out_dir/metrics.jsonl`` (+ TensorBoard when
    installed) and checkpoints to ``out_dir/checkpoints``; ``resume=True`` continues from the
    latest one. Inside an initialised process group every rank must call this.
    """
    rank, world = _dist_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {world} ranks")
    check_checkpoint_dir(cfg.out_dir, steps=cfg.steps, resume=resume)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    seed_everything(cfg.seed + rank)  # each rank draws its own MAE masks
    if model is None:
        with torch.random.fork_rng(devices=[]):  # the same init on every rank, masks untouched
            torch.manual_seed(cfg.seed)
            model = build_model(model_config, device=device)
    model.to(device)
    tokenizer = CaptionTokenizer(model.clip.context_length)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    scheduler = lambda_lr(optimizer, cosine_schedule(cfg.steps, warmup_steps=cfg.warmup_steps))
    out = Path(cfg.out_dir) if cfg.out_dir is not None else None
    checkpointer = Checkpointer(out / "checkpoints") if out is not None else None
    start, resumed = 0, None
    position = StreamPosition()
    if checkpointer is not None and resume and checkpointer.latest_step() is not None:
        # map_location="cpu": the RNG states inside must stay CPU tensors (set_rng_state refuses
        # CUDA ones); load_state_dict moves weights and optimizer state to the model's device
        ckpt = checkpointer.load(
            model=model, optimizer=optimizer, scheduler=scheduler, map_location="cpu"
        )
        start = resumed = ckpt.step
        ranks = ckpt.extra.get("ranks")
        if isinstance(ranks, list) and len(ranks) == world:
            set_rng_state(ranks[rank]["rng"])
            position = StreamPosition(**ranks[rank]["stream"])
        else:  # saved by another world size (or an older version): replay the stream from 0
            position = StreamPosition(0, start)
    elif world > 1:
        for tensor in model.state_dict().values():  # identical start on every rank
            dist.broadcast(tensor, src=0)
    wrapped: torch.nn.Module = model
    if world > 1:
        wrapped = DistributedDataParallel(
            model, find_unused_parameters=model_config.method != "maeclip"
        )
    logger = MetricsLogger(out) if out is not None and rank == 0 else None
    if logger is not None and resumed is not None:
        logger.rewind(start)  # the steps after the checkpoint run again: log them once
    result = TrainResult(model=model, resumed_from=resumed)
    bar = progress_bar(total=cfg.steps, desc=cfg.desc, enabled=cfg.progress if rank == 0 else False)
    bar.update(start)
    images_seen, busy = 0, 0.0
    try:
        model.train()
        batches = _batches(dataset, tokenizer, cfg, rank, world, start, position)
        for step in range(start, cfg.steps):
            images, texts = next(batches)
            t0 = time.perf_counter()
            images, texts = (
                images.to(device, non_blocking=True),
                texts.to(device, non_blocking=True),
            )
            output = wrapped(images, texts)
            if not torch.isfinite(output.loss):
                raise FloatingPointError(f"non-finite loss {output.loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            model.clamp_logit_scale()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            busy += time.perf_counter() - t0
            images_seen += images.shape[0] * world
            record = {"loss": float(output.loss.detach())}
            for name in ("clip_loss", "mae_loss"):
                value = getattr(output, name)
                if value is not None:
                    record[name] = float(value.detach())
            record["lr"] = float(scheduler.get_last_lr()[0])
            result.history.append({"step": step + 1, **record})
            if logger is not None and cfg.log_every and (step + 1) % cfg.log_every == 0:
                logger.log(step + 1, **record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            last = step + 1 == cfg.steps
            if checkpointer is not None and (
                (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or last
            ):
                ranks = _rank_states(world, position)
                if rank == 0:
                    checkpointer.save(
                        step + 1,
                        model=model,
                        optimizer=optimizer,
                        scheduler=scheduler,
                        extra={"ranks": ranks},
                    )
                if world > 1:
                    dist.barrier()
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    result.images_per_s = images_seen / busy if busy > 0 else math.nan
    return result
