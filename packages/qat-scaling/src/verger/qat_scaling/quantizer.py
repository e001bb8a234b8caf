"""``WeightFakeQuantizer``: the module that fake-quantizes one weight matrix.

It owns the scales (one per output channel or per group of ``group_size`` inputs), an
``active`` flag kept in the state dict (a resumed run knows whether QAT had started), and
the scale initialization rules. Off, it returns the weight unchanged: the model trains in
full precision, and the scales receive no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from verger.qat_scaling.config import SCALE_DTYPES, QuantConfig
from verger.qat_scaling.ops.fake_quant import (
    Backend,
    LevelSpec,
    codes_from_weights,
    fake_quant,
    level_spec,
)


def init_scale(weight: torch.Tensor, spec: LevelSpec, rule: str, group_size: int) -> torch.Tensor:
    """Scales [rows, cols / group_size] (fp32) for ``weight`` [rows, cols] by ``rule``.

    ``"paretoq"``: max|w| / Qp (lsq), max|w| (seq: the clip range), mean|w| (sign);
    ``"lsq"``: 2 mean|w| / sqrt(Qp); ``"torchao"``: max|w| / ((Qp - Qn) / 2), in this order of
    operations so the result equals torchao's symmetric per-group scale bit for bit.
    """
    rows, cols = weight.shape
    groups = weight.detach().float().reshape(rows, cols // group_size, group_size).abs()
    if rule == "lsq":
        return 2.0 * groups.mean(dim=-1) / float(spec.code_max) ** 0.5
    if rule == "torchao":
        return groups.amax(dim=-1) / (float(spec.code_max - spec.code_min) / 2)
    if spec.scheme == "sign":
        return groups.mean(dim=-1)
    if spec.scheme == "seq":
        return groups.amax(dim=-1)
    return groups.amax(dim=-1) / float(spec.code_max)


class WeightFakeQuantizer(nn.Module):
    """Fake quantization of a ``[rows, cols]`` weight; call it on the weight.

    ``scale`` is a parameter of shape [rows, cols / group_size] (trainable when
    ``config.learned_scale``). Scales are clamped at ``config.eps`` and rounded to
    ``config.scale_dtype`` in the forward pass.
    """

    scale: nn.Parameter
    active: torch.Tensor
    backend: Backend

    def __init__(
        self,
        shape: tuple[int, int],
        config: QuantConfig,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
        rows, cols = shape
        group = config.group_size or cols
        if cols % group:
            raise ValueError(
                f"group_size={config.group_size} does not divide the layer's {cols} inputs"
            )
        self.config = config
        self.spec = level_spec(config.bits, str(config.scheme))
        self.shape = (rows, cols)
        self.group_size = group
        self.grad_scale = self.spec.grad_scale(group, config.lsq_grad_scale)
        self.scale = nn.Parameter(
            torch.ones(rows, cols // group, device=device), requires_grad=config.learned_scale
        )
        self.register_buffer("active", torch.zeros((), dtype=torch.bool, device=device))
        self._enabled = False  # a host copy of `active`: reading the buffer on a GPU syncs
        self.backend = "auto"

    @property
    def enabled(self) -> bool:
        return self._enabled

    def set_enabled(self, enabled: bool) -> None:
        self._enabled = bool(enabled)
        self.active.fill_(self._enabled)

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor) -> None:
        """Set the scales from ``weight`` by ``config.scale_init`` (at least ``eps``)."""
        self._check_weight(weight)
        rule = self.config.scale_init
        self.scale.copy_(
            init_scale(weight, self.spec, rule, self.group_size).clamp_min(self.config.eps)
        )

    def effective_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 scales the forward pass uses (differentiable when learned)."""
        if self.config.learned_scale:
            s = self.scale.clamp_min(self.config.eps)
        else:  # dynamic: recomputed from the current weights, no gradient (torchao's default)
            s = init_scale(weight, self.spec, self.config.scale_init, self.group_size)
            s = s.clamp_min(self.config.eps)
        dtype = SCALE_DTYPES[self.config.scale_dtype]
        return s if dtype == torch.float32 else s.to(dtype).float()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self._enabled:
            return weight
        return fake_quant(
            weight, self.effective_scale(weight), self.spec, self.grad_scale, backend=self.backend
        )

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, scales)``: unsigned integer codes ``k - code_min`` (uint8, [rows, cols])
        and the scales in ``config.scale_dtype``, exactly what the forward pass computes."""
        self._check_weight(weight)
        s = self.effective_scale(weight)
        rows, cols = self.shape
        k = codes_from_weights(weight.reshape(-1, self.group_size), s.reshape(-1, 1), self.spec)
        codes = (k - self.spec.code_min).to(torch.uint8).view(rows, cols)
        return codes, s.to(SCALE_DTYPES[self.config.scale_dtype])

    def _check_weight(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != self.shape:
            raise ValueError(
                f"weight {tuple(weight.shape)} does not match the quantizer's {self.shape}"
            )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._enabled = bool(self.active)

    def extra_repr(self) -> str:
        c = self.config
        group = "channel" if c.group_size is None else f"group={c.group_size}"
        state = "on" if self._enabled else "off"
        return f"bits={c.bits}, scheme={c.scheme}, {group}, {state}"
