"""One unconditional audio diffusion model in two configurations: waveform and latent.

:class:`AudioDiffusion` pairs a denoiser (predicting v in the space it diffuses in) with a
codec between audio and that space: the identity for the waveform model, the
:class:`~verger.music_guidance.autoencoder.AudioAutoencoder` for the latent model. Guidance
losses are always functions of *audio*: the sampler decodes the clean estimate before
applying them, so the same task works on both configurations.

Presets: :meth:`DiffusionConfig.tiny` (CPU: 8 kHz mono, 1 s clips), :meth:`tiny_latent`,
:meth:`paper_waveform` (44.1 kHz stereo, ~440M-parameter U-Net, 11.9 s) and
:meth:`paper_latent` (128x VAE + 32-layer width-1536 DiT, 5.9 s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from verger.core.files import atomic_directory
from verger.music_guidance.autoencoder import AudioAutoencoder, AutoencoderConfig
from verger.music_guidance.dit import DiT1D, DiTConfig
from verger.music_guidance.schedule import CosineSchedule, v_target
from verger.music_guidance.unet import UNet1D, UNetConfig
from verger.music_guidance.validation import finite_number, integer, one_of

__all__ = ["AudioDiffusion", "DiffusionConfig", "load_diffusion"]

KINDS = ("waveform", "latent")


@dataclass(kw_only=True)
class DiffusionConfig:
    """What the model diffuses: ``kind``, audio format, clip length and the networks' sizes.

    ``clip_samples`` is the training and default sampling length in audio samples; it must be
    a multiple of :attr:`length_multiple`. ``audio_scale`` (waveform model) multiplies audio on
    its way into diffusion space and divides it on the way out: the variance-preserving
    schedule assumes unit-variance data, and audio clips have a standard deviation near 0.15,
    which at scale 1 leaves only t < 0.1 (a few sampler steps) where the signal outweighs the
    noise. The latent model has its own ``latent_scale`` for the same reason.
    """

    kind: str = "waveform"
    sample_rate: int = 8000
    audio_channels: int = 1
    clip_samples: int = 8192
    unet: UNetConfig | None = field(default=None)
    dit: DiTConfig | None = None
    autoencoder: AutoencoderConfig | None = None
    audio_scale: float = 1.0

    def __post_init__(self) -> None:
        one_of("kind", self.kind, KINDS)
        self.audio_scale = finite_number("audio_scale", self.audio_scale, above=0)
        integer("sample_rate", self.sample_rate, at_least=1000)
        integer("audio_channels", self.audio_channels, at_least=1)
        integer("clip_samples", self.clip_samples, at_least=1)
        if self.kind == "waveform":
            if self.unet is None:
                self.unet = UNetConfig(in_channels=self.audio_channels)
            if self.dit is not None or self.autoencoder is not None:
                raise ValueError("kind='waveform' takes a unet config, not dit/autoencoder")
            if self.unet.in_channels != self.audio_channels:
                raise ValueError(
                    f"unet.in_channels={self.unet.in_channels} must equal "
                    f"audio_channels={self.audio_channels} for the waveform model"
                )
        else:
            if self.audio_scale != 1.0:
                raise ValueError(
                    f"audio_scale={self.audio_scale} is for the waveform model; the latent "
                    "model scales its latents (autoencoder latent_scale)"
                )
            if self.autoencoder is None:
                self.autoencoder = AutoencoderConfig(audio_channels=self.audio_channels)
            if self.autoencoder.audio_channels != self.audio_channels:
                raise ValueError("autoencoder.audio_channels must equal audio_channels")
            if (self.unet is None) == (self.dit is None):
                raise ValueError("kind='latent' needs exactly one denoiser: unet or dit")
            denoiser_in = (self.unet or self.dit).in_channels  # type: ignore[union-attr]
            if denoiser_in != self.autoencoder.latent_channels:
                raise ValueError(
                    f"the denoiser's in_channels={denoiser_in} must equal "
                    f"autoencoder.latent_channels={self.autoencoder.latent_channels}"
                )
        if self.clip_samples % self.length_multiple:
            raise ValueError(
                f"clip_samples={self.clip_samples} must be a multiple of {self.length_multiple}"
            )

    @property
    def length_multiple(self) -> int:
        """Audio lengths the model accepts are multiples of this."""
        denoiser = self.unet if self.unet is not None else self.dit
        assert denoiser is not None
        codec = self.autoencoder.compression if self.autoencoder is not None else 1
        return codec * denoiser.length_multiple

    @property
    def clip_seconds(self) -> float:
        return self.clip_samples / self.sample_rate

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **overrides: Any) -> DiffusionConfig:
        """CPU-sized waveform model: 8 kHz mono, 8192-sample (~1 s) clips, ~0.7M parameters.

        ``audio_scale`` stays 1 (the measured results); ``tiny(audio_scale=6)`` brings the
        embedded clips (standard deviation about 0.16) to about unit variance.
        """
        base: dict[str, Any] = dict(
            sample_rate=8000,
            clip_samples=8192,
            unet=UNetConfig(
                frame_size=32,
                frame_hop=16,
                channels=(32, 48, 64, 96),
                factors=(1, 2, 2, 2),
                blocks_per_level=1,
                attention_levels=(3,),
                kernel_size=3,
                time_dim=64,
            ),
        )
        return cls(**{**base, **overrides})

    @classmethod
    def tiny_latent(cls, **overrides: Any) -> DiffusionConfig:
        """CPU-sized latent model: a 64x autoencoder (16 latent channels) + a small DiT."""
        base: dict[str, Any] = dict(
            kind="latent",
            sample_rate=8000,
            clip_samples=8192,
            autoencoder=AutoencoderConfig(
                latent_channels=16, channels=(32, 48, 64, 96), factors=(2, 2, 4, 4)
            ),
            dit=DiTConfig(in_channels=16, width=96, depth=3, heads=4, time_dim=64),
        )
        return cls(**{**base, **overrides})

    @classmethod
    def paper_waveform(cls) -> DiffusionConfig:
        """44.1 kHz stereo, 11.9 s, frames of 32 with hop 16 folded into 64 channels."""
        return cls(
            sample_rate=44100,
            audio_channels=2,
            clip_samples=2**19,  # 11.89 s
            unet=UNetConfig(
                in_channels=2,
                frame_size=32,
                frame_hop=16,
                channels=(256, 512, 768, 1024, 1024, 1024, 1024),
                factors=(1, 2, 2, 2, 2, 2, 2),
                blocks_per_level=2,
                attention_levels=(4, 5, 6),
                heads=16,
                kernel_size=5,
                time_dim=512,
                groups=32,
            ),
        )

    @classmethod
    def paper_latent(cls) -> DiffusionConfig:
        """44.1 kHz stereo, 5.9 s: a 128x ConvNeXt VAE (64 latent channels) + a 1B-class DiT."""
        return cls(
            kind="latent",
            sample_rate=44100,
            audio_channels=2,
            clip_samples=2**18,  # 5.94 s
            autoencoder=AutoencoderConfig(
                audio_channels=2,
                latent_channels=64,
                channels=(128, 256, 512, 512, 1024),
                factors=(2, 4, 4, 2, 2),
                blocks_per_stage=2,
            ),
            dit=DiTConfig(
                in_channels=64, width=1536, depth=32, heads=24, mlp_ratio=8 / 3, time_dim=512
            ),
        )

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": self.kind,
            "sample_rate": self.sample_rate,
            "audio_channels": self.audio_channels,
            "clip_samples": self.clip_samples,
            "unet": self.unet.to_dict() if self.unet else None,
            "dit": self.dit.to_dict() if self.dit else None,
            "autoencoder": self.autoencoder.to_dict() if self.autoencoder else None,
        }
        if self.audio_scale != 1.0:  # written only when set: older folders and cache keys hold
            data["audio_scale"] = self.audio_scale
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionConfig:
        return cls(
            kind=data["kind"],
            sample_rate=data["sample_rate"],
            audio_channels=data["audio_channels"],
            clip_samples=data["clip_samples"],
            audio_scale=data.get("audio_scale", 1.0),
            unet=UNetConfig.from_dict(data["unet"]) if data.get("unet") else None,
            dit=DiTConfig.from_dict(data["dit"]) if data.get("dit") else None,
            autoencoder=(
                AutoencoderConfig.from_dict(data["autoencoder"])
                if data.get("autoencoder")
                else None
            ),
        )


class AudioDiffusion(nn.Module):
    """The denoiser ``v_theta(x_t, t)`` and the codec between audio and diffusion space."""

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__()
        self.config = config
        self.schedule = CosineSchedule()
        self.denoiser: nn.Module
        if config.unet is not None:
            self.denoiser = UNet1D(config.unet)
        else:
            assert config.dit is not None
            self.denoiser = DiT1D(config.dit)
        self.autoencoder = AudioAutoencoder(config.autoencoder) if config.autoencoder else None

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def audio_channels(self) -> int:
        return self.config.audio_channels

    @property
    def is_latent(self) -> bool:
        return self.autoencoder is not None

    def check_length(self, samples: int) -> None:
        m = self.config.length_multiple
        if not isinstance(samples, int) or samples < m or samples % m:
            raise ValueError(f"num_samples={samples!r} must be a positive multiple of {m}")

    def diffusion_shape(self, num_samples: int) -> tuple[int, int]:
        """(channels, length) of the diffused tensor for ``num_samples`` audio samples."""
        self.check_length(num_samples)
        if self.autoencoder is None:
            return self.audio_channels, num_samples
        ae = self.autoencoder.config
        return ae.latent_channels, num_samples // ae.compression

    def encode(self, audio: Tensor) -> Tensor:
        """Audio [B, C, T] -> diffusion space (``audio * audio_scale`` for the waveform model)."""
        if self.autoencoder is None:
            return audio * self.config.audio_scale if self.config.audio_scale != 1.0 else audio
        return self.autoencoder.encode(audio)

    def decode(self, x: Tensor) -> Tensor:
        """Diffusion space -> audio (differentiable)."""
        if self.autoencoder is None:
            return x / self.config.audio_scale if self.config.audio_scale != 1.0 else x
        return self.autoencoder.decode(x)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The predicted v for ``x_t`` at times ``t`` [B] (or a scalar time)."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.denoiser(x_t, t.to(x_t.dtype))

    def training_loss(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``|| v_theta(x_t, t) - v ||^2`` for clean ``x0`` in diffusion space."""
        alpha, sigma = self.schedule.alpha_sigma(t.to(torch.float64))
        a = alpha.to(x0.dtype).view(-1, 1, 1)
        s = sigma.to(x0.dtype).view(-1, 1, 1)
        x_t = a * x0 + s * noise
        return F.mse_loss(self(x_t, t), v_target(x0, noise, a, s))

    def num_parameters(self, part: str = "all") -> int:
        module = {"all": self, "denoiser": self.denoiser, "autoencoder": self.autoencoder}[part]
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory: str | Path) -> Path:
        """``directory/{config.json, model.safetensors}``, written atomically."""
        target = Path(directory)
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
            save_model(self, str(tmp / "model.safetensors"))
        return target


def load_diffusion(directory: str | Path, *, device: str | torch.device = "cpu") -> AudioDiffusion:
    """Load a model written by :meth:`AudioDiffusion.save_pretrained`."""
    folder = Path(directory)
    config_file, weights = folder / "config.json", folder / "model.safetensors"
    for path in (config_file, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a saved AudioDiffusion model folder")
    model = AudioDiffusion(DiffusionConfig.from_dict(json.loads(config_file.read_text())))
    load_model(model, str(weights), device=str(device))
    return model.to(device).eval()
