"""Patch masking and patch <-> image reshaping, the MAE way (shuffle by noise, keep a prefix).

A per-sample random permutation is drawn by sorting uniform noise; the first ``n_keep`` patches
of the permutation are kept and ``ids_restore`` (the inverse permutation) puts the decoder's
tokens back into image order. Everything is pure tensor indexing, so it runs on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verger.core.validation import positive_int, probability


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """round(N * (1 - r)), at least 1: how many patches the encoder sees.

    ``mask_ratio`` must be in [0, 1): at least one patch stays visible.
    """
    positive_int("num_patches", num_patches)
    ratio = probability("mask_ratio", mask_ratio, open_right=True)
    return max(1, round(num_patches * (1.0 - ratio)))


@dataclass(frozen=True)
class Masking:
    """One masking draw for a batch.

    ``ids_keep`` [B, K] are the kept patch indices (in shuffle order), ``ids_restore`` [B, N]
    inverts the shuffle, and ``mask`` [B, N] is 1.0 on masked (hidden) patches, 0.0 on kept ones,
    in image order.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    *,
    device: torch.device | str = "cpu",
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Masking:
    """Draw a random mask per sample; ``noise`` [B, N] (any real values) makes it deterministic."""
    n_keep = num_kept(num_patches, mask_ratio)
    if noise is None:
        noise = torch.rand(batch, num_patches, generator=generator, device="cpu").to(device)
    elif noise.shape != (batch, num_patches):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected ({batch}, {num_patches})")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :n_keep] = 0.0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D] indexed along N by ids [B, K] -> [B, K, D]."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] in row-major patch order (the ViT conv's order)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, N, p*p*C] -> [B, C, H, W]."""
    b, n, d = patches.shape
    gh, gw = grid
    p = patch_size
    if n != gh * gw or d % (p * p):
        raise ValueError(f"patches {tuple(patches.shape)} do not match grid {grid}, patch {p}")
    c = d // (p * p)
    x = patches.reshape(b, gh, gw, p, p, c)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, c, gh * p, gw * p)
