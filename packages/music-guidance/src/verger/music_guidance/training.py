"""Training: the v-prediction objective on verger-core's TrainLoop, with EMA, DDP and exact resume.

- :class:`ClipSampler`: an endless, seeded stream of ``(audio, t, noise)`` batches drawn from
  a clip set (one stream per rank); its ``state_dict`` resumes it exactly.
- :class:`EMA`: exponential moving average of the weights (decay warmed up as
  ``min(decay, (1 + n) / (10 + n))``), kept in the checkpointed module beside the model.
- :func:`train_diffusion`: verger-core's ``TrainLoop`` with the EMA update as its
  ``after_step`` hook and, with several ranks (torchrun, gloo or NCCL), a DDP-wrapped
  objective as ``forward_model`` and every rank's RNG and data position in the checkpoint
  (``per_rank_state``; rank 0 writes it).
- :func:`train_autoencoder` for the latent configuration.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from verger.core.distributed import (
    get_rank,
    get_world_size,
    is_initialized,
)
from verger.core.train import (
    Checkpointer,
    LoopConfig,
    MetricsLogger,
    StepStats,
    TrainLoop,
    cosine_schedule,
    lambda_lr,
)
from verger.music_guidance.model import AudioDiffusion
from verger.music_guidance.validation import finite_number, integer

__all__ = [
    "EMA",
    "ClipSampler",
    "TrainConfig",
    "TrainResult",
    "train_autoencoder",
    "train_diffusion",
]


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation of the diffusion model (AdamW without weight decay, cosine schedule)."""

    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    checkpoint_every: int = 250
    log_every: int = 25
    seed: int = 0
    gain_range: tuple[float, float] = (0.5, 1.2)
    autoencoder_steps: int = 600
    autoencoder_lr: float = 2e-3

    def __post_init__(self) -> None:
        integer("steps", self.steps, at_least=1)
        integer("batch_size", self.batch_size, at_least=1)
        finite_number("lr", self.lr, above=0)
        integer("warmup_steps", self.warmup_steps, at_least=0)
        decay = finite_number("ema_decay", self.ema_decay, at_least=0)
        if decay >= 1:
            raise ValueError(f"ema_decay={decay} must be in [0, 1)")
        finite_number("grad_clip", self.grad_clip, above=0)
        integer("checkpoint_every", self.checkpoint_every, at_least=0)
        integer("log_every", self.log_every, at_least=1)
        integer("seed", self.seed, at_least=0)
        lo, hi = (finite_number("gain_range", g, above=0) for g in self.gain_range)
        if lo > hi:
            raise ValueError(f"gain_range={self.gain_range} must be (low, high) with low <= high")
        self.gain_range = (lo, hi)
        integer("autoencoder_steps", self.autoencoder_steps, at_least=0)
        finite_number("autoencoder_lr", self.autoencoder_lr, above=0)


