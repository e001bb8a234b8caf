"""The DiLoCo / partial-update hyper-parameters, validated before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from verger.core.validation import finite_number
from verger.sparse_diloco.compression import SUPPORTED_BITS, Codec

LR_SCALINGS = ("sqrt", "none")
OUTER_SCALINGS = ("none", "sqrt_count")


@dataclass(kw_only=True)
class DiLoCoConfig:
    """Inner AdamW, outer Nesterov SGD (DiLoCo defaults), streaming and compression options.

    ``inner_steps`` is H, the local steps between two syncs of a tensor. With
    ``num_fragments = F > 1`` (Streaming DiLoCo) the parameters are split into F fragments and
    one fragment is synced every H/F inner steps, so each is still synced every H steps.
    ``compression_bits`` (4, 8 or 32) is the wire precision of pseudo-gradients.

    ``partial_lr_scaling``: how a worker that trains a fraction f < 1 of the parameters sets
    its inner learning rate. ``"sqrt"`` (default) uses ``inner_lr / sqrt(f)``: an AdamW step
    moves every trained coordinate by about the learning rate, so the norm of a worker's
    update grows like sqrt(trained coordinates); the rule keeps it equal to a full (DiLoCo)
    worker's. ``"none"`` uses ``inner_lr`` for every worker. DiLoCo (f = 1) is unaffected.

    ``outer_lr_scaling``: ``"sqrt_count"`` scales the outer step of coordinate i by
    sqrt(m[i] / W): an average over m[i] workers' pseudo-gradients is noisier (and less
    shrunk by their disagreement) than DiLoCo's average over W, so coordinates trained by
    fewer workers take proportionally smaller outer steps (default). ``"none"`` applies
    ``outer_lr`` everywhere. DiLoCo (m[i] = W) is unaffected.
    """

    num_workers: int = 4
    inner_steps: int = 500
    inner_lr: float = 4e-4
    inner_weight_decay: float = 0.1
    inner_betas: tuple[float, float] = (0.9, 0.95)
    inner_warmup: int = 0
    grad_clip: float | None = 1.0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    num_fragments: int = 1
    compression_bits: int = 32
    compression_block: int = 256
    partial_lr_scaling: str = "sqrt"
    outer_lr_scaling: str = "sqrt_count"

    def __post_init__(self) -> None:
        _positive_int("num_workers", self.num_workers)
        _positive_int("inner_steps", self.inner_steps)
        _positive_int("num_fragments", self.num_fragments)
        if self.inner_steps % self.num_fragments:
            raise ValueError(
                f"inner_steps={self.inner_steps} must be a multiple of "
                f"num_fragments={self.num_fragments} (one fragment syncs every H/F steps)"
            )
        if not (
            isinstance(self.inner_warmup, int)
            and not isinstance(self.inner_warmup, bool)
            and self.inner_warmup >= 0
        ):
            raise ValueError(f"inner_warmup={self.inner_warmup!r} must be an int >= 0")
        # inf passes range checks such as `x > 0` and a string makes them raise TypeError:
        # every float field is checked to be a finite real number in range
        finite_number("inner_lr", self.inner_lr, above=0)
        finite_number("inner_weight_decay", self.inner_weight_decay, at_least=0)
        betas = self.inner_betas
        if (
            not isinstance(betas, tuple | list)
            or len(betas) != 2
            or not all(finite_number("inner_betas", b, at_least=0) < 1 for b in betas)
        ):
            raise ValueError(f"inner_betas={betas!r} must be two floats in [0, 1)")
        self.inner_betas = (float(betas[0]), float(betas[1]))
        if self.grad_clip is not None:
            finite_number("grad_clip", self.grad_clip, above=0)
        finite_number("outer_lr", self.outer_lr, above=0)
        if not finite_number("outer_momentum", self.outer_momentum, at_least=0) < 1:
            raise ValueError(f"outer_momentum={self.outer_momentum!r} must be in [0, 1)")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov={self.nesterov!r} must be a bool")
        if self.nesterov and self.outer_momentum == 0:
            raise ValueError("nesterov=True needs outer_momentum > 0")
        if self.compression_bits not in SUPPORTED_BITS:
            raise ValueError(
                f"compression_bits={self.compression_bits!r} must be one of {SUPPORTED_BITS}"
            )
        self.codec()  # validates compression_block
        if self.partial_lr_scaling not in LR_SCALINGS:
            raise ValueError(
                f"partial_lr_scaling={self.partial_lr_scaling!r} must be one of {LR_SCALINGS}"
            )
        if self.outer_lr_scaling not in OUTER_SCALINGS:
            raise ValueError(
                f"outer_lr_scaling={self.outer_lr_scaling!r} must be one of {OUTER_SCALINGS}"
            )

    def outer_scale(
        self, counts: torch.Tensor, contributors: int | None = None
    ) -> torch.Tensor | float:
        """Per-coordinate factor on the averaged pseudo-gradient (m[i] = ``counts``).

        ``contributors``: how many workers' pseudo-gradients the outer step averages (a
        fault-tolerant round may have fewer than ``num_workers``); the rule then reads
        sqrt(m[i] / contributors), so a plain DiLoCo round (m[i] = contributors) is unscaled.
        """
        if self.outer_lr_scaling == "none":
            return 1.0
        return (counts / (self.num_workers if contributors is None else contributors)).sqrt()

    def worker_inner_lr(self, trained_fraction: float) -> float:
        """The peak inner learning rate of a worker training ``trained_fraction`` of the model."""
        if not 0 <= trained_fraction <= 1:
            raise ValueError(f"trained_fraction={trained_fraction!r} must be in [0, 1]")
        if self.partial_lr_scaling == "none" or trained_fraction == 0:
            return self.inner_lr
        return self.inner_lr / math.sqrt(trained_fraction)

    def codec(self) -> Codec:
        return Codec(bits=self.compression_bits, block_size=self.compression_block)

    @property
    def sync_interval(self) -> int:
        """Inner steps between two consecutive (fragment) syncs."""
        return self.inner_steps // self.num_fragments


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int")
