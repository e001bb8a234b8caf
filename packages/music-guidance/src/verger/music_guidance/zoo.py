"""Trained tiny assets, cached across runs: the diffusion model (EMA) and two classifiers.

:func:`prepare_assets` trains, or loads when cached, everything the demo and the bench use:
the embedded clips, an *evaluation* classifier (seed 0: the FAD embedding and the KL judge)
and a separate *guidance* classifier (seed 1), so that style guidance is judged by a model
it did not steer, and the diffusion model. The cache folder
``$VERGER_DATA/music-guidance/assets/<key>/`` (key = hash of every setting) is built once
under a lock and written atomically; the diffusion training checkpoints in a sibling
``.work-<key>/`` folder, so a killed build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from verger.core.data.sources import data_dir
from verger.core.files import atomic_directory, build_once
from verger.music_guidance.classifier import (
    AudioClassifier,
    ClassifierConfig,
    load_classifier,
    train_classifier,
)
from verger.music_guidance.embedded import ClipSet, EmbeddedDataConfig, load_embedded
from verger.music_guidance.model import AudioDiffusion, DiffusionConfig, load_diffusion
from verger.music_guidance.training import TrainConfig, train_autoencoder, train_diffusion
from verger.music_guidance.validation import integer

__all__ = ["AssetSpec", "Assets", "prepare_assets"]

FORMAT = 1


@dataclass(kw_only=True)
class AssetSpec:
    """Everything that decides the trained assets (and so their cache key)."""

    data: EmbeddedDataConfig = field(default_factory=EmbeddedDataConfig)
    model: DiffusionConfig = field(default_factory=DiffusionConfig.tiny)
    train: TrainConfig = field(default_factory=TrainConfig)
    classifier_steps: int = 300

    def __post_init__(self) -> None:
        integer("classifier_steps", self.classifier_steps, at_least=1)
        if (
            self.data.sample_rate != self.model.sample_rate
            or self.data.clip_samples != self.model.clip_samples
        ):
            raise ValueError(
                f"data ({self.data.sample_rate} Hz, {self.data.clip_samples} samples) and model "
                f"({self.model.sample_rate} Hz, {self.model.clip_samples} samples) must agree"
            )

    def key(self) -> str:
        blob = {
            "format": FORMAT,
            "data": self.data.key(),
            "model": self.model.to_dict(),
            # log and checkpoint cadences do not change the trained weights
            "train": {
                k: v
                for k, v in asdict(self.train).items()
                if k not in ("log_every", "checkpoint_every")
            },
            "classifier_steps": self.classifier_steps,
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[
            :16
        ]


@dataclass
class Assets:
    model: AudioDiffusion
    eval_classifier: AudioClassifier
    guide_classifier: AudioClassifier
    train: ClipSet
    validation: ClipSet
    folder: Path
    info: dict[str, Any]


def _classifier_config(spec: AssetSpec, classes: list[str]) -> ClassifierConfig:
    return ClassifierConfig(sample_rate=spec.data.sample_rate, classes=tuple(classes))


def prepare_assets(
    spec: AssetSpec,
    *,
    device: torch.device | str = "cpu",
    root: str | Path | None = None,
    show_progress: bool | None = None,
) -> Assets:
    """Load the cached assets of ``spec`` or train them (once, under a lock)."""
    device = torch.device(device)
    base = Path(root) if root is not None else data_dir() / "music-guidance"
    train_set = load_embedded(spec.data, "train", root=base / "embedded")
    val_set = load_embedded(spec.data, "validation", root=base / "embedded")
    folder = base / "assets" / spec.key()

    def load() -> Assets | None:
        info_file = folder / "info.json"
        if not info_file.is_file():
            return None
        info = json.loads(info_file.read_text())
        return Assets(
            load_diffusion(folder / "model", device=device),
            load_classifier(folder / "eval_classifier", device=device),
            load_classifier(folder / "guide_classifier", device=device),
            train_set,
            val_set,
            folder,
            info,
        )

    def build() -> Assets:
        import time

        start = time.perf_counter()
        cls_cfg = _classifier_config(spec, train_set.classes)
        classifiers = [
            train_classifier(
                train_set.audio,
                train_set.labels,
                cls_cfg,
                steps=spec.classifier_steps,
                seed=seed,
                show_progress=show_progress,
            )
            for seed in (0, 1)
        ]
        classifier_s = time.perf_counter() - start
        torch.manual_seed(spec.train.seed)
        model = AudioDiffusion(spec.model)
        if model.is_latent:
            train_autoencoder(
                model, train_set.audio, spec.train, device=device, show_progress=show_progress
            )
        result = train_diffusion(
            model,
            train_set.audio,
            spec.train,
            out_dir=folder.parent / f".work-{folder.name}",
            device=device,
            show_progress=show_progress,
        )
        val_acc = [
            float((c.probabilities(val_set.audio).argmax(-1) == val_set.labels).float().mean())
            for c in classifiers
        ]
        info = {
            "key": spec.key(),
            "model_parameters": model.num_parameters(),
            "train_steps": spec.train.steps,
            "train_clips": len(train_set),
            "validation_clips": len(val_set),
            "train_loss_final": result.history[-1].loss if result.history else None,
            "eval_classifier_val_accuracy": val_acc[0],
            "guide_classifier_val_accuracy": val_acc[1],
            "classifier_seconds": classifier_s,
            "build_seconds": time.perf_counter() - start,
        }
        with atomic_directory(folder) as tmp:
            result.ema.save_pretrained(tmp / "model")
            classifiers[0].save_pretrained(tmp / "eval_classifier")
            classifiers[1].save_pretrained(tmp / "guide_classifier")
            (tmp / "info.json").write_text(json.dumps(info, indent=2))
        found = load()
        assert found is not None
        return found

    return build_once(folder, load, build)
