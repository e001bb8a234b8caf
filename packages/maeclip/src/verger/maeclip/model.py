"""MAE + CLIP on an open_clip model: one shared ViT encoder, a light MAE decoder, two losses.

``loss = clip_weight * ClipLoss(image, text) + mae_weight * MAE(masked patches)``.

* MAE branch: the encoder sees a random ``1 - mask_ratio`` of the patches (plus the class
  token); a small transformer decoder fills the rest with a learned mask token at fixed 2D
  sin-cos positions and predicts each patch's pixels; the loss is the mean squared error on the
  *masked* patches only, against per-patch normalised pixels (MAE's ``norm_pix_loss``).
* CLIP branch: open_clip's ``ClipLoss`` (which gathers features across ranks) on the image
  features of either the *full* image (a second encoder pass, SLIP-style) or a *masked* image
  (FLIP-style patch dropout; when its ratio equals ``mask_ratio`` the MAE pass is reused, so the
  two objectives cost one encoder pass).

``clip_weight=0`` gives plain MAE (the text tower is idle), ``mae_weight=0`` plain CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.pos_embed import get_2d_sincos_pos_embed_from_grid
from open_clip.transformer import Transformer
from torch import nn

from verger.core.validation import (
    FLOAT_DTYPES,
    check_dtype,
    describe,
    finite_number,
    integer,
    one_of,
    probability,
)
from verger.maeclip.masking import Masking, gather_tokens, patchify, random_masking
from verger.maeclip.towers import create_clip

#: Token ids: what open_clip's tokenizer returns (int64) and what embeddings take.
TOKEN_DTYPES = (torch.int64, torch.int32)

METHODS = ("clip", "mae", "maeclip")


@dataclass(kw_only=True)
class MAECLIPConfig:
    """What to train: the open_clip model and the combined objective.

    ``contrastive_mask_ratio=None`` means "same as ``mask_ratio``" (one shared encoder pass)
    when ``contrastive_input="masked"``; it is ignored for ``"full"``.
    """

    model_name: str = "maeclip-tiny"
    clip_weight: float = 1.0
    mae_weight: float = 1.0
    mask_ratio: float = 0.75
    contrastive_input: Literal["full", "masked"] = "full"
    contrastive_mask_ratio: float | None = None
    decoder_width: int = 64
    decoder_depth: int = 2
    decoder_head_width: int = 32
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        for name in ("clip_weight", "mae_weight"):
            finite_number(name, getattr(self, name), at_least=0)
        if self.clip_weight == 0 and self.mae_weight == 0:
            raise ValueError("clip_weight and mae_weight are both 0: nothing to train")
        probability("mask_ratio", self.mask_ratio, open_right=True)
        if self.mae_weight > 0 and self.mask_ratio == 0:
            # with nothing hidden the MAE loss (masked patches only) would be empty
            raise ValueError(
                "mask_ratio=0 with mae_weight > 0: MAE needs hidden patches to reconstruct; "
                "use a mask_ratio in (0, 1) or mae_weight=0"
            )
        one_of("contrastive_input", self.contrastive_input, ("full", "masked"))
        if self.contrastive_mask_ratio is not None:
            probability("contrastive_mask_ratio", self.contrastive_mask_ratio, open_right=True)
        integer("decoder_width", self.decoder_width, at_least=4)
        integer("decoder_depth", self.decoder_depth, at_least=1)
        integer("decoder_head_width", self.decoder_head_width, at_least=1)
        if self.decoder_width % 4:
            # the 2D sin-cos position table splits the width into 4 equal parts
            raise ValueError(
                f"decoder_width={self.decoder_width!r} must be a positive multiple of 4"
            )
        if self.decoder_width % self.decoder_head_width:
            raise ValueError(
                f"decoder_head_width={self.decoder_head_width!r} must divide "
                f"decoder_width={self.decoder_width}"
            )

    @property
    def method(self) -> str:
        """'clip', 'mae' or 'maeclip', from which weights are non-zero."""
        if self.mae_weight == 0:
            return "clip"
        return "mae" if self.clip_weight == 0 else "maeclip"

    @property
    def effective_contrastive_mask_ratio(self) -> float:
        """The fraction of patches the contrastive branch drops (0 for the full image)."""
        if self.contrastive_input == "full":
            return 0.0
        return (
            self.mask_ratio if self.contrastive_mask_ratio is None else self.contrastive_mask_ratio
        )

    def for_method(self, method: str) -> MAECLIPConfig:
        """A copy set up as plain CLIP, plain MAE, or MAE+CLIP (weights 1 where active)."""
        if method not in METHODS:
            raise ValueError(f"method={method!r} must be one of {METHODS}")
        weights = {"clip": (1.0, 0.0), "mae": (0.0, 1.0), "maeclip": (1.0, 1.0)}[method]
        return replace(self, clip_weight=weights[0], mae_weight=weights[1])


def _sincos_2d(width: int, grid: tuple[int, int]) -> torch.Tensor:
    gh, gw = grid
    mesh = np.stack(np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32)))
    table = get_2d_sincos_pos_embed_from_grid(width, mesh.reshape(2, 1, gh, gw))
    return torch.from_numpy(table).float().unsqueeze(0)  # [1, N, width]


class MAEDecoder(nn.Module):
    """Kept-patch encoder tokens + mask tokens -> per-patch pixel predictions [B, N, p*p*C]."""

    def __init__(
        self,
        *,
        encoder_width: int,
        grid: tuple[int, int],
        patch_dim: int,
        width: int,
        depth: int,
        head_width: int,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos", _sincos_2d(width, grid), persistent=False)
        self.transformer = Transformer(width, depth, width // head_width, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, kept: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """kept [B, K, We] (patch tokens in shuffle order), ids_restore [B, N] -> [B, N, D]."""
        x = self.embed(kept)
        b, k, w = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - k, w)], dim=1)
        pos: torch.Tensor = self.pos  # type: ignore[assignment]
        x = gather_tokens(x, ids_restore) + pos.to(x.dtype)
        return self.head(self.norm(self.transformer(x)))


@dataclass
class MAECLIPOutput:
    """One forward pass: the total loss, its parts (None when inactive) and the features."""

    loss: torch.Tensor
    clip_loss: torch.Tensor | None
    mae_loss: torch.Tensor | None
    image_features: torch.Tensor | None
    text_features: torch.Tensor | None
    pred: torch.Tensor | None
    mask: torch.Tensor | None


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix: bool = True
) -> torch.Tensor:
    """Mean squared error per patch, averaged over the patches where ``mask == 1`` only."""
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


class MAECLIP(nn.Module):
    """An open_clip CLIP model plus an MAE decoder; ``forward(images, texts)`` gives the loss."""

    def __init__(self, config: MAECLIPConfig, clip: open_clip.CLIP | None = None) -> None:
        super().__init__()
        self.config = config
        self.clip = clip if clip is not None else create_clip(config.model_name)
        visual = self.clip.visual
        self.patch_size = int(visual.patch_size[0])
        self.image_size = tuple(int(s) for s in visual.image_size)
        self.grid = tuple(int(g) for g in visual.grid_size)
        if any(size % self.patch_size for size in self.image_size):
            raise ValueError(
                f"model {config.model_name!r}: image size {self.image_size} is not divisible by "
                f"the patch size {self.patch_size}"
            )
        self.decoder = MAEDecoder(
            encoder_width=visual.conv1.out_channels,
            grid=self.grid,  # type: ignore[arg-type]
            patch_dim=self.patch_size**2 * visual.conv1.in_channels,
            width=config.decoder_width,
            depth=config.decoder_depth,
            head_width=config.decoder_head_width,
        )
        self._clip_loss: tuple[tuple[int, int], nn.Module] | None = None

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def context_length(self) -> int:
        """Tokens per caption the text tower takes (``CaptionTokenizer.for_model`` pads to it)."""
        return int(self.clip.context_length)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the text tower embeds."""
        return int(self.clip.token_embedding.num_embeddings)

    def _device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` cast to the model's dtype once it is a float [B, C, H, W] batch at the
        model's size and device (normalised pixels, as the data module produces); else a
        ``TypeError``/``ValueError`` naming ``images`` and what is allowed."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a float tensor [B, 3, H, W], got {describe(images)}")
        try:
            check_dtype("images", images, FLOAT_DTYPES)
        except TypeError as err:
            raise TypeError(
                f"{err} (scale pixels to [0, 1] and normalise them first: "
                "verger.maeclip.data.normalize_images)"
            ) from None
        if images.ndim != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor, got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images holds a batch of 0: pass at least one image")
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        if (h, w) != self.image_size:
            raise ValueError(f"image size {h}x{w} differs from the model's {self.image_size}")
        conv = self.clip.visual.conv1
        if images.shape[1] != conv.in_channels:
            raise ValueError(f"images have {images.shape[1]} channels, expected {conv.in_channels}")
        if images.device != conv.weight.device:
            raise ValueError(
                f"images are on {images.device} but the model is on {conv.weight.device}"
            )
        return images.to(conv.weight.dtype)

    def check_texts(self, texts: torch.Tensor) -> torch.Tensor:
        """``texts`` once it is a [B, context_length] tensor of token ids in the vocabulary on
        the model's device; else a ``TypeError``/``ValueError`` naming ``texts``."""
        if not isinstance(texts, torch.Tensor):
            hint = (
                " (captions as strings: tokenize them with CaptionTokenizer.for_model(...))"
                if isinstance(texts, list | tuple | str)
                else ""
            )
            raise TypeError(
                f"texts must be a tensor of token ids [B, {self.context_length}], got "
                f"{describe(texts)}{hint}"
            )
        check_dtype("texts", texts, TOKEN_DTYPES)
        if texts.ndim != 2 or texts.shape[1] != self.context_length:
            raise ValueError(
                f"texts has shape {tuple(texts.shape)}; expected [B, {self.context_length}] "
                "(the model's context_length: CaptionTokenizer.for_model pads and truncates)"
            )
        if texts.shape[0] == 0:
            raise ValueError("texts holds a batch of 0: pass at least one caption")
        if texts.device != self._device():
            raise ValueError(f"texts are on {texts.device} but the model is on {self._device()}")
        low, high = (int(v) for v in torch.aminmax(texts))  # one device sync, not two
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"texts holds token id {bad}, outside the vocabulary [0, {self.vocab_size})"
            )
        return texts

    def encode_image(
        self,
        images: torch.Tensor,
        *,
        mask_ratio: float = 0.0,
        noise: torch.Tensor | None = None,
        normalize: bool = False,
        project: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, Masking | None]:
        """Run the open_clip ViT on the kept patches only.

        Returns (pooled features [B, E] (projected unless ``project=False``, then [B, W]),
        final patch tokens [B, K, W], masking or None). With ``mask_ratio=0`` this is exactly
        ``clip.visual(images)``.
        """
        images = self.check_images(images)
        # a negative or NaN ratio would silently mean "no mask"
        probability("mask_ratio", mask_ratio, open_right=True)
        v = self.clip.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)  # [B, N, W]
        pos = v.positional_embedding.to(x.dtype)
        x = x + pos[1:]
        masking = None
        if mask_ratio > 0:
            masking = random_masking(
                x.shape[0], x.shape[1], mask_ratio, device=x.device, noise=noise
            )
            x = gather_tokens(x, masking.ids_keep)
        cls = (v.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], dim=1))
        x = v.transformer(x)
        pooled, tokens = v._pool(x)
        if project and v.proj is not None:
            pooled = pooled @ v.proj
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        return pooled, tokens, masking

    def encode_text(self, texts: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
        """open_clip's text tower on token ids [B, L]."""
        return self.clip.encode_text(self.check_texts(texts), normalize=normalize)

    def contrastive_loss(
        self, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> torch.Tensor:
        """open_clip ``ClipLoss`` on normalised features; gathers across ranks when distributed."""
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        if self._clip_loss is None or self._clip_loss[0] != (rank, world):
            loss = open_clip.ClipLoss(rank=rank, world_size=world, gather_with_grad=True)
            self._clip_loss = ((rank, world), loss)
        return self._clip_loss[1](image_features, text_features, self.clip.logit_scale.exp())

    def forward(
        self,
        images: torch.Tensor,
        texts: torch.Tensor | None = None,
        *,
        noise: torch.Tensor | None = None,
    ) -> MAECLIPOutput:
        """Compute the configured objective. ``noise`` [B, N] fixes the MAE mask (tests)."""
        cfg = self.config
        images = self.check_images(images)
        if cfg.clip_weight > 0 and texts is None:
            raise ValueError("texts are required when clip_weight > 0")
        if texts is not None:
            texts = self.check_texts(texts)
            if texts.shape[0] != images.shape[0]:
                raise ValueError(f"{texts.shape[0]} captions for {images.shape[0]} images")
        zero = images.new_zeros(())
        loss, clip_l, mae_l = zero, None, None
        img_f = txt_f = pred = mask = None
        masked_pooled = None
        if cfg.mae_weight > 0:
            masked_pooled, tokens, masking = self.encode_image(
                images, mask_ratio=cfg.mask_ratio, noise=noise
            )
            assert masking is not None
            pred = self.decoder(tokens, masking.ids_restore)
            mask = masking.mask
            mae_l = mae_loss(
                pred, patchify(images, self.patch_size), mask, norm_pix=cfg.norm_pix_loss
            )
            loss = loss + cfg.mae_weight * mae_l
        if cfg.clip_weight > 0:
            assert texts is not None
            ratio = cfg.effective_contrastive_mask_ratio
            if masked_pooled is not None and ratio == cfg.mask_ratio:
                img_f = masked_pooled  # FLIP + MAE share one encoder pass
            else:
                img_f = self.encode_image(images, mask_ratio=ratio)[0]
            img_f = F.normalize(img_f, dim=-1)
            txt_f = self.clip.encode_text(texts, normalize=True)  # checked above
            clip_l = self.contrastive_loss(img_f, txt_f)
            loss = loss + cfg.clip_weight * clip_l
        return MAECLIPOutput(loss, clip_l, mae_l, img_f, txt_f, pred, mask)

    @torch.no_grad()
    def clamp_logit_scale(self, max_value: float = 100.0) -> None:
        """Keep exp(logit_scale) <= max_value, as open_clip's training loop does."""
        self.clip.logit_scale.clamp_(0, float(np.log(max_value)))


def build_model(config: MAECLIPConfig, *, device: str | torch.device = "cpu") -> MAECLIP:
    """``MAECLIP(config)`` on ``device``."""
    return MAECLIP(config, create_clip(config.model_name, device=device)).to(device)
