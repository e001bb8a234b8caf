"""Production tasks as choices of (A, d, x_T): continuation, infill, regeneration, transition, style.

Each constructor checks its inputs against the model (sample rate, channels, lengths) and
returns a :class:`Task`: the guidance terms, how to start (``"noise"``, ``"observed"``:
``A^T y + (I - A^T A) z``, or ``"regenerate"``: the reference noised to level k), and the
observed mask for metrics and plots. :func:`run_task` samples it.

Regeneration's k (the paper's 0.85) mixes ``k z + (1 - k) x``; on the variance-preserving
cosine schedule that is ``x_t`` at ``t = (2/pi) atan(k / (1 - k))`` (0.89 for k = 0.85),
where the sampler starts (the observed part starts clean, as in the paper's formula).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from verger.music_guidance.audio import Audio, check_audio_tensor, check_same_rate
from verger.music_guidance.guidance import (
    AudioEmbedder,
    ClassifierLoss,
    EmbeddingL2,
    Guidance,
    MaskedL1,
)
from verger.music_guidance.model import AudioDiffusion
from verger.music_guidance.sampling import SamplerSettings, sample
from verger.music_guidance.schedule import noise_level_for_mix
from verger.music_guidance.validation import integer, one_of, probability

__all__ = [
    "Task",
    "constant_power_gains",
    "continuation",
    "crossfade",
    "infill",
    "regenerate",
    "run_task",
    "style_classifier",
    "style_embedding",
    "transition",
]

STARTS = ("noise", "observed", "regenerate")


@dataclass
class Task:
    """What to sample: guidance terms, the start, and the reference/observed mask (audio)."""

    name: str
    num_samples: int
    guidance: list[Guidance]
    start: str = "noise"
    reference: Tensor | None = None  # [1, C, T] audio the start is built from
    observed: Tensor | None = None  # [T] bool, True where the output must match the reference
    k: float = 1.0
    extras: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        one_of("start", self.start, STARTS)
        if self.start != "noise" and self.reference is None:
            raise ValueError(f"start={self.start!r} needs a reference")

    def weighted(self, weight: float) -> Task:
        """The same task with every guidance weight multiplied by ``weight``."""
        terms = [g.scaled(g.weight * weight) for g in self.guidance]
        return Task(
            self.name,
            self.num_samples,
            terms,
            self.start,
            self.reference,
            self.observed,
            self.k,
            dict(self.extras),
        )

    def plus(self, other: Task) -> Task:
        """This task's start with the guidance of both (weighted sums of losses)."""
        if other.num_samples != self.num_samples:
            raise ValueError("tasks to combine must have the same length")
        return Task(
            f"{self.name}+{other.name}", self.num_samples, [*self.guidance, *other.guidance],
            self.start, self.reference, self.observed, self.k, {**other.extras, **self.extras},
        )  # fmt: skip


def _model_audio(model: AudioDiffusion, audio: Audio, what: str) -> Tensor:
    if not isinstance(audio, Audio):
        raise TypeError(
            f"{what} must be an Audio (waveform + sample_rate), got {type(audio).__name__}"
        )
    check_same_rate(audio.sample_rate, model.sample_rate, f"{what} vs the model")
    check_audio_tensor(audio.waveform, what)
    return audio.with_channels(model.audio_channels).waveform


def _length(model: AudioDiffusion, n: int, what: str) -> int:
    m = model.config.length_multiple
    if not isinstance(n, int) or n < m or n % m:
        raise ValueError(f"{what}={n!r} samples must be a positive multiple of {m} for this model")
    return n


def _bool_mask(mask: Tensor, length: int, name: str = "mask") -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.ndim != 1 or mask.shape[0] != length:
        raise ValueError(
            f"{name} must be 1-D with one entry per sample ({length}), got shape {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be boolean (or 0/1)")
        mask = mask.bool()
    return mask


