"""The waveform denoiser: a 1-D U-Net over audio folded into Hamming-windowed frames.

The paper folds 44.1 kHz stereo into channels with Hamming-windowed frames (size 32, hop 16)
before its U-Net; :class:`FrameFold` does that and its exact inverse (windowed overlap-add
divided by the summed squared window), so the network runs at 1/hop of the sample rate.
Blocks: GroupNorm-SiLU-conv residual blocks with a FiLM (scale, shift) from the noise-level
embedding, self-attention at the coarse levels, nearest-neighbour upsampling.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from verger.music_guidance.validation import int_tuple, integer

__all__ = ["FrameFold", "UNet1D", "UNetConfig", "timestep_embedding"]


@dataclass(kw_only=True)
class UNetConfig:
    """Sizes of :class:`UNet1D`. ``factors[i]`` downsamples before level ``i`` (``factors[0]`` = 1).

    ``frame_size = 0`` feeds raw samples (or latents) to the first convolution.
    """

    in_channels: int = 1
    frame_size: int = 16
    frame_hop: int = 8
    channels: tuple[int, ...] = (64, 96, 128, 160)
    factors: tuple[int, ...] = (1, 2, 2, 2)
    blocks_per_level: int = 2
    attention_levels: tuple[int, ...] = (3,)
    heads: int = 4
    kernel_size: int = 5
    time_dim: int = 128
    groups: int = 8

    def __post_init__(self) -> None:
        integer("in_channels", self.in_channels, at_least=1)
        integer("frame_size", self.frame_size, at_least=0)
        integer("frame_hop", self.frame_hop, at_least=1)
        if self.frame_size and (
            self.frame_size % self.frame_hop or self.frame_hop > self.frame_size
        ):
            raise ValueError(
                f"frame_size={self.frame_size} must be a multiple of frame_hop={self.frame_hop}"
            )
        self.channels = int_tuple("channels", self.channels, at_least=1)
        self.factors = int_tuple("factors", self.factors, at_least=1)
        if len(self.factors) != len(self.channels):
            raise ValueError(
                f"factors={self.factors} must have one entry per level of channels={self.channels}"
            )
        if self.factors[0] != 1:
            raise ValueError(f"factors={self.factors}: the first level is not downsampled (1)")
        self.attention_levels = int_tuple("attention_levels", self.attention_levels, at_least=0)
        if any(level >= len(self.channels) for level in self.attention_levels):
            raise ValueError(
                f"attention_levels={self.attention_levels} must be < {len(self.channels)} levels"
            )
        integer("blocks_per_level", self.blocks_per_level, at_least=1)
        integer("heads", self.heads, at_least=1)
        integer("kernel_size", self.kernel_size, at_least=1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size} must be odd (same-length convs)")
        integer("time_dim", self.time_dim, at_least=2)
        if self.time_dim % 2:
            raise ValueError(f"time_dim={self.time_dim} must be even (sin/cos halves)")
        integer("groups", self.groups, at_least=1)
        for c in self.channels:
            if c % self.groups or c % self.heads:
                raise ValueError(
                    f"channels={self.channels}: each must be divisible by groups={self.groups} "
                    f"and heads={self.heads}"
                )

    @property
    def length_multiple(self) -> int:
        """Input lengths must be multiples of this (frame hop times all downsampling)."""
        return (self.frame_hop if self.frame_size else 1) * math.prod(self.factors)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fixed)


class FrameFold(nn.Module):
    """``[B, C, T] -> [B, C*P, T/hop]`` Hamming-windowed frames, and the exact inverse.

    The signal is padded by ``P - hop`` (split between both ends) so that there are exactly
    ``T / hop`` frames. :meth:`unfold` overlap-adds windowed frames and divides by the summed
    squared window: the least-squares inverse, exact on frames that :meth:`fold` produced.
    """

    window: Tensor

    def __init__(self, channels: int, size: int, hop: int) -> None:
        super().__init__()
        self.channels, self.size, self.hop = channels, size, hop
        self.register_buffer("window", torch.hamming_window(size, periodic=False), persistent=False)
        self.pad_left = (size - hop) // 2
        self.pad_right = size - hop - self.pad_left

    def fold(self, x: Tensor) -> Tensor:
        B, C, T = x.shape
        if T % self.hop:
            raise ValueError(f"length {T} must be a multiple of the frame hop {self.hop}")
        xp = F.pad(x, (self.pad_left, self.pad_right))
        frames = xp.unfold(-1, self.size, self.hop) * self.window.to(x.dtype)  # [B, C, N, P]
        return frames.permute(0, 1, 3, 2).reshape(B, C * self.size, T // self.hop)

    def unfold(self, frames: Tensor) -> Tensor:
        B, _CP, N = frames.shape
        C, P = self.channels, self.size
        w = self.window.to(frames.dtype)
        fr = frames.reshape(B, C, P, N) * w.view(1, 1, P, 1)
        total = (N - 1) * self.hop + P
        ola = F.fold(fr.reshape(B * C, P, N), (1, total), (1, P), stride=(1, self.hop))
        norm = F.fold(
            (w * w).view(1, P, 1).expand(1, P, N), (1, total), (1, P), stride=(1, self.hop)
        )
        out = (ola / norm).reshape(B, C, total)
        return out[..., self.pad_left : total - self.pad_right]


def timestep_embedding(t: Tensor, dim: int, *, scale: float = 1000.0) -> Tensor:
    """Sinusoidal features of continuous times ``t`` [B] in [0, 1] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = nn.Conv1d(cin, cout, kernel, padding=kernel // 2)
        self.film = nn.Linear(tdim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.conv2 = nn.Conv1d(cout, cout, kernel, padding=kernel // 2)
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(temb).unsqueeze(-1).chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Attention1D(nn.Module):
    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, N = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, N).unbind(1)
        out = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, N))


