"""A small audio classifier: the default embedding for FAD, and the style-guidance classifier.

Nothing may be downloaded, so VGGish/PaSST are replaced by this model trained on the embedded
data, its classes the corpus collections. Log-mel input (gain removed by subtracting each
clip's mean log energy), three 1-D convolutions over time with the mel bands as channels,
mean-and-std pooling, a 64-d embedding (the FAD features) and a linear head. It is
differentiable end to end, so it also serves as a guidance classifier or embedder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from verger.core.files import atomic_directory
from verger.core.progress import progress
from verger.music_guidance.audio import log_mel
from verger.music_guidance.validation import finite_number, integer

__all__ = ["AudioClassifier", "ClassifierConfig", "load_classifier", "train_classifier"]


@dataclass(kw_only=True)
class ClassifierConfig:
    sample_rate: int = 8000
    classes: tuple[str, ...] = ("bach_chorales", "folk_tunes", "palestrina")
    n_mels: int = 48
    n_fft: int = 256
    hop: int = 64
    width: int = 64
    embedding_dim: int = 64

    def __post_init__(self) -> None:
        integer("sample_rate", self.sample_rate, at_least=1000)
        if not isinstance(self.classes, tuple | list) or len(self.classes) < 2:
            raise ValueError(f"classes={self.classes!r} must name at least two classes")
        self.classes = tuple(self.classes)
        for name in ("n_mels", "n_fft", "hop", "width", "embedding_dim"):
            integer(name, getattr(self, name), at_least=1)


class AudioClassifier(nn.Module):
    """``forward(audio [B, C, T]) -> logits [B, K]``; ``embed(audio) -> [B, embedding_dim]``."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = cfg = config
        w = cfg.width
        self.convs = nn.ModuleList(
            [
                nn.Conv1d(cfg.n_mels, w, 5, padding=2),
                nn.Conv1d(w, w + w // 2, 5, padding=2),
                nn.Conv1d(w + w // 2, 2 * w, 3, padding=1),
            ]
        )
        self.proj = nn.Linear(4 * w, cfg.embedding_dim)
        self.head = nn.Linear(cfg.embedding_dim, len(cfg.classes))

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def num_classes(self) -> int:
        return len(self.config.classes)

    def features(self, audio: Tensor) -> Tensor:
        if audio.ndim != 3:
            raise ValueError(f"audio must be [B, C, T], got {tuple(audio.shape)}")
        cfg = self.config
        mel = log_mel(
            audio.mean(1), cfg.sample_rate, n_fft=cfg.n_fft, hop=cfg.hop, n_mels=cfg.n_mels
        )
        h = mel - mel.mean(dim=(1, 2), keepdim=True)  # gain-invariant
        for i, conv in enumerate(self.convs):
            h = F.gelu(conv(h))
            if i < len(self.convs) - 1:
                h = F.avg_pool1d(h, 2, ceil_mode=True)
        pooled = torch.cat([h.mean(-1), h.std(-1)], dim=-1)
        return F.gelu(self.proj(pooled))

    def embed(self, audio: Tensor) -> Tensor:
        """The FAD embedding: the layer before the class head."""
        return self.features(audio)

    def forward(self, audio: Tensor) -> Tensor:
        return self.head(self.features(audio))

    def probabilities(self, audio: Tensor, *, batch_size: int = 64) -> Tensor:
        """Softmax class probabilities, computed in batches without gradients."""
        with torch.no_grad():
            return torch.cat(
                [
                    self(audio[i : i + batch_size]).softmax(-1)
                    for i in range(0, len(audio), batch_size)
                ]
            )

    def save_pretrained(self, directory: str | Path) -> Path:
        target = Path(directory)
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
            save_model(self, str(tmp / "model.safetensors"))
        return target


def load_classifier(
    directory: str | Path, *, device: str | torch.device = "cpu"
) -> AudioClassifier:
    """Load a classifier written by :meth:`AudioClassifier.save_pretrained`."""
    folder = Path(directory)
    for path in (folder / "config.json", folder / "model.safetensors"):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a saved AudioClassifier folder")
    data: dict[str, Any] = json.loads((folder / "config.json").read_text())
    model = AudioClassifier(ClassifierConfig(**data))
    load_model(model, str(folder / "model.safetensors"), device=str(device))
    return model.to(device).eval()


def train_classifier(
    audio: Tensor,
    labels: Tensor,
    config: ClassifierConfig,
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    noise_augment: float = 0.5,
    show_progress: bool | None = None,
) -> AudioClassifier:
    """Train on clips ``[N, C, T]`` with random gain, circular shift and additive noise.

    ``noise_augment``: with probability 1/2 a clip is mixed with Gaussian noise at a random
    level up to this fraction of its RMS, so the classifier also answers sensibly on the
    partially denoised estimates that guidance feeds it.
    """
    integer("steps", steps, at_least=1)
    integer("batch_size", batch_size, at_least=1)
    finite_number("lr", lr, above=0)
    if audio.shape[0] != labels.shape[0] or audio.shape[0] == 0:
        raise ValueError(
            f"audio ({audio.shape[0]}) and labels ({labels.shape[0]}) must be equal, non-empty"
        )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AudioClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in progress(range(steps), desc="train classifier", enabled=show_progress):
        idx = torch.randint(0, audio.shape[0], (batch_size,), generator=gen)
        x = audio[idx]
        shift = int(torch.randint(0, x.shape[-1], (), generator=gen))
        x = torch.roll(x, shift, dims=-1) * torch.empty(batch_size, 1, 1).uniform_(
            0.3, 1.5, generator=gen
        )
        rms = x.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
        level = torch.rand(batch_size, 1, 1, generator=gen) * noise_augment
        level = level * (torch.rand(batch_size, 1, 1, generator=gen) < 0.5)
        x = x + level * rms * torch.randn(x.shape, generator=gen)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()
