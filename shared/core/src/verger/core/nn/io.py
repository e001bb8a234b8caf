"""``save_pretrained`` / ``from_pretrained``: ``config.json`` + ``model.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from safetensors.torch import load_file, save

from verger.core.files import atomic_write_bytes, atomic_write_text
from verger.core.nn.config import TransformerConfig

if TYPE_CHECKING:
    from verger.core.nn.model import TransformerLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_TIED = "lm_head.weight"
M = TypeVar("M", bound="TransformerLM")


def save_pretrained(model: TransformerLM, directory: str | Path) -> Path:
    """Write the config and the weights (a tied ``lm_head`` is stored once); returns the dir.

    Each file is written to a temporary sibling and renamed, so a crash leaves the previous
    files intact. Weights go first: a directory whose config.json is new has new weights.
    """
    out = Path(directory)
    try:
        config_text = json.dumps(model.config.to_dict(), indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"save_pretrained: the config is not JSON-serializable (check attention_options): {exc}"
        ) from exc
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop(_TIED, None)
    meta = {"format": "pt", "library": "verger.core", "class": type(model).__name__}
    atomic_write_bytes(out / WEIGHTS_NAME, save(state, metadata=meta))
    atomic_write_text(out / CONFIG_NAME, config_text + "\n")
    return out


def load_pretrained(cls: type[M], directory: str | Path, *, device: str | torch.device) -> M:
    """Build ``cls(config)`` from ``directory`` and load the weights strictly."""
    src = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (src / name).is_file():
            raise FileNotFoundError(f"from_pretrained: {src / name} does not exist")
    config = TransformerConfig.from_dict(json.loads((src / CONFIG_NAME).read_text()))
    model = cls(config)
    state = load_file(src / WEIGHTS_NAME, device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {_TIED} if config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise ValueError(
            f"from_pretrained: weights in {src} do not match the config: missing "
            f"{sorted(set(missing) - allowed_missing)}, unexpected {sorted(unexpected)}"
        )
    return model.to(device)
