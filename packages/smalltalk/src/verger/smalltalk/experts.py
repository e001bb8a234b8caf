"""Expert training: each expert (and the dense baseline) is an independent job.

A job reads only its own data (``shards/expert-XX.safetensors``, or the whole training set
for the dense baseline), trains one :class:`TransformerLM` with the core ``TrainLoop``, keeps
its own checkpoints and writes ``model/`` when done. Nothing of another expert is read or
waited for: jobs run one after the other, side by side, or on other machines, with
bit-identical results (each owns its seeds; tested). A job may have several ranks (DDP over
the job's own process group, or DeepSpeed ZeRO through ``verger.core.distributed.deepspeed``);
its world is the job's ranks only, so no collective ever spans two experts. A job killed at
any point resumes from its last checkpoint exactly (model, optimizer, schedule, data order).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from verger.core.distributed import DistInfo, init_distributed
from verger.core.files import atomic_write_json
from verger.core.nn import TransformerLM
from verger.core.train import (
    Checkpointer,
    LoopConfig,
    MetricsLogger,
    TrainLoop,
    cosine_schedule,
    lambda_lr,
)
from verger.smalltalk.config import SmallTalkConfig, expert_name
from verger.smalltalk.data import DATA_DIR, SequenceSet, data_manifest
from verger.smalltalk.routers import derived_seed, new_model
from verger.smalltalk.sharding import load_shard_index

EXPERTS_DIR = "experts"
MODEL_DIR = "model"
INFO_FILE = "expert.json"
ENGINES = ("ddp", "deepspeed")


def expert_folder(model_folder: str | Path, expert: str | int) -> Path:
    """``<model_folder>/experts/expert-XX`` (or ``experts/dense``): one job's folder."""
    return Path(model_folder) / EXPERTS_DIR / expert_name(expert)


class EpochSampler:
    """Shuffled epochs over ``n`` sequences, ``batch_size`` per step, this rank's share.

    Every rank draws the same global batch from the same generator and keeps rows
    ``rank::world``, so the ranks' mean gradients average to the global batch's.
    ``state_dict`` / ``load_state_dict`` resume the stream exactly.
    """

    def __init__(
        self, data: SequenceSet, batch_size: int, seed: int, *, rank: int = 0, world: int = 1
    ) -> None:
        if batch_size % world:
            raise ValueError(
                f"batch_size={batch_size} must be divisible by the job's {world} ranks"
            )
        self.data = data
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(data), generator=self.generator)
        self.position = 0
        self.epoch = 0

    def __iter__(self) -> EpochSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        picks = []
        need = self.batch_size
        while need:
            if self.position == len(self.order):
                self.order = torch.randperm(len(self.data), generator=self.generator)
                self.position = 0
                self.epoch += 1
            take = min(need, len(self.order) - self.position)
            picks.append(self.order[self.position : self.position + take])
            self.position += take
            need -= take
        rows = torch.cat(picks)[self.rank :: self.world]
        return self.data.batch(rows)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "order": self.order.clone(),
            "position": self.position,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone()
        self.position = int(state["position"])
        self.epoch = int(state["epoch"])


@dataclass
class ExpertResult:
    """What a finished job reports (also written to ``expert.json``)."""

    name: str
    steps: int
    tokens_trained: int  # tokens of the global batches of all steps
    sequences: int  # training sequences available to this job
    parameters: int
    final_loss: float | None  # the last step's loss (None when nothing was left to run)
    seconds: float
    source: str  # the shard index (or data) fingerprint the job trained on
    world_size: int
    engine: str


def _job_data(config: SmallTalkConfig, model_folder: Path, name: str) -> tuple[SequenceSet, str]:
    if name == "dense":
        data = SequenceSet.load(model_folder / DATA_DIR / "train.safetensors")
        return data, "data:" + data.fingerprint()
    expert = int(name.removeprefix("expert-"))
    if expert >= config.num_experts:
        raise ValueError(
            f"expert={expert} does not exist: this mixture has num_experts={config.num_experts} "
            f"(0..{config.num_experts - 1}, or 'dense')"
        )
    index = load_shard_index(model_folder)
    return index.load_shard(expert), "shards:" + index.fingerprint


