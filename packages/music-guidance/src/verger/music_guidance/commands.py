"""The production commands: ``train``, ``sample``, ``continue``, ``infill``, ``regenerate``,
``transition`` and ``style``. Each reads and writes WAV files and spectrogram PNGs in its
run folder (observed regions marked) and returns its metrics.

Without ``--model``, the sampling commands use the tiny model the demo trains (cached, built
once); without ``--input`` they take a validation clip of the embedded data. An input WAV at
another sample rate is resampled to the model's (the two tracks of a transition must share
one rate); lengths are cut to a multiple the model accepts.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from verger.core.distributed import all_gather_object, init_distributed
from verger.core.runs import Run
from verger.music_guidance.audio import Audio, check_same_rate, read_audio, resample, write_wav
from verger.music_guidance.classifier import load_classifier
from verger.music_guidance.config import (
    DemoSettings,
    SampleSettings,
    TaskSettings,
    TrainSettings,
    TransitionSettings,
)
from verger.music_guidance.embedded import EmbeddedDataConfig, load_embedded
from verger.music_guidance.folder import AudioFolder, collect_clips
from verger.music_guidance.model import AudioDiffusion, DiffusionConfig, load_diffusion
from verger.music_guidance.plots import spectrogram_figure
from verger.music_guidance.sampling import SamplerSettings, sample
from verger.music_guidance.tasks import (
    Task,
    continuation,
    infill,
    regenerate,
    run_task,
    style_classifier,
    transition,
)
from verger.music_guidance.training import TrainConfig, train_autoencoder, train_diffusion
from verger.music_guidance.zoo import Assets, prepare_assets

__all__ = [
    "run_continue",
    "run_infill",
    "run_regenerate",
    "run_sample",
    "run_style",
    "run_train",
    "run_transition",
]


def _process_group(device: torch.device) -> tuple[int, int, torch.device]:
    """``(rank, world, device)``: joins torchrun's process group (gloo on CPU, NCCL on CUDA,
    each rank on ``cuda:LOCAL_RANK``); outside torchrun, ``(0, 1, device)``. The group is left
    by verger-core's CLI after the command (a barrier, then ``destroy_distributed``)."""
    info = init_distributed(
        "nccl" if device.type == "cuda" else "gloo",
        device=None if device.type == "cuda" else device,
    )
    if info.world_size == 1:
        return 0, 1, device
    return info.rank, info.world_size, info.device


