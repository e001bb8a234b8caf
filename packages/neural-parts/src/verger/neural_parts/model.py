"""The Neural Parts model: encoder, per-primitive embeddings and a primitive family.

``cond = model(inputs)`` gives the conditions C_m = [F; z_m] ``[B, M, D]``; everything else
is a function of them: ``model.surface(cond, directions)`` (points on every primitive),
``model.implicit(cond, x)`` (g_m at query points, ``[B, Q, M]``), ``model.union(cond, x)``
(G = min_m g_m), ``model.occupancy(cond, x)`` (G <= 0) and ``model.part_occupancy``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from verger.core.files import atomic_path, atomic_write_text
from verger.neural_parts.checks import points
from verger.neural_parts.config import ModelConfig
from verger.neural_parts.encoders import RunningStandardize, build_encoder
from verger.neural_parts.primitives import build_family


class NeuralParts(nn.Module):
    """A shape as the union of ``config.n_primitives`` primitives conditioned on its encoding.

    With ``config.primitive="superquadric"`` the same encoder and embeddings drive the
    superquadric baseline, so both methods differ only in the primitive family.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = build_encoder(config)
        # Unit-scale features next to embeddings of unit-scale entries. "running" standardises
        # across shapes (see RunningStandardize: the input dependence is O(1) from the start);
        # "layer" only rescales each shape's feature, leaving F nearly the same for all inputs.
        self.feature_norm: nn.Module = (
            RunningStandardize(config.feature_dim)
            if config.feature_norm == "running"
            else nn.LayerNorm(config.feature_dim)
        )
        self.embeddings = nn.Embedding(config.n_primitives, config.embedding_dim)
        self.primitives = build_family(config)

    @property
    def n_primitives(self) -> int:
        return self.config.n_primitives

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Encoder input (a batch) -> conditions ``[B, M, feature_dim + embedding_dim]``."""
        feature = self.feature_norm(self.encoder(inputs))
        b, m = feature.shape[0], self.n_primitives
        z = self.embeddings.weight.unsqueeze(0).expand(b, -1, -1)
        return torch.cat([feature.unsqueeze(1).expand(-1, m, -1), z], dim=-1)

    def _check_cond(self, cond: torch.Tensor) -> None:
        want = (self.n_primitives, self.config.condition_dim)
        if cond.dim() != 3 or tuple(cond.shape[1:]) != want:
            raise ValueError(
                f"cond must have shape [B, {want[0]}, {want[1]}], got {list(cond.shape)}"
            )

    def surface(self, cond: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Unit sphere ``directions`` ``[N, 3]`` -> points on every primitive ``[B, M, N, 3]``."""
        self._check_cond(cond)
        points("directions", directions)
        return self.primitives.surface(cond, directions)

    def implicit(
        self, cond: torch.Tensor, x: torch.Tensor, *, scaled: bool = False
    ) -> torch.Tensor:
        """Every primitive's implicit value at ``x [B, Q, 3]``: ``[B, Q, M]`` (< 0 inside).

        ``scaled=True``: each part's value in approximately Euclidean units (the INN's
        sphere-space value divided by its map's local scale; see ``INNPrimitives.implicit``).
        The sign, hence occupancy, is the same either way.
        """
        self._check_cond(cond)
        points("x", x, batched=True)
        if x.shape[0] != cond.shape[0]:
            raise ValueError(f"x has batch {x.shape[0]} but cond has batch {cond.shape[0]}")
        return self.primitives.implicit(cond, x, scaled=scaled)

    def union(self, cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """G(x) = min_m g_m(x), ``[B, Q]``."""
        return self.implicit(cond, x).min(dim=-1).values

    @torch.no_grad()
    def occupancy(self, cond: torch.Tensor, x: torch.Tensor, *, chunk: int = 65536) -> torch.Tensor:
        """Inside (G <= 0) as a bool ``[B, Q]``, evaluated ``chunk`` points at a time."""
        return self.part_occupancy(cond, x, chunk=chunk).any(dim=-1)

    @torch.no_grad()
    def part_occupancy(
        self, cond: torch.Tensor, x: torch.Tensor, *, chunk: int = 65536
    ) -> torch.Tensor:
        """Inside each part (g_m <= 0) as a bool ``[B, Q, M]``, ``chunk`` points at a time."""
        return torch.cat([self.implicit(cond, c) <= 0 for c in x.split(chunk, dim=1)], dim=1)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, folder: str | Path) -> Path:
        """``folder/config.json`` + ``folder/model.safetensors`` (each written atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "model.safetensors") as tmp:
            save_model(self, str(tmp))
        atomic_write_text(folder / "config.json", json.dumps(self.config.to_dict(), indent=2))
        return folder

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: str | torch.device = "cpu"
    ) -> NeuralParts:
        """Load what :meth:`save_pretrained` wrote; a missing or bad file is named."""
        folder = Path(folder)
        config_path, weights = folder / "config.json", folder / "model.safetensors"
        for path in (config_path, weights):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: not a saved NeuralParts model folder")
        try:
            config = ModelConfig.from_dict(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{config_path} is not a valid model config: {exc}") from None
        model = cls(config)
        try:
            load_model(model, str(weights), strict=True, device=str(device))
        except Exception as exc:
            raise ValueError(f"{weights} does not load into {config}: {exc}") from None
        return model.to(device)