class ClipSampler:
    """Endless batches ``(audio [B, C, T], t [B], noise [B, *noise_shape])`` from ``clips``.

    Each rank draws from its own generator (seed, rank); random gain in ``gain_range``.
    """

    def __init__(
        self,
        clips: Tensor,
        *,
        batch_size: int,
        noise_shape: tuple[int, ...],
        seed: int = 0,
        rank: int = 0,
        gain_range: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        if clips.ndim != 3 or clips.shape[0] == 0:
            raise ValueError(
                f"clips must be a non-empty [N, C, T] tensor, got {tuple(clips.shape)}"
            )
        self.clips, self.batch_size, self.noise_shape = clips, batch_size, tuple(noise_shape)
        self.gain_range = gain_range
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        self.drawn = 0

    def __iter__(self) -> ClipSampler:
        return self

    def __next__(self) -> tuple[Tensor, Tensor, Tensor]:
        g, B = self.generator, self.batch_size
        idx = torch.randint(0, self.clips.shape[0], (B,), generator=g)
        lo, hi = self.gain_range
        gain = torch.empty(B, 1, 1).uniform_(lo, hi, generator=g)
        t = torch.rand(B, generator=g)
        noise = torch.randn((B, *self.noise_shape), generator=g)
        self.drawn += 1
        return self.clips[idx] * gain, t, noise

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.drawn = int(state["drawn"])


class EMA(nn.Module):
    """A frozen copy of ``model`` tracking its weights; buffers are copied as they are."""

    updates: Tensor

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model)
        for p in self.shadow.parameters():
            p.requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = int(self.updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for shadow, param in zip(self.shadow.parameters(), model.parameters()):
            shadow.lerp_(param.detach(), 1 - decay)
        for shadow_buf, buf in zip(self.shadow.buffers(), model.buffers()):
            shadow_buf.copy_(buf)
        self.updates += 1


class _Objective(nn.Module):
    """The loss as a module's forward, so that DDP sees (and synchronises) it."""

    def __init__(self, model: AudioDiffusion) -> None:
        super().__init__()
        self.model = model

    def forward(self, audio: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        with torch.no_grad():
            x0 = self.model.encode(audio)
        return self.model.training_loss(x0, t, noise)


class _State(nn.Module):
    """What the checkpoint's ``model.safetensors`` holds: the model and its EMA."""

    def __init__(self, model: AudioDiffusion, ema: EMA) -> None:
        super().__init__()
        self.model, self.ema = model, ema


@dataclass
class TrainResult:
    model: AudioDiffusion
    ema: AudioDiffusion
    history: list[StepStats] = field(default_factory=list)


def train_diffusion(
    model: AudioDiffusion,
    clips: Tensor,
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    resume: bool = True,
    show_progress: bool | None = None,
) -> TrainResult:
    """Train ``model`` on clips ``[N, C, T]`` (audio at the model's rate and length).

    With ``out_dir``: checkpoints in ``out_dir/checkpoints`` (resumed when present and
    ``resume``), ``out_dir/logs/metrics.jsonl``. Under torchrun every rank calls this; the
    gradients are averaged with DDP and rank 0 writes. The latent model's autoencoder must
    be trained first (:func:`train_autoencoder`); it is frozen here.
    """
    device = torch.device(device)
    if clips.ndim != 3 or clips.shape[1] != model.audio_channels:
        raise ValueError(f"clips must be [N, {model.audio_channels}, T], got {tuple(clips.shape)}")
    model.check_length(clips.shape[-1])
    torch.manual_seed(config.seed)
    model.to(device)
    if model.autoencoder is not None:
        model.autoencoder.requires_grad_(False)
    ema = EMA(model, config.ema_decay)
    state = _State(model, ema).to(device)
    objective: nn.Module = _Objective(model)
    rank, world = get_rank(), get_world_size()
    if is_initialized() and world > 1:
        objective = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    params = [p for p in model.denoiser.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0)
    sched = lambda_lr(
        opt, cosine_schedule(config.steps, warmup_steps=config.warmup_steps, min_ratio=0.05)
    )
    sampler = ClipSampler(
        clips,
        batch_size=config.batch_size,
        noise_shape=model.diffusion_shape(clips.shape[-1]),
        seed=config.seed,
        rank=rank,
        gain_range=config.gain_range,
    )
    folder = Path(out_dir) if out_dir is not None else None

    def loss_fn(forward: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        audio, t, noise = (b.to(device) for b in batch)
        return forward(audio, t, noise)

    loop = TrainLoop(
        state,
        opt,
        config=LoopConfig(
            max_steps=config.steps,
            grad_clip=config.grad_clip,
            log_every=config.log_every,
            checkpoint_every=config.checkpoint_every,
        ),
        scheduler=sched,
        loss_fn=loss_fn,
        checkpointer=Checkpointer(folder / "checkpoints") if folder is not None else None,
        logger=MetricsLogger(folder / "logs") if folder is not None and rank == 0 else None,
        show_progress=show_progress if rank == 0 else False,
        desc="train diffusion",
        forward_model=objective,
        after_step=lambda _loop, _stats: ema.update(model),
        per_rank_state=True,
    )
    history = loop.run(sampler, resume=resume)
    if loop.logger is not None:
        loop.logger.close()
    ema_model: AudioDiffusion = ema.shadow  # type: ignore[assignment]
    return TrainResult(model.eval(), ema_model.eval(), history)


def train_autoencoder(
    model: AudioDiffusion,
    clips: Tensor,
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    show_progress: bool | None = None,
) -> list[StepStats]:
    """Train the latent model's autoencoder, then set its ``latent_scale`` from the data."""
    if model.autoencoder is None:
        raise ValueError("train_autoencoder needs a latent model (kind='latent')")
    ae = model.autoencoder.to(device)
    ae.requires_grad_(True)
    opt = torch.optim.AdamW(ae.parameters(), lr=config.autoencoder_lr, weight_decay=0.0)
    steps = max(config.autoencoder_steps, 1)
    sched = lambda_lr(
        opt, cosine_schedule(steps, warmup_steps=min(50, steps // 10), min_ratio=0.05)
    )
    sampler = ClipSampler(
        clips,
        batch_size=config.batch_size,
        noise_shape=(1,),
        seed=config.seed + 17,
        gain_range=config.gain_range,
    )
    gen = torch.Generator().manual_seed(config.seed)

    def loss_fn(module: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        return ae.training_loss(batch[0].to(device), generator=gen)

    loop = TrainLoop(
        ae,
        opt,
        config=LoopConfig(max_steps=steps, grad_clip=config.grad_clip, log_every=config.log_every),
        scheduler=sched,
        loss_fn=loss_fn,
        show_progress=show_progress,
        desc="train autoencoder",
    )
    history = loop.run(sampler, resume=False)
    with torch.no_grad():
        ae.eval()
        means = torch.cat(
            [ae.posterior(clips[i : i + 64].to(device))[0] for i in range(0, len(clips), 64)]
        )
        ae.latent_scale.fill_(max(float(means.std()), 1e-3))
    ae.requires_grad_(False)
    return history
