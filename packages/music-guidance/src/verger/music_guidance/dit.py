"""The latent denoiser: a diffusion transformer over latent frames (adaLN-zero, rotary).

The paper's latent model is a 1B DiT (32 layers, width 1536, relative positions). Here each
latent frame is a token; the noise level modulates every block through adaptive LayerNorm
(shift, scale, and a gate initialised at zero so each block starts as the identity), and
positions enter as rotary embeddings (relative by construction), from verger-core.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from verger.core.nn import RotaryEmbedding, SwiGLU
from verger.music_guidance.unet import timestep_embedding
from verger.music_guidance.validation import finite_number, integer

__all__ = ["DiT1D", "DiTConfig"]


@dataclass(kw_only=True)
class DiTConfig:
    in_channels: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    time_dim: int = 128
    max_len: int = 4096

    def __post_init__(self) -> None:
        for name, low in (
            ("in_channels", 1),
            ("width", 2),
            ("depth", 1),
            ("heads", 1),
            ("time_dim", 2),
            ("max_len", 1),
        ):
            integer(name, getattr(self, name), at_least=low)
        finite_number("mlp_ratio", self.mlp_ratio, above=0)
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(
                f"width={self.width} must split into heads={self.heads} of even size (rotary)"
            )
        if self.time_dim % 2:
            raise ValueError(f"time_dim={self.time_dim} must be even")

    @property
    def length_multiple(self) -> int:
        return 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiTConfig:
        return cls(**data)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:]) * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.mlp = SwiGLU(cfg.width, max(1, round(cfg.mlp_ratio * cfg.width)), fused=False)
        self.ada = nn.Linear(cfg.time_dim, 6 * cfg.width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, temb: Tensor, rotary: RotaryEmbedding) -> Tensor:
        B, N, D = x.shape
        s1, c1, g1, s2, c2, g2 = self.ada(temb).chunk(6, dim=-1)
        q, k, v = (
            self.qkv(_modulate(x, s1, c1)).view(B, N, 3, self.heads, D // self.heads).unbind(2)
        )
        q, k = rotary(q), rotary(k)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        x = x + g1[:, None] * self.proj(att.transpose(1, 2).reshape(B, N, D))
        return x + g2[:, None] * self.mlp(_modulate(x, s2, c2))


class DiT1D(nn.Module):
    """``forward(z [B, C, N], t [B]) -> v [B, C, N]``."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.inp = nn.Linear(cfg.in_channels, cfg.width)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim)
        )
        self.rotary = RotaryEmbedding(cfg.width // cfg.heads, cfg.max_len, fused=False)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_ada = nn.Linear(cfg.time_dim, 2 * cfg.width)
        self.out = nn.Linear(cfg.width, cfg.in_channels)
        nn.init.zeros_(self.final_ada.weight)
        nn.init.zeros_(self.final_ada.bias)

    @property
    def length_multiple(self) -> int:
        return 1

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        if z.ndim != 3 or z.shape[1] != self.config.in_channels:
            raise ValueError(f"z must be [B, {self.config.in_channels}, N], got {tuple(z.shape)}")
        temb = F.silu(self.time_mlp(timestep_embedding(t, self.config.time_dim).to(z.dtype)))
        x = self.inp(z.transpose(1, 2))
        for block in self.blocks:
            x = block(x, temb, self.rotary)
        shift, scale = self.final_ada(temb).chunk(2, dim=-1)
        return self.out(_modulate(x, shift, scale)).transpose(1, 2)
