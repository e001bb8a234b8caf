"""The latent configuration's audio autoencoder: ConvNeXt-style 1-D encoder and decoder.

The paper's latent model compresses 44.1 kHz stereo 128x in time with a ConvNeXt VAE; this
one has the same shape at any size: strided downsampling stages of ConvNeXt blocks to a
Gaussian posterior (mean, log-variance) with a small KL term, and a mirrored decoder with
nearest-neighbour upsampling. ``latent_scale`` (set from data after training) makes the
latents unit-variance for the diffusion model, which only sees ``encode(x) / scale``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verger.music_guidance.validation import finite_number, int_tuple, integer

__all__ = ["AudioAutoencoder", "AutoencoderConfig", "ConvNeXtBlock1D"]


@dataclass(kw_only=True)
class AutoencoderConfig:
    """``factors`` multiply to the time compression; ``channels[i]`` is stage i's width."""

    audio_channels: int = 1
    latent_channels: int = 8
    channels: tuple[int, ...] = (32, 48, 64, 96)
    factors: tuple[int, ...] = (2, 2, 2, 2)
    blocks_per_stage: int = 1
    kernel_size: int = 7
    kl_weight: float = 1e-4

    def __post_init__(self) -> None:
        integer("audio_channels", self.audio_channels, at_least=1)
        integer("latent_channels", self.latent_channels, at_least=1)
        self.channels = int_tuple("channels", self.channels, at_least=1)
        self.factors = int_tuple("factors", self.factors, at_least=1)
        if len(self.channels) != len(self.factors) or not self.channels:
            raise ValueError(
                f"channels={self.channels} and factors={self.factors} need one entry per stage"
            )
        integer("blocks_per_stage", self.blocks_per_stage, at_least=0)
        integer("kernel_size", self.kernel_size, at_least=1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size} must be odd")
        finite_number("kl_weight", self.kl_weight, at_least=0)

    @property
    def compression(self) -> int:
        return math.prod(self.factors)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoencoderConfig:
        fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fixed)


class ConvNeXtBlock1D(nn.Module):
    """Depthwise conv -> LayerNorm over channels -> 4x pointwise MLP (GELU) -> residual."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.dw = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.pw1 = nn.Linear(channels, 4 * channels)
        self.pw2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), 0.1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.dw(x).transpose(1, 2)
        h = self.pw2(F.gelu(self.pw1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class AudioAutoencoder(nn.Module):
    """``encode(audio [B, C, T]) -> z [B, latent, T / compression]``; ``decode(z) -> audio``.

    ``encode`` returns the posterior mean divided by ``latent_scale`` (deterministic, so
    guidance through ``decode`` is a smooth function of the latent); :meth:`posterior` gives
    the mean and log-variance for training.
    """

    latent_scale: Tensor

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = cfg = config
        k = cfg.kernel_size
        self.enc_in = nn.Conv1d(cfg.audio_channels, cfg.channels[0], k, padding=k // 2)
        self.encoder = nn.ModuleList()
        prev = cfg.channels[0]
        for ch, f in zip(cfg.channels, cfg.factors):
            blocks: list[nn.Module] = [
                ConvNeXtBlock1D(prev, k) for _ in range(cfg.blocks_per_stage)
            ]
            blocks.append(nn.Conv1d(prev, ch, f, stride=f))  # patchify: exact T / f for any f
            self.encoder.append(nn.Sequential(*blocks))
            prev = ch
        self.enc_out = nn.Conv1d(prev, 2 * cfg.latent_channels, 3, padding=1)
        self.dec_in = nn.Conv1d(cfg.latent_channels, prev, 3, padding=1)
        self.decoder = nn.ModuleList()
        outs = [*list(cfg.channels[:-1][::-1]), cfg.channels[0]]
        for ch in outs:
            self.decoder.append(
                nn.ModuleDict(
                    {
                        "up": nn.Conv1d(prev, ch, k, padding=k // 2),
                        "blocks": nn.Sequential(
                            *[ConvNeXtBlock1D(ch, k) for _ in range(cfg.blocks_per_stage)]
                        ),
                    }
                )
            )
            prev = ch
        self.dec_out = nn.Conv1d(prev, cfg.audio_channels, k, padding=k // 2)
        self.register_buffer("latent_scale", torch.ones(()))

    @property
    def compression(self) -> int:
        return self.config.compression

    def posterior(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z | audio), unscaled."""
        if audio.ndim != 3 or audio.shape[1] != self.config.audio_channels:
            raise ValueError(
                f"audio must be [B, {self.config.audio_channels}, T], got {tuple(audio.shape)}"
            )
        if audio.shape[-1] % self.compression:
            raise ValueError(
                f"length {audio.shape[-1]} must be a multiple of the compression {self.compression}"
            )
        h = self.enc_in(audio)
        for stage in self.encoder:
            h = stage(h)
        mean, logvar = self.enc_out(F.gelu(h)).chunk(2, dim=1)
        return mean, logvar.clamp(-20, 10)

    def decode_unscaled(self, z: Tensor) -> Tensor:
        h = self.dec_in(z)
        for stage, f in zip(cast(list[Any], self.decoder), self.config.factors[::-1]):
            h = F.interpolate(h, scale_factor=f, mode="nearest")
            h = stage["blocks"](stage["up"](h))
        return self.dec_out(F.gelu(h))

    def encode(self, audio: Tensor) -> Tensor:
        return self.posterior(audio)[0] / self.latent_scale

    def decode(self, z: Tensor) -> Tensor:
        return self.decode_unscaled(z * self.latent_scale)

    def training_loss(self, audio: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """L1 on samples + multi-resolution log-spectrogram L1 + ``kl_weight`` * KL."""
        mean, logvar = self.posterior(audio)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        z = mean + (0.5 * logvar).exp() * noise
        recon = self.decode_unscaled(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return (
            F.l1_loss(recon, audio)
            + multiresolution_spectral_l1(recon, audio)
            + self.config.kl_weight * kl
        )


def multiresolution_spectral_l1(
    x: Tensor, y: Tensor, sizes: tuple[int, ...] = (64, 256, 1024)
) -> Tensor:
    """Mean L1 between log-magnitude STFTs at several window sizes (sizes > length skipped)."""
    total = x.new_zeros(())
    used = 0
    flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    for n in sizes:
        if n > x.shape[-1]:
            continue
        window = torch.hann_window(n, device=x.device, dtype=x.dtype)
        sx = torch.stft(flat_x, n, n // 4, window=window, return_complex=True).abs()
        sy = torch.stft(flat_y, n, n // 4, window=window, return_complex=True).abs()
        total = total + (torch.log(sx + 1e-5) - torch.log(sy + 1e-5)).abs().mean()
        used += 1
    return total / max(used, 1)