def continuation(
    model: AudioDiffusion, prompt: Audio, num_samples: int, *, weight: float = 1.0
) -> Task:
    """Continue ``prompt`` (the first samples, kept) to ``num_samples`` samples."""
    wave = _model_audio(model, prompt, "prompt")
    _length(model, num_samples, "num_samples")
    P = wave.shape[-1]
    if num_samples <= P:
        raise ValueError(f"the prompt ({P} samples) must be shorter than num_samples={num_samples}")
    reference = torch.zeros(1, wave.shape[0], num_samples)
    reference[0, :, :P] = wave
    observed = torch.zeros(num_samples, dtype=torch.bool)
    observed[:P] = True
    terms = [MaskedL1(reference, observed).guidance(weight)]
    return Task(
        "continuation",
        num_samples,
        terms,
        "observed",
        reference,
        observed,
        extras={"seam": float(P)},
    )


def infill(model: AudioDiffusion, audio: Audio, mask: Tensor, *, weight: float = 1.0) -> Task:
    """Fill the samples where ``mask`` is False, keeping (and guiding toward) the rest."""
    wave = _model_audio(model, audio, "audio")
    n = _length(model, wave.shape[-1], "the audio length")
    observed = _bool_mask(mask, n)
    if bool(observed.all()) or not bool(observed.any()):
        raise ValueError("mask must mark some samples observed (True) and some to fill (False)")
    reference = wave.unsqueeze(0)
    terms = [MaskedL1(reference, observed).guidance(weight)]
    return Task("infill", n, terms, "observed", reference, observed)


def regenerate(
    model: AudioDiffusion,
    audio: Audio,
    mask: Tensor | None = None,
    *,
    k: float = 0.85,
    weight: float = 1.0,
) -> Task:
    """Regenerate ``audio`` from its version noised to level ``k``; ``mask`` (True = keep)
    adds L1 guidance on the kept samples, None regenerates everything freely."""
    wave = _model_audio(model, audio, "audio")
    n = _length(model, wave.shape[-1], "the audio length")
    k = probability("k", k)
    if k == 0:
        raise ValueError("k=0 would keep the input unchanged; use k in (0, 1]")
    reference = wave.unsqueeze(0)
    if mask is None:
        return Task("regenerate", n, [], "regenerate", reference, None, k)
    observed = _bool_mask(mask, n)
    terms = [MaskedL1(reference, observed).guidance(weight)] if bool(observed.any()) else []
    return Task("regenerate", n, terms, "regenerate", reference, observed, k)


