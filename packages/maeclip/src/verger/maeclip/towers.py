"""open_clip towers, configs and tokenizer, created offline.

The package's tiny configs (``maeclip-tiny``, ``maeclip-micro``: 32x32 and 16x16 images, patch 4)
ship as JSON beside this module and are registered with open_clip's ``add_model_config``, so
``open_clip.create_model("maeclip-tiny")`` works like any built-in name. Standard names
(``ViT-B-16``...) come from open_clip itself. Weights are never downloaded: models are created
with ``pretrained=None`` and the tokenizer is open_clip's ``SimpleTokenizer`` with the BPE
vocabulary bundled in its wheel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import VisionTransformer

from verger.core.validation import describe, integer

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = ("maeclip-tiny", "maeclip-micro")


def register_model_configs() -> None:
    """Make the bundled tiny configs known to open_clip (idempotent)."""
    if not all(name in open_clip.list_models() for name in TINY_MODELS):
        open_clip.add_model_config(CONFIG_DIR)


def model_config(model_name: str) -> dict:
    """The open_clip config dict of ``model_name``; ValueError lists close names if unknown."""
    register_model_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        names = open_clip.list_models()
        close = [n for n in names if model_name.lower()[:4] in n.lower()][:8] or names[:8]
        raise ValueError(f"model_name={model_name!r} is not an open_clip config; e.g. {close}")
    return config


def check_model_name(model_name: str) -> dict:
    """``model_config(model_name)``, refusing towers this package cannot mask.

    HF/timm towers need a download; a ResNet has no patches; attentional pooling is not
    handled by the masked encoder pass. Checked on the config, so without building a model.
    """
    config = model_config(model_name)
    if "hf_model_name" in config.get("text_cfg", {}) or "timm_model_name" in config.get(
        "vision_cfg", {}
    ):
        raise ValueError(
            f"model_name={model_name!r} uses an HF or timm tower; only open_clip's own ViT and "
            "text transformer are supported (they need no download)"
        )
    vision = config.get("vision_cfg", {})
    if isinstance(vision.get("layers"), list | tuple):  # open_clip's ModifiedResNet
        raise ValueError(f"model_name={model_name!r}: the image tower is not a ViT")
    if vision.get("attentional_pool"):
        raise ValueError(f"model_name={model_name!r}: attentional pooling is not supported")
    return config


def image_size(model_name: str) -> int:
    """The side of the square images ``model_name``'s image tower takes (32 for maeclip-tiny)."""
    size = model_config(model_name)["vision_cfg"]["image_size"]
    return int(size if isinstance(size, int) else size[0])


def create_clip(model_name: str, *, device: str | torch.device = "cpu") -> open_clip.CLIP:
    """A randomly initialised open_clip ``CLIP`` with a ViT image tower (never downloads)."""
    check_model_name(model_name)
    # open_clip warns on the root logger that no weights were loaded: that is the point here
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(
            model_name, pretrained=None, device=device, pretrained_text=False, output_dict=True
        )
    finally:
        logging.disable(previous)
    if not isinstance(model.visual, VisionTransformer):
        raise ValueError(f"model_name={model_name!r}: the image tower is not a ViT")
    if model.visual.attn_pool is not None:
        raise ValueError(f"model_name={model_name!r}: attentional pooling is not supported")
    return model


class CaptionTokenizer:
    """open_clip's ``SimpleTokenizer`` at the model's context length, refusing empty captions."""

    def __init__(self, context_length: int = 77) -> None:
        # start, end and at least one word
        self.context_length = integer("context_length", context_length, at_least=3)
        self._tok = SimpleTokenizer(context_length=context_length)
        self.vocab_size = len(self._tok.encoder)

    @classmethod
    def for_model(cls, model_name: str) -> CaptionTokenizer:
        """The tokenizer matching ``model_name``'s text config."""
        return cls(model_config(model_name)["text_cfg"].get("context_length", 77))

    def __call__(self, captions: str | Sequence[str]) -> torch.Tensor:
        """Captions -> LongTensor [B, context_length] (truncated with EOT kept)."""
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, Sequence):
            raise TypeError(
                f"captions must be a string or a list of strings, got {describe(captions)}"
            )
        if not captions:
            raise ValueError("captions is empty: pass at least one caption")
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"captions[{i}] is {type(caption).__name__}, expected str")
            if not caption.strip():
                raise ValueError(f"captions[{i}] is empty; every image needs a non-empty caption")
        return self._tok(list(captions))

    def decode(self, tokens: Sequence[int]) -> str:
        """Token ids -> text (special tokens and padding removed)."""
        ids = [int(t) for t in tokens if int(t) not in (0, self._tok.sot_token_id)]
        ids = ids[: ids.index(self._tok.eot_token_id)] if self._tok.eot_token_id in ids else ids
        return self._tok.decode(ids).strip()
