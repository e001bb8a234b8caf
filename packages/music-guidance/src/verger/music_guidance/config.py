"""The settings of each command: one validated dataclass each (verger.core.settings).

Every field is declared once: its default, its ``--quick`` value, its bounds and its help.
The CLI derives ``--<field>`` flags from them; library code receives the dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from verger.core.settings import Settings, option
from verger.music_guidance.embedded import EmbeddedDataConfig
from verger.music_guidance.model import DiffusionConfig
from verger.music_guidance.training import TrainConfig
from verger.music_guidance.zoo import AssetSpec

__all__ = [
    "BenchSettings",
    "DemoSettings",
    "SampleSettings",
    "TaskSettings",
    "TrainSettings",
    "TransitionSettings",
]

SYNTHS = ("builtin", "fluidsynth", "auto")


@dataclass(kw_only=True)
class _AssetFields(Settings):
    """The tiny model and classifiers the demo and bench train (or load, cached)."""

    train_steps: int = option(800, quick=120, at_least=1, help="diffusion training steps")
    batch_size: int = option(12, quick=8, at_least=1, help="training clips per step")
    classifier_steps: int = option(300, quick=60, at_least=1, help="classifier training steps")
    pieces_per_collection: int = option(24, quick=6, at_least=2, help="corpus pieces per class")
    seconds_per_piece: float = option(12.0, quick=6.0, above=1.1, help="seconds rendered per piece")
    synth: str = option("builtin", choices=SYNTHS, help="score renderer (fluidsynth if installed)")
    cache_dir: Path | None = option(
        None, identity=False, help="cache of data and trained assets (default $VERGER_DATA)"
    )

    def asset_spec(self, seed: int) -> AssetSpec:
        return AssetSpec(
            data=EmbeddedDataConfig(
                pieces_per_collection=self.pieces_per_collection,
                seconds_per_piece=self.seconds_per_piece,
                synth=self.synth,
            ),
            model=DiffusionConfig.tiny(),
            train=TrainConfig(
                steps=self.train_steps,
                batch_size=self.batch_size,
                warmup_steps=min(100, max(1, self.train_steps // 8)),
                checkpoint_every=50,
                log_every=10,
                seed=seed,
            ),
            classifier_steps=self.classifier_steps,
        )


@dataclass(kw_only=True)
class DemoSettings(_AssetFields):
    """``demo``: render pieces, train (or load) the tiny model, run every task, write WAVs."""

    sampling_steps: int = option(50, quick=20, at_least=2, help="DDPM steps per sample")
    xi_l1: float = option(0.06, at_least=0.0, help="guidance step for the L1 tasks")
    xi_style: float = option(0.3, at_least=0.0, help="guidance step for classifier style")


@dataclass(kw_only=True)
class BenchSettings(_AssetFields):
    """``bench``: guided vs unguided, same model and seeds, measured in one run."""

    sampling_steps: int = option(50, quick=20, at_least=2, help="DDPM steps per sample")
    seeds: int = option(3, quick=2, at_least=1, help="seeds per comparison")
    batch: int = option(8, quick=4, at_least=1, help="samples per seed")
    fad_samples: int = option(64, quick=12, at_least=4, help="unguided samples for FAD")
    timing_repeats: int = option(10, quick=4, at_least=1, identity=False, help="timed step pairs")
    xi_l1: float = option(0.06, at_least=0.0, help="guidance step for infill and continuation")
    xi_style: float = option(0.3, at_least=0.0, help="guidance step for classifier style")


@dataclass(kw_only=True)
class TrainSettings(Settings):
    """``train``: the diffusion model on the embedded data or a folder of audio files."""

    kind: str = option("waveform", choices=("waveform", "latent"), help="model configuration")
    data: Path | None = option(None, help="folder of audio files (default: the embedded corpus)")
    metadata: Path | None = option(None, help="FMA-style tracks.csv for labels (with --data)")
    max_clips: int = option(2000, quick=200, at_least=1, help="clips read from --data")
    steps: int = option(800, quick=40, at_least=1, help="optimizer steps")
    batch_size: int = option(12, quick=4, at_least=1, help="clips per step")
    lr: float = option(2e-3, above=0.0, help="peak learning rate (AdamW)")
    ema_decay: float = option(0.995, at_least=0.0, at_most=0.9999, help="EMA decay")
    autoencoder_steps: int = option(600, quick=20, at_least=1, help="latent: autoencoder steps")
    pieces_per_collection: int = option(24, quick=4, at_least=2, help="embedded pieces per class")
    seconds_per_piece: float = option(12.0, quick=4.0, above=1.1, help="seconds per piece")
    synth: str = option("builtin", choices=SYNTHS, help="score renderer")
    checkpoint_every: int = option(
        100, quick=20, at_least=1, identity=False, help="checkpoint cadence"
    )
    cache_dir: Path | None = option(None, identity=False, help="embedded data cache")


@dataclass(kw_only=True)
class _SamplerFields(Settings):
    model: Path | None = option(None, help="a saved model folder (default: the cached tiny model)")
    steps: int = option(50, quick=20, at_least=1, help="sampler steps")
    sampler: str = option("ddpm", choices=("ddpm", "ddim"), help="sampler")
    eta: float = option(0.0, at_least=0.0, at_most=1.0, help="DDIM noise (0 = deterministic)")
    batch: int = option(2, at_least=1, help="samples to draw")
    cache_dir: Path | None = option(None, identity=False, help="cache of the default tiny model")


@dataclass(kw_only=True)
class SampleSettings(_SamplerFields):
    """``sample``: unconditional samples."""

    seconds: float = option(1.024, above=0.0, help="length of each sample")


@dataclass(kw_only=True)
class TaskSettings(_SamplerFields):
    """``continue`` / ``infill`` / ``regenerate`` / ``style``: one production task on a WAV."""

    input: Path | None = option(None, help="input WAV (default: a clip of the embedded data)")
    xi: float = option(0.06, at_least=0.0, help="guidance step size (style: try 0.3)")
    gradient: str = option("x_t", choices=("x_t", "x0_hat", "noisy"), help="guidance gradient")
    project: str = option("none", choices=("none", "clean", "noised"), help="projection")
    seconds: float = option(1.024, above=0.0, help="continue: output length")
    prompt_seconds: float = option(0.512, above=0.0, help="continue: prompt kept from --input")
    gap_start: float = option(0.384, at_least=0.0, help="infill/regenerate: gap start (s)")
    gap_seconds: float = option(0.256, at_least=0.0, help="infill/regenerate: gap length (s)")
    k: float = option(0.85, above=0.0, at_most=1.0, help="regenerate: noise mix")
    target_class: str = option("bach_chorales", help="style: target class name")
    classifier: Path | None = option(
        None, help="style: a classifier folder to steer by (default: the tiny assets' own)"
    )


@dataclass(kw_only=True)
class TransitionSettings(_SamplerFields):
    """``transition``: a smooth transition between two WAVs over a constant-power crossfade."""

    left: Path | None = option(None, help="first track (default: an embedded clip)")
    right: Path | None = option(None, help="second track (default: an embedded clip)")
    crossfade_seconds: float = option(0.256, above=0.0, help="crossfade length")
    context_seconds: float = option(0.384, above=0.0, help="context kept on each side")
    k: float = option(0.85, above=0.0, at_most=1.0, help="noise mix of the regeneration")
    xi: float = option(0.06, at_least=0.0, help="guidance step size")
    project: str = option("none", choices=("none", "clean", "noised"), help="projection")