def _fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer's bytes: equal on ranks that hold equal weights."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_train(settings: TrainSettings, run: Run) -> dict[str, float]:
    """Train a model on the embedded corpus or ``--data``; writes ``model/`` (EMA weights).

    Under torchrun every rank runs this (verger-core gives rank 0 the run folder): DDP
    averages the gradients, each rank draws its own batches, rank 0 writes the checkpoints
    and the model, and the metrics say whether every rank ended with the same weights.
    """
    s = settings
    config = DiffusionConfig.tiny() if s.kind == "waveform" else DiffusionConfig.tiny_latent()
    if s.data is not None:
        folder = AudioFolder(
            s.data,
            sample_rate=config.sample_rate,
            clip_samples=config.clip_samples,
            metadata=s.metadata,
            shuffle=True,
            seed=run.seed,
        )
        clips, _ = collect_clips(folder, s.max_clips)
    else:
        data = EmbeddedDataConfig(
            pieces_per_collection=s.pieces_per_collection,
            seconds_per_piece=s.seconds_per_piece,
            synth=s.synth,
        )
        root = s.cache_dir / "embedded" if s.cache_dir is not None else None
        clips = load_embedded(data, "train", root=root).audio  # built once under a lock
    train = TrainConfig(
        steps=s.steps,
        batch_size=s.batch_size,
        lr=s.lr,
        ema_decay=s.ema_decay,
        warmup_steps=min(100, max(1, s.steps // 8)),
        checkpoint_every=s.checkpoint_every,
        autoencoder_steps=s.autoencoder_steps,
        seed=run.seed,
    )
    rank, world, device = _process_group(run.device)
    torch.manual_seed(run.seed)
    model = AudioDiffusion(config)
    start = time.perf_counter()
    if model.is_latent:  # every rank trains the same autoencoder on the same batches
        train_autoencoder(model, clips, train, device=device, show_progress=rank == 0)
    result = train_diffusion(
        model, clips, train, out_dir=run.folder, device=device, resume=run.resumed
    )
    seconds = time.perf_counter() - start
    prints = [_fingerprint(result.model), _fingerprint(result.ema)]
    every_rank = all_gather_object(prints) if world > 1 else [prints]
    run.path("checkpoints"), run.path("logs"), run.path("model")
    if rank == 0:
        result.ema.save_pretrained(run.path("model"))
    return {
        "model_parameters": model.num_parameters(),
        "train_clips": int(clips.shape[0]),
        "train_steps": s.steps,
        "train_loss_final": result.history[-1].loss if result.history else float("nan"),
        "train_seconds": seconds,
        "world_size": world,
        "ranks_identical": int(all(p == every_rank[0] for p in every_rank)),
    }


def _default_assets(cache_dir: Path | None, run: Run) -> Assets:
    return prepare_assets(
        DemoSettings.preset(quick=True).asset_spec(0), device=run.device, root=cache_dir
    )


def _model(
    s: SampleSettings | TaskSettings | TransitionSettings, run: Run
) -> tuple[AudioDiffusion, Assets | None]:
    if s.model is not None:
        return load_diffusion(s.model, device=run.device), None
    assets = _default_assets(s.cache_dir, run)
    return assets.model, assets


def _sampler(
    s: SampleSettings | TaskSettings | TransitionSettings, xi: float = 0.0
) -> SamplerSettings:
    gradient = getattr(s, "gradient", "x_t")
    project = getattr(s, "project", "none")
    return SamplerSettings(
        sampler=s.sampler, steps=s.steps, eta=s.eta, xi=xi, gradient=gradient, project=project
    )


def _fit(model: AudioDiffusion, audio: Audio) -> Audio:
    """Resample to the model's rate and cut to a length the model accepts."""
    audio = resample(audio.with_channels(model.audio_channels), model.sample_rate)
    m = model.config.length_multiple
    n = audio.num_samples // m * m
    if n == 0:
        raise ValueError(
            f"the input ({audio.num_samples} samples) is shorter than {m} samples at {model.sample_rate} Hz"
        )
    return Audio(audio.waveform[:, :n], model.sample_rate)


def _input(
    path: Path | None, model: AudioDiffusion, assets: Assets | None, run: Run, index: int = 0
) -> Audio:
    if path is not None:
        return _fit(model, read_audio(path))
    if assets is None:
        raise ValueError("give --input (a WAV file) when --model is given")
    val = assets.validation
    return Audio(val.audio[(index * len(val)) // 3 + run.seed % 7], model.sample_rate)


def _write(run: Run, name: str, audio: Tensor, sr: int) -> None:
    folder = run.path("wav")
    folder.mkdir(exist_ok=True)
    write_wav(folder / f"{name}.wav", Audio(audio.detach().cpu().float(), sr))


def _finish(
    run: Run, task: Task, model: AudioDiffusion, out: Tensor, title: str, metrics: dict[str, float]
) -> dict[str, float]:
    sr = model.sample_rate
    for i, clip in enumerate(out):
        _write(run, f"{task.name}_{i}", clip, sr)
    clips, titles = list(out), [f"{title} {i}" for i in range(len(out))]
    if task.reference is not None:
        _write(run, f"{task.name}_reference", task.reference[0], sr)
        clips, titles = [task.reference[0], *clips], ["reference", *titles]
    report = run.report(title)
    report.plot("spectrograms", spectrogram_figure(clips, titles, sr, observed=task.observed))
    for key, value in metrics.items():
        report.metric(key, value)
    if task.observed is not None and task.reference is not None:
        ref = task.reference.to(out)
        report.metric(
            "observed_l1", float((out[..., task.observed] - ref[..., task.observed]).abs().mean())
        )
    with torch.no_grad():
        for term in task.guidance:
            report.metric(f"loss_{term.name}", float(term.loss(out).mean()))
    report.metric("samples", int(out.shape[0]))
    return {k: v for k, v in report.metrics.items() if isinstance(v, int | float)}


def _task_run(
    s: TaskSettings | TransitionSettings,
    run: Run,
    task: Task,
    model: AudioDiffusion,
    title: str,
    extra: Callable[[Tensor], dict[str, float]] | None = None,
) -> dict[str, float]:
    start = time.perf_counter()
    out = run_task(model, task, batch_size=s.batch, settings=_sampler(s, s.xi), seed=run.seed)
    metrics = {"sampling_seconds": time.perf_counter() - start, "xi": s.xi}
    if extra is not None:
        metrics.update(extra(out))
    return _finish(run, task, model, out, title, metrics)


def run_sample(settings: SampleSettings, run: Run) -> dict[str, float]:
    """Unconditional samples."""
    model, _ = _model(settings, run)
    m = model.config.length_multiple
    n = max(m, round(settings.seconds * model.sample_rate / m) * m)
    start = time.perf_counter()
    out = sample(
        model, batch_size=settings.batch, num_samples=n, settings=_sampler(settings), seed=run.seed
    )
    task = Task("sample", n, [])
    return _finish(
        run,
        task,
        model,
        out,
        "unconditional samples",
        {"sampling_seconds": time.perf_counter() - start},
    )


def run_continue(settings: TaskSettings, run: Run) -> dict[str, float]:
    """Continue the first ``prompt_seconds`` of ``--input`` to ``seconds``."""
    model, assets = _model(settings, run)
    audio = _input(settings.input, model, assets, run)
    m = model.config.length_multiple
    n = max(2 * m, round(settings.seconds * model.sample_rate / m) * m)
    keep = min(audio.num_samples, round(settings.prompt_seconds * model.sample_rate), n - 1)
    task = continuation(model, Audio(audio.waveform[:, :keep], model.sample_rate), n)
    return _task_run(settings, run, task, model, "continuation")


def _gap_mask(s: TaskSettings, n: int, sr: int) -> Tensor:
    start, length = round(s.gap_start * sr), round(s.gap_seconds * sr)
    if length == 0 or start + length > n:
        raise ValueError(
            f"the gap [{s.gap_start}, {s.gap_start + s.gap_seconds}] s must lie inside the {n / sr:.3f} s input"
        )
    mask = torch.ones(n, dtype=torch.bool)
    mask[start : start + length] = False
    return mask


def run_infill(settings: TaskSettings, run: Run) -> dict[str, float]:
    """Fill the gap ``[gap_start, gap_start + gap_seconds]`` of ``--input``."""
    model, assets = _model(settings, run)
    audio = _input(settings.input, model, assets, run)
    task = infill(model, audio, _gap_mask(settings, audio.num_samples, model.sample_rate))
    return _task_run(settings, run, task, model, "infill")


def run_regenerate(settings: TaskSettings, run: Run) -> dict[str, float]:
    """Regenerate the gap of ``--input`` from its version noised to level ``k``."""
    model, assets = _model(settings, run)
    audio = _input(settings.input, model, assets, run)
    mask = _gap_mask(settings, audio.num_samples, model.sample_rate)
    task = regenerate(model, audio, mask, k=settings.k)
    return _task_run(settings, run, task, model, "regenerate")


def run_transition(settings: TransitionSettings, run: Run) -> dict[str, float]:
    """A transition from ``--left`` to ``--right`` over a regenerated constant-power crossfade."""
    s = settings
    model, assets = _model(s, run)
    if (s.left is None) != (s.right is None):
        raise ValueError("give both --left and --right, or neither (embedded clips)")
    if s.left is not None and s.right is not None:
        left, right = read_audio(s.left), read_audio(s.right)
        check_same_rate(left.sample_rate, right.sample_rate, "transition tracks --left and --right")
        left, right = _fit(model, left), _fit(model, right)
    else:
        left, right = _input(None, model, assets, run, 0), _input(None, model, assets, run, 2)
    m, sr = model.config.length_multiple, model.sample_rate
    fade = max(1, round(s.crossfade_seconds * sr))
    context = max(1, round(s.context_seconds * sr))
    context += (-(2 * context + fade)) % m // 2  # round the total up to a multiple of m
    fade += (-(2 * context + fade)) % m
    task = transition(model, left, right, crossfade_samples=fade, context_samples=context, k=s.k)
    return _task_run(s, run, task, model, "transition")


def run_style(settings: TaskSettings, run: Run) -> dict[str, float]:
    """Samples guided toward ``--target-class`` by a classifier.

    Without ``--classifier`` the tiny assets' guidance classifier steers and their separate
    evaluation classifier judges (``target_class_probability_eval``); ``--classifier DIR`` (a
    folder written by ``AudioClassifier.save_pretrained``) steers ``--model`` or the tiny model.
    """
    s = settings
    if s.model is not None and s.classifier is None:
        raise ValueError("style guidance with --model needs --classifier (a classifier folder)")
    model, assets = _model(s, run)
    guide = (
        load_classifier(s.classifier, device=run.device)
        if s.classifier is not None
        else assets.guide_classifier  # type: ignore[union-attr]
    )
    judge = assets.eval_classifier if assets is not None and s.classifier is None else None
    classes = list(guide.config.classes)
    if s.target_class not in classes:
        raise ValueError(f"target_class={s.target_class!r} must be one of {classes}")
    c = classes.index(s.target_class)
    task = style_classifier(model, guide, c, model.config.clip_samples)

    def target_probability(out: Tensor) -> dict[str, float]:
        found = {"target_class_probability_guide": float(guide.probabilities(out)[:, c].mean())}
        if judge is not None:
            found["target_class_probability_eval"] = float(judge.probabilities(out)[:, c].mean())
        return found

    return _task_run(s, run, task, model, f"style toward {s.target_class}", target_probability)