def train_expert(
    model_folder: str | Path,
    expert: str | int,
    *,
    out: str | Path | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    resume: bool = True,
    engine: str = "ddp",
    zero_stage: int = 0,
    show_progress: bool | None = None,
) -> ExpertResult:
    """Train one expert (``0..E-1``) or ``"dense"`` of a model folder; this rank's part.

    Called once per rank: in a single process (no ``WORLD_SIZE`` in the environment) it
    trains alone; under torchrun (or ``run_multiprocess``) the ranks of this call form the
    job's data-parallel group. ``out`` defaults to :func:`expert_folder`. ``resume``
    continues from ``out/checkpoints`` when a checkpoint is there.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} must be one of {ENGINES}")
    model_folder = Path(model_folder)
    name = expert_name(expert)
    config = SmallTalkConfig.load(model_folder)
    out = Path(out) if out is not None else expert_folder(model_folder, name)
    device = torch.device(device)
    # CPU jobs use gloo even on a GPU machine; CUDA ranks take cuda:LOCAL_RANK
    info = init_distributed(backend="gloo" if device.type == "cpu" else None)
    if device.type == "cuda" and info.world_size > 1:
        device = info.device
    data, source = _job_data(config, model_folder, name)
    vocab = int(data_manifest(model_folder)["vocab_size"])
    steps = config.total_dense_steps if name == "dense" else config.expert_steps
    if name == "dense" and config.dense_lr is not None:
        config = config.replace(lr=config.dense_lr)
    model = new_model(
        config.expert_model(vocab, fused=device.type == "cuda"), derived_seed(seed, name, "init")
    ).to(device)
    sampler = EpochSampler(
        data,
        config.batch_size,
        derived_seed(seed, name, "batches"),
        rank=info.rank,
        world=info.world_size,
    )
    t0 = time.perf_counter()
    run = _train_ddp if engine == "ddp" else _train_deepspeed
    final = run(config, model, sampler, steps, out, info, device, resume, zero_stage, show_progress)
    result = ExpertResult(
        name=name,
        steps=steps,
        tokens_trained=steps * config.batch_size * config.seq_len,
        sequences=len(data),
        parameters=model.num_parameters(),
        final_loss=final,
        seconds=time.perf_counter() - t0,
        source=source,
        world_size=info.world_size,
        engine=engine,
    )
    if info.rank == 0:
        model.save_pretrained(out / MODEL_DIR)
        atomic_write_json(out / INFO_FILE, asdict(result) | {"seed": seed})
    return result


def _optimizer(config: SmallTalkConfig, model: torch.nn.Module, steps: int) -> tuple[Any, Any]:
    opt = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay
    )
    warmup = min(config.warmup_steps, steps - 1)
    schedule = cosine_schedule(steps, warmup_steps=warmup, min_ratio=config.min_lr_ratio)
    return opt, lambda_lr(opt, schedule)


def _train_ddp(
    config: SmallTalkConfig,
    model: TransformerLM,
    sampler: EpochSampler,
    steps: int,
    out: Path,
    info: DistInfo,
    device: torch.device,
    resume: bool,
    zero_stage: int,
    show_progress: bool | None,
) -> float | None:
    if zero_stage:
        raise ValueError(f"zero_stage={zero_stage} needs engine='deepspeed' (DDP has no ZeRO)")
    forward: torch.nn.Module = model
    if info.world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt, sched = _optimizer(config, model, steps)
    logger = MetricsLogger(out / "logs", tensorboard=None) if info.rank == 0 else None
    loop = TrainLoop(
        model,
        opt,
        config=LoopConfig(
            max_steps=steps,
            grad_clip=config.grad_clip,
            log_every=max(1, min(50, steps // 20)),
            checkpoint_every=config.checkpoint_every,
        ),
        scheduler=sched,
        loss_fn=lambda m, b: m(b[0].to(device), b[1].to(device)).loss,
        checkpointer=Checkpointer(out / "checkpoints", keep=2),
        logger=logger,
        show_progress=show_progress if info.rank == 0 else False,
        desc=out.name,
        forward_model=forward,
    )
    try:
        history = loop.run(sampler, resume=resume)
    finally:
        if logger is not None:
            logger.close()
    if info.world_size > 1:
        dist.barrier()  # rank 0's last checkpoint is written before any rank moves on
    return history[-1].loss if history else None


def _train_deepspeed(
    config: SmallTalkConfig,
    model: TransformerLM,
    sampler: EpochSampler,
    steps: int,
    out: Path,
    info: DistInfo,
    device: torch.device,
    resume: bool,
    zero_stage: int,
    show_progress: bool | None,
) -> float | None:
    """The same job through a DeepSpeed engine (ZeRO 0-3); DeepSpeed's own checkpoints."""
    from verger.core.distributed.deepspeed import build_engine, get_full_fp32_params

    opt, sched = _optimizer(config, model, steps)
    engine = build_engine(
        model,
        {
            "train_micro_batch_size_per_gpu": config.batch_size // info.world_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": config.grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "steps_per_print": 10**9,
        },
        optimizer=opt,
        lr_scheduler=sched,
    )
    folder = out / "ds_checkpoints"
    logger = MetricsLogger(out / "logs", tensorboard=None) if info.rank == 0 else None
    step = 0
    if resume and (folder / "latest").is_file():
        _, client = engine.load_checkpoint(str(folder))
        sampler.load_state_dict(client["data"])
        step = int(client["step"])
        if logger is not None:
            logger.rewind(step)
    final = None
    try:
        while step < steps:
            x, y = next(sampler)
            loss = engine(x.to(device), y.to(device)).loss
            engine.backward(loss)
            engine.step()
            step += 1
            final = float(loss.detach())
            if logger is not None:
                logger.log(step, loss=final)
            if step % config.checkpoint_every == 0 or step == steps:
                engine.save_checkpoint(
                    str(folder),
                    tag=f"step-{step:08d}",
                    client_state={"data": sampler.state_dict(), "step": step},
                )
    finally:
        if logger is not None:
            logger.close()
    values = get_full_fp32_params(engine)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            param.copy_(values[pname].to(param.device, param.dtype))
    return final


def read_expert_info(model_folder: str | Path, expert: str | int) -> dict[str, Any]:
    """``expert.json`` of a finished job; a clear error when the job has not finished."""
    folder = expert_folder(model_folder, expert)
    path = folder / INFO_FILE
    if not path.is_file() or not (folder / MODEL_DIR / "model.safetensors").is_file():
        name = expert_name(expert)
        flag = "dense" if name == "dense" else str(int(name.removeprefix("expert-")))
        raise FileNotFoundError(
            f"{name} is not trained: {folder} holds no finished job (train it with "
            f"`python -m verger.smalltalk train-expert --out {model_folder} --expert {flag}`)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_expert(
    model_folder: str | Path, expert: str | int, *, device: torch.device | str = "cpu"
) -> TransformerLM:
    """The trained model of one expert (or ``"dense"``)."""
    read_expert_info(model_folder, expert)
    return TransformerLM.from_pretrained(
        expert_folder(model_folder, expert) / MODEL_DIR, device=device
    ).eval()