def _groups(channels: int, groups: int) -> int:
    return math.gcd(channels, groups)


class UNet1D(nn.Module):
    """``forward(x [B, C, T], t [B]) -> v [B, C, T]`` (T a multiple of ``length_multiple``)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.fold = (
            FrameFold(cfg.in_channels, cfg.frame_size, cfg.frame_hop) if cfg.frame_size else None
        )
        width_in = cfg.in_channels * (cfg.frame_size or 1)
        tdim = cfg.time_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(tdim, 4 * tdim), nn.SiLU(), nn.Linear(4 * tdim, tdim)
        )
        self.conv_in = nn.Conv1d(
            width_in, cfg.channels[0], cfg.kernel_size, padding=cfg.kernel_size // 2
        )
        k, g = cfg.kernel_size, cfg.groups
        self.down = nn.ModuleList()
        skips = []
        prev = cfg.channels[0]
        for level, (ch, factor) in enumerate(zip(cfg.channels, cfg.factors)):
            stage = nn.ModuleDict()
            stage["downsample"] = (
                nn.Conv1d(prev, prev, 2 * factor + 1, stride=factor, padding=factor)
                if factor > 1
                else nn.Identity()
            )
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            stage["blocks"], stage["attn"] = blocks, attns
            for _ in range(cfg.blocks_per_level):
                blocks.append(ResBlock(prev, ch, tdim, k, g))
                attns.append(
                    Attention1D(ch, cfg.heads, g)
                    if level in cfg.attention_levels
                    else nn.Identity()
                )
                prev = ch
                skips.append(ch)
            self.down.append(stage)
        self.mid1 = ResBlock(prev, prev, tdim, k, g)
        self.mid_attn = Attention1D(prev, cfg.heads, g)
        self.mid2 = ResBlock(prev, prev, tdim, k, g)
        self.up = nn.ModuleList()
        for level in reversed(range(len(cfg.channels))):
            ch = cfg.channels[level]
            stage = nn.ModuleDict()
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            stage["blocks"], stage["attn"] = blocks, attns
            for _ in range(cfg.blocks_per_level):
                blocks.append(ResBlock(prev + skips.pop(), ch, tdim, k, g))
                attns.append(
                    Attention1D(ch, cfg.heads, g)
                    if level in cfg.attention_levels
                    else nn.Identity()
                )
                prev = ch
            factor = cfg.factors[level]
            stage["upsample"] = (
                nn.Conv1d(prev, prev, k, padding=k // 2) if factor > 1 else nn.Identity()
            )
            self.up.append(stage)
        self.norm_out = nn.GroupNorm(_groups(prev, g), prev)
        self.conv_out = nn.Conv1d(prev, width_in, k, padding=k // 2)

    @property
    def length_multiple(self) -> int:
        return self.config.length_multiple

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must be [B, {self.config.in_channels}, T], got {tuple(x.shape)}")
        if x.shape[-1] % self.length_multiple:
            raise ValueError(
                f"length {x.shape[-1]} must be a multiple of {self.length_multiple} "
                "(frame hop x downsampling)"
            )
        temb = self.time_mlp(timestep_embedding(t, self.config.time_dim).to(x.dtype))
        h = self.conv_in(self.fold.fold(x) if self.fold is not None else x)
        skips = []
        for stage in cast(list[Any], self.down):
            h = stage["downsample"](h)
            for block, attn in zip(stage["blocks"], stage["attn"]):
                h = attn(block(h, temb))
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for level, stage in zip(
            reversed(range(len(self.config.channels))), cast(list[Any], self.up)
        ):
            for block, attn in zip(stage["blocks"], stage["attn"]):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), temb))
            factor = self.config.factors[level]
            if factor > 1:
                h = stage["upsample"](F.interpolate(h, scale_factor=factor, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return self.fold.unfold(out) if self.fold is not None else out