def constant_power_gains(n: int, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Fade-out and fade-in gains over ``n`` samples with ``out^2 + in^2 = 1`` at every sample."""
    integer("n", n, at_least=1)
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.cos(u * math.pi / 2).to(dtype), torch.sin(u * math.pi / 2).to(dtype)


def crossfade(a: Tensor, b: Tensor) -> Tensor:
    """Constant-power crossfade from ``a`` to ``b`` (same shape ``[..., n]``)."""
    if a.shape != b.shape:
        raise ValueError(f"crossfade needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    fade_out, fade_in = constant_power_gains(a.shape[-1], dtype=a.dtype)
    return a * fade_out + b * fade_in


def transition(
    model: AudioDiffusion,
    left: Audio,
    right: Audio,
    *,
    crossfade_samples: int,
    context_samples: int,
    k: float = 0.85,
    weight: float = 1.0,
) -> Task:
    """A smooth transition from ``left`` to ``right``: regenerate the constant-power crossfade
    between the last ``context + crossfade`` samples of ``left`` and the first of ``right``,
    keeping ``context_samples`` of each track on both sides."""
    check_same_rate(left.sample_rate, right.sample_rate, "transition tracks left and right")
    lw = _model_audio(model, left, "left")
    rw = _model_audio(model, right, "right")
    integer("crossfade_samples", crossfade_samples, at_least=1)
    integer("context_samples", context_samples, at_least=1)
    need = context_samples + crossfade_samples
    for name, w in (("left", lw), ("right", rw)):
        if w.shape[-1] < need:
            raise ValueError(f"{name} has {w.shape[-1]} samples; the transition needs {need}")
    n = _length(model, 2 * context_samples + crossfade_samples, "2 * context + crossfade")
    tail = lw[:, -need:]
    head = rw[:, :need]
    mixed = crossfade(tail[:, context_samples:], head[:, :crossfade_samples])
    reference = torch.cat([tail[:, :context_samples], mixed, head[:, crossfade_samples:]], dim=-1)
    observed = torch.ones(n, dtype=torch.bool)
    observed[context_samples : context_samples + crossfade_samples] = False
    terms = [MaskedL1(reference.unsqueeze(0), observed).guidance(weight)]
    return Task(
        "transition", n, terms, "regenerate", reference.unsqueeze(0), observed, probability("k", k)
    )


def style_embedding(
    model: AudioDiffusion,
    embedder: AudioEmbedder,
    target: Tensor | Sequence[Audio],
    num_samples: int,
    *,
    weight: float = 1.0,
) -> Task:
    """Sample toward a target embedding (or the mean embedding of reference clips), d = L2."""
    check_same_rate(embedder.sample_rate, model.sample_rate, "the embedder vs the model")
    _length(model, num_samples, "num_samples")
    if not isinstance(target, Tensor):
        clips = [_model_audio(model, a, "style reference") for a in target]
        if not clips:
            raise ValueError(
                "style_embedding needs a target embedding or at least one reference clip"
            )
        with torch.no_grad():
            target = torch.cat([embedder.embed(c.unsqueeze(0)) for c in clips]).mean(0)
    terms = [EmbeddingL2(embedder, target).guidance(weight)]
    return Task("style_embedding", num_samples, terms)


def style_classifier(
    model: AudioDiffusion,
    classifier: torch.nn.Module,
    target: int | Tensor,
    num_samples: int,
    *,
    num_classes: int | None = None,
    weight: float = 1.0,
) -> Task:
    """Sample toward class ``target`` (an index, or class probabilities), d = cross-entropy."""
    rate = getattr(classifier, "sample_rate", model.sample_rate)
    check_same_rate(rate, model.sample_rate, "the classifier vs the model")
    _length(model, num_samples, "num_samples")
    if isinstance(target, int):
        k = num_classes or getattr(classifier, "num_classes", None)
        if k is None or not 0 <= target < k:
            raise ValueError(f"target class {target!r} must be in [0, {k})")
        probs = torch.zeros(k)
        probs[target] = 1.0
    else:
        probs = target
    terms = [ClassifierLoss(classifier, probs).guidance(weight)]
    return Task("style_classifier", num_samples, terms)


def start_state(
    model: AudioDiffusion, task: Task, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, float]:
    """``(x_start, t_start)`` in diffusion space for ``task``."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    shape = (batch_size, *model.diffusion_shape(task.num_samples))
    z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if task.start == "noise":
        return z, 1.0
    assert task.reference is not None
    with torch.no_grad():
        ref = model.encode(task.reference.to(device=device, dtype=dtype)).expand(shape)
    keep = _diffusion_mask(model, task.observed, shape, device, dtype)
    if task.start == "observed":
        return keep * ref + (1 - keep) * z, 1.0
    t = noise_level_for_mix(task.k)
    alpha, sigma = math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)
    return keep * ref + (1 - keep) * (alpha * ref + sigma * z), t


def _diffusion_mask(
    model: AudioDiffusion,
    observed: Tensor | None,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """The observed mask in diffusion space (a latent frame is observed if all its samples are)."""
    if observed is None:
        return torch.zeros(shape[-1], device=device, dtype=dtype)
    m = observed
    if model.autoencoder is not None:
        m = m.view(-1, model.autoencoder.compression).all(-1)
    return m.to(device=device, dtype=dtype)


def run_task(
    model: AudioDiffusion,
    task: Task,
    *,
    batch_size: int = 1,
    settings: SamplerSettings | None = None,
    seed: int = 0,
    show_progress: bool | None = None,
) -> Tensor:
    """Sample ``task``: audio ``[batch_size, C, task.num_samples]``."""
    integer("batch_size", batch_size, at_least=1)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    x_start, t_start = start_state(model, task, batch_size, generator)
    guidance = [_to_device(g, device) for g in task.guidance]
    return sample(
        model,
        guidance=guidance,
        settings=settings,
        x_start=x_start,
        t_start=t_start,
        generator=generator,
        show_progress=show_progress,
    )


def _to_device(term: Guidance, device: torch.device) -> Guidance:
    loss = term.loss
    if isinstance(loss, MaskedL1):
        obs = loss.observation
        obs.reference = obs.reference.to(device)
        obs.mask = obs.mask.to(device)
    return term
