"""``demo`` and ``bench``: every task with the same trained tiny model, guided vs unguided.

Both load (or train once, cached) the assets of :mod:`verger.music_guidance.zoo`. The bench
compares, with the same model, start noise and seeds, the guided sampler against the
unguided one (guidance terms removed, everything else equal):

- ``infill_observed_l1_ratio_guided_vs_unguided``: mean |x - y| on the observed samples (no
  projection), the middle quarter of each validation clip to fill;
- ``continuation_seam_mel_distance_ratio_guided_vs_unguided``: the prompt (first half) spliced
  before each output, then :func:`~verger.music_guidance.metrics.seam_mel_distance`; with
  diagnostics: the same clip's real second half (``..._real``, and its ratio to unguided: what
  a perfect continuation scores), how far each raw output's prompt region is from the prompt
  in the before-window (``continuation_prompt_window_mel_distance_*``), and how much guidance
  changes the after-window (``continuation_after_seam_mel_change_guided_vs_unguided``);
- ``style_kl_ratio_guided_vs_unguided``: KL(one-hot target || p) under the *evaluation*
  classifier, for samples guided by the separate *guidance* classifier, every class in turn;
- ``guided_step_time_ratio``: median time of a guided sampler step (L1 guidance, gradient
  through the denoiser) over an unguided one, interleaved timing;
- ``fad_model_vs_real`` (unguided samples vs validation clips, the evaluation classifier's
  embedding), ``fad_train_vs_validation`` (the floor), ``sampling_steps_per_s``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from verger.core.bench import Report, compare
from verger.core.runs import Run
from verger.music_guidance.audio import Audio, write_wav
from verger.music_guidance.config import BenchSettings, DemoSettings
from verger.music_guidance.guidance import MaskedL1
from verger.music_guidance.metrics import (
    classifier_kl,
    fad,
    seam_mel_distance,
    seam_mel_windows,
)
from verger.music_guidance.model import AudioDiffusion
from verger.music_guidance.plots import spectrogram_figure
from verger.music_guidance.sampling import SamplerSettings, denoise_step, sample
from verger.music_guidance.tasks import (
    Task,
    continuation,
    infill,
    run_task,
    style_classifier,
    transition,
)
from verger.music_guidance.zoo import Assets, prepare_assets

__all__ = ["run_bench", "run_demo"]


def _assets(settings: DemoSettings | BenchSettings, run: Run) -> Assets:
    return prepare_assets(settings.asset_spec(run.seed), device=run.device, root=settings.cache_dir)


def _unguided(task: Task) -> Task:
    """The same start and reference without guidance terms: the baseline of every ratio."""
    return Task(
        f"{task.name}_unguided",
        task.num_samples,
        [],
        task.start,
        task.reference,
        task.observed,
        task.k,
    )


def _references(assets: Assets, count: int, seed: int) -> list[Tensor]:
    """``count`` validation clips, cycling through the classes, chosen by ``seed``."""
    val = assets.validation
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for i in range(count):
        members = torch.nonzero(val.labels == i % len(val.classes)).flatten()
        picks.append(val.audio[members[int(torch.randint(len(members), (), generator=gen))]])
    return picks


def _infill_mask(n: int) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[3 * n // 8 : 5 * n // 8] = False
    return mask


def _spread(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _ratio_rows(name: str, guided: list[float], unguided: list[float]) -> dict[str, float]:
    per_seed = [g / u for g, u in zip(guided, unguided)]
    return {
        f"{name}_guided": sum(guided) / len(guided),
        f"{name}_unguided": sum(unguided) / len(unguided),
        f"{name}_ratio_guided_vs_unguided": sum(guided) / sum(unguided),
        f"{name}_ratio_seed_std": _spread(per_seed),
    }


def _settings(s: DemoSettings | BenchSettings, xi: float) -> SamplerSettings:
    return SamplerSettings(sampler="ddpm", steps=s.sampling_steps, xi=xi)


def _infill_l1(
    model: AudioDiffusion, clip: Tensor, s: BenchSettings | DemoSettings, seed: int, batch: int
) -> tuple[float, float, Tensor, Tensor]:
    mask = _infill_mask(clip.shape[-1])
    task = infill(model, Audio(clip, model.sample_rate), mask)
    guided = run_task(model, task, batch_size=batch, settings=_settings(s, s.xi_l1), seed=seed)
    plain = run_task(
        model, _unguided(task), batch_size=batch, settings=_settings(s, s.xi_l1), seed=seed
    )
    y = clip.to(guided)

    def l1(x: Tensor) -> float:
        return float((x[..., mask] - y[..., mask]).abs().mean())

    return l1(guided), l1(plain), guided, plain


def _continuation_seam(
    model: AudioDiffusion, clip: Tensor, s: BenchSettings | DemoSettings, seed: int, batch: int
) -> tuple[float, float, Tensor, Tensor, dict[str, float]]:
    """Seam distances guided / unguided, the two outputs, and the diagnostics of the seam:
    the real continuation's distance (the clip itself), how far each raw output's own prompt
    region is from the prompt in the before-window, and how much guidance changes the
    after-window (the only part the metric sees that guidance does not constrain)."""
    n = clip.shape[-1]
    seam = n // 2
    prompt = Audio(clip[:, :seam], model.sample_rate)
    task = continuation(model, prompt, n)
    sr = model.sample_rate
    real_before, real_after = seam_mel_windows(clip.unsqueeze(0), seam, sr)
    outs, own_before, after = [], [], []
    for t in (task, _unguided(task)):
        out = run_task(model, t, batch_size=batch, settings=_settings(s, s.xi_l1), seed=seed)
        before_raw, after_raw = seam_mel_windows(out, seam, sr)
        own_before.append(float((before_raw - real_before).abs().mean()))
        after.append(after_raw)
        out[..., :seam] = prompt.waveform.to(out)  # the prompt as the listener hears it
        outs.append(out)
    dist = [float(seam_mel_distance(o, seam, sr).mean()) for o in outs]
    extras = {
        "continuation_seam_mel_distance_real": float((real_after - real_before).abs().mean()),
        "continuation_prompt_window_mel_distance_guided": own_before[0],
        "continuation_prompt_window_mel_distance_unguided": own_before[1],
        "continuation_after_seam_mel_change_guided_vs_unguided": float(
            (after[0] - after[1]).abs().mean()
        ),
    }
    return dist[0], dist[1], outs[0], outs[1], extras


def _style_kl(
    assets: Assets, s: BenchSettings | DemoSettings, seed: int, batch: int
) -> tuple[float, float, list[Tensor]]:
    model, k = assets.model, len(assets.train.classes)
    n = model.config.clip_samples
    plain = sample(model, batch_size=batch, num_samples=n, settings=_settings(s, 0.0), seed=seed)
    p_plain = assets.eval_classifier.probabilities(plain)
    kl_guided, kl_plain, examples = [], [], []
    for c in range(k):
        target = torch.zeros(k)
        target[c] = 1.0
        task = style_classifier(model, assets.guide_classifier, c, n)
        guided = run_task(
            model, task, batch_size=batch, settings=_settings(s, s.xi_style), seed=seed
        )
        kl_guided.append(classifier_kl(assets.eval_classifier.probabilities(guided), target))
        kl_plain.append(classifier_kl(p_plain, target))
        examples.append(guided[0])
    return sum(kl_guided) / k, sum(kl_plain) / k, examples


def _step_times(model: AudioDiffusion, s: BenchSettings, batch: int) -> tuple[float, float]:
    n = model.config.clip_samples
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, *model.diffusion_shape(n), generator=g, device=device)
    ref = torch.randn(1, model.audio_channels, n, generator=g, device=device)
    term = MaskedL1(ref, _infill_mask(n).to(device)).guidance()
    cfg = _settings(s, s.xi_l1)
    model.requires_grad_(False)
    t = compare(
        {
            "unguided": lambda: denoise_step(model, x, 0.5, 0.48, settings=cfg, generator=g),
            "guided": lambda: denoise_step(
                model, x, 0.5, 0.48, settings=cfg, guidance=[term], generator=g
            ),
        },
        warmup=1,
        repeats=s.timing_repeats,
    )
    return t["guided"].median_s, t["unguided"].median_s


def run_bench(settings: BenchSettings, run: Run) -> Report:
    """Guided vs unguided with the same trained tiny model and seeds (see the module doc)."""
    s = settings
    start = time.perf_counter()
    assets = _assets(s, run)
    setup_s = time.perf_counter() - start
    model = assets.model
    report = run.report("verger-music-guidance bench")
    metrics: dict[str, float] = {}
    infill_g, infill_u, seam_g, seam_u, kl_g, kl_u = [], [], [], [], [], []
    seam_extras: dict[str, float] = {}
    for seed in range(s.seeds):
        clips = _references(assets, 2, seed)
        a, b, _, _ = _infill_l1(model, clips[0], s, seed, s.batch)
        infill_g.append(a)
        infill_u.append(b)
        a, b, _, _, extras = _continuation_seam(model, clips[1], s, seed, s.batch)
        seam_g.append(a)
        seam_u.append(b)
        for key, value in extras.items():
            seam_extras[key] = seam_extras.get(key, 0.0) + value / s.seeds
        a, b, _ = _style_kl(assets, s, seed, s.batch)
        kl_g.append(a)
        kl_u.append(b)
    metrics.update(_ratio_rows("infill_observed_l1", infill_g, infill_u))
    metrics.update(_ratio_rows("continuation_seam_mel_distance", seam_g, seam_u))
    metrics.update(seam_extras)
    metrics["continuation_seam_mel_distance_ratio_real_vs_unguided"] = (
        seam_extras["continuation_seam_mel_distance_real"] * s.seeds / sum(seam_u)
    )
    metrics.update(_ratio_rows("style_kl", kl_g, kl_u))
    guided_s, plain_s = _step_times(model, s, s.batch)
    metrics["guided_step_time_ratio"] = guided_s / plain_s
    metrics["sampling_steps_per_s"] = 1.0 / plain_s
    metrics["sampling_samples_per_s"] = s.batch / (plain_s * s.sampling_steps)
    t0 = time.perf_counter()
    generated = torch.cat(
        [
            sample(
                model,
                batch_size=min(16, s.fad_samples - i),
                settings=_settings(s, 0.0),
                seed=1000 + i,
            )
            for i in range(0, s.fad_samples, 16)
        ]
    )
    fad_s = time.perf_counter() - t0
    emb = assets.eval_classifier
    metrics["fad_model_vs_real"] = fad(emb, assets.validation.audio, generated)
    metrics["fad_train_vs_validation"] = fad(emb, assets.train.audio, assets.validation.audio)
    metrics.update(
        {
            "model_parameters": model.num_parameters(),
            "train_steps": assets.info["train_steps"],
            "eval_classifier_val_accuracy": assets.info["eval_classifier_val_accuracy"],
            "guide_classifier_val_accuracy": assets.info["guide_classifier_val_accuracy"],
            "xi_l1": s.xi_l1,
            "xi_style": s.xi_style,
            "sampling_steps": s.sampling_steps,
            "seeds": s.seeds,
            "setup_seconds": setup_s,
            "fad_sampling_seconds": fad_s,
            "torch_num_threads": torch.get_num_threads(),
        }
    )
    for name, value in metrics.items():
        report.metric(name, value)
    report.table(
        "Guided vs unguided (same model, start noise and seeds; lower is better)",
        [
            {"task": task, "guided": metrics[f"{key}_guided"], "unguided": metrics[f"{key}_unguided"],
             "ratio": metrics[f"{key}_ratio_guided_vs_unguided"], "target": target,
             "met": metrics[f"{key}_ratio_guided_vs_unguided"] <= target}
            for task, key, target in (
                ("infill (observed L1)", "infill_observed_l1", 0.3),
                ("continuation (seam mel distance)", "continuation_seam_mel_distance", 0.7),
                ("style (classifier KL)", "style_kl", 0.7),
            )
        ],
    )  # fmt: skip
    report.text(
        f"Guided step time / unguided: {metrics['guided_step_time_ratio']:.2f} (target <= 3.0); "
        f"{metrics['sampling_steps_per_s']:.1f} unguided steps/s at batch {s.batch} on {run.device}."
    )
    return report


def run_demo(settings: DemoSettings, run: Run) -> Report:
    """Every task once with the tiny model: WAVs, spectrogram PNGs and the metric table."""
    s = settings
    assets = _assets(s, run)
    model, sr = assets.model, assets.model.sample_rate
    report = run.report("verger-music-guidance demo")
    clips = _references(assets, len(assets.train.classes), run.seed)
    wav = run.path("wav")
    wav.mkdir(exist_ok=True)

    def save(name: str, audio: Tensor) -> None:
        write_wav(wav / f"{name}.wav", Audio(audio.detach().cpu().float(), sr))

    a, b, guided, plain = _infill_l1(model, clips[0], s, run.seed, 1)
    report.metric("infill_observed_l1_guided", a)
    report.metric("infill_observed_l1_unguided", b)
    report.metric("infill_observed_l1_ratio_guided_vs_unguided", a / b)
    for name, audio in (
        ("infill_input", clips[0]),
        ("infill_guided", guided[0]),
        ("infill_unguided", plain[0]),
    ):
        save(name, audio)
    mask = _infill_mask(clips[0].shape[-1])
    report.plot(
        "infill",
        spectrogram_figure(
            [clips[0], guided[0], plain[0]],
            ["input", "guided infill", "unguided"],
            sr,
            observed=mask,
        ),
    )

    a, b, guided, plain, extras = _continuation_seam(model, clips[1], s, run.seed, 1)
    for key, value in extras.items():
        report.metric(key, value)
    report.metric("continuation_seam_mel_distance_guided", a)
    report.metric("continuation_seam_mel_distance_unguided", b)
    report.metric("continuation_seam_mel_distance_ratio_guided_vs_unguided", a / b)
    save("continuation_guided", guided[0])
    save("continuation_unguided", plain[0])
    seam_mask = torch.arange(clips[1].shape[-1]) < clips[1].shape[-1] // 2
    report.plot(
        "continuation",
        spectrogram_figure(
            [clips[1], guided[0], plain[0]],
            ["reference", "guided continuation", "prompt + unguided"],
            sr,
            observed=seam_mask,
        ),
    )

    n = model.config.clip_samples
    task = transition(
        model,
        Audio(clips[0], sr),
        Audio(clips[-1], sr),
        crossfade_samples=n // 4,
        context_samples=3 * n // 8,
    )
    out = run_task(model, task, settings=_settings(s, s.xi_l1), seed=run.seed)
    assert task.reference is not None and task.observed is not None
    save("transition_crossfade", task.reference[0])
    save("transition_guided", out[0])
    report.plot(
        "transition",
        spectrogram_figure(
            [task.reference[0], out[0]],
            ["constant-power crossfade", "regenerated transition"],
            sr,
            observed=task.observed,
        ),
    )
    seam_in = float((out[0, :, ~task.observed] - task.reference[0, :, ~task.observed]).abs().mean())
    report.metric("transition_crossfade_l1_change", seam_in)

    kl_g, kl_u, examples = _style_kl(assets, s, run.seed, 2)
    report.metric("style_kl_guided", kl_g)
    report.metric("style_kl_unguided", kl_u)
    report.metric("style_kl_ratio_guided_vs_unguided", kl_g / kl_u)
    for name, audio in zip(assets.train.classes, examples):
        save(f"style_{name}", audio)
    report.plot(
        "style",
        spectrogram_figure(examples, [f"guided toward {c}" for c in assets.train.classes], sr),
    )
    report.metric("model_parameters", model.num_parameters())
    report.metric("train_steps", assets.info["train_steps"])
    report.metric("eval_classifier_val_accuracy", assets.info["eval_classifier_val_accuracy"])
    report.text(f"WAV files: `{wav.name}/`. Classes: {', '.join(assets.train.classes)}.")
    return report
