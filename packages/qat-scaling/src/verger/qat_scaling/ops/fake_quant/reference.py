"""Weight fake quantization, the specification (pure torch, fp32 math, no Triton).

A weight matrix ``w`` [rows, cols] is cut into groups of ``g`` consecutive columns; each
group has one positive scale ``s`` (``s`` is [rows, cols / g]). With ``v = w * (1 / s)``:

- ``lsq`` (LSQ, Esser et al. 2020): code ``k = clamp(round(v), Qn, Qp)``, level ``k``;
  Qn = -2^(B-1), Qp = 2^(B-1) - 1.
- ``seq`` (ParetoQ's stretched elastic quantization): ``k = round(clamp(v, -c, c) * n - t)``,
  level ``(k + t) / n``, c = 0.99; 2 bits: n = 2, t = 1/2 (levels +-1/4, +-3/4);
  ternary: n = 3/2, t = 0 (levels 0, +-2/3). ``s`` is the clip range alpha.
- ``sign``: ``k = [w >= 0]``, level ``2k - 1`` (zero maps to +1, so exactly two levels).

The fake-quantized weight is ``level(k) * s``. ``round`` is round-half-to-even
(``torch.round``). Gradients (straight-through, as LSQ / ParetoQ):

- ``dL/dw = dL/dout * [lo <= v <= hi]``: [Qn, Qp] for lsq, [-c, c] for seq, [-1, 1] for sign.
- ``dL/ds = gscale * sum_group dL/dout * r``, with ``r = level - v`` inside the range and
  ``r = level`` outside (the clipped level), except sign, where ``r = level`` everywhere
  (ParetoQ's 1-bit rule: the exact derivative of ``sign(w) * s``).
  ``gscale = 1 / sqrt(g * Qp)`` (LSQ's gradient scaling; Qp = 1 for seq and sign) or 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SEQ_CLIP = 0.99  # ParetoQ's clip: keeps clamp(v) * n - t off the rounding boundary at +-c


@dataclass(frozen=True)
class LevelSpec:
    """The integer codes of one quantizer and how they map to levels (times the scale)."""

    scheme: str  # "lsq" | "seq" | "sign"
    code_min: int
    code_max: int
    n_levels: float = 1.0  # seq: codes per unit of the clip range
    shift: float = 0.0  # seq: half-step offset (no zero level at 2 bits)
    lo: float = -1.0  # the straight-through range of v = w / s
    hi: float = 1.0
    grad_qp: float = 1.0  # Qp in LSQ's gradient scale

    @property
    def num_codes(self) -> int:
        return self.code_max - self.code_min + 1

    def levels(self) -> torch.Tensor:
        """Every level a weight can take, ascending, in units of the scale (fp32)."""
        k = torch.arange(self.code_min, self.code_max + 1, dtype=torch.float32)
        return level_of_codes(k, self)

    def grad_scale(self, group_size: int, enabled: bool = True) -> float:
        """LSQ's 1 / sqrt(n Qp) for ``group_size`` weights per scale (1 when disabled)."""
        return 1.0 / math.sqrt(group_size * self.grad_qp) if enabled else 1.0


def level_spec(bits: int | str, scheme: str) -> LevelSpec:
    """The :class:`LevelSpec` of ``scheme`` at ``bits`` (validated by ``QuantConfig``)."""
    if scheme == "lsq":
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"lsq supports 2..8 bits, got {bits!r}")
        qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return LevelSpec("lsq", qn, qp, lo=float(qn), hi=float(qp), grad_qp=float(qp))
    if scheme == "seq":
        if bits == 2:
            return LevelSpec("seq", -2, 1, n_levels=2.0, shift=0.5, lo=-SEQ_CLIP, hi=SEQ_CLIP)
        if bits == "ternary":
            return LevelSpec("seq", -1, 1, n_levels=1.5, shift=0.0, lo=-SEQ_CLIP, hi=SEQ_CLIP)
        raise ValueError(f"seq supports 2 bits and 'ternary', got {bits!r}")
    if scheme == "sign":
        if bits != 1:
            raise ValueError(f"sign supports 1 bit, got {bits!r}")
        return LevelSpec("sign", 0, 1)
    raise ValueError(f"scheme={scheme!r} must be 'lsq', 'seq' or 'sign'")


def codes_from_weights(w: torch.Tensor, s: torch.Tensor, spec: LevelSpec) -> torch.Tensor:
    """Integer codes (as fp32) of ``w`` [G, g] with scales ``s`` [G, 1]."""
    v = w.float() * s.float().reciprocal()
    if spec.scheme == "lsq":
        return v.round().clamp(spec.code_min, spec.code_max)
    if spec.scheme == "seq":
        return (v.clamp(spec.lo, spec.hi) * spec.n_levels - spec.shift).round()
    return (w >= 0).float()


def level_of_codes(k: torch.Tensor, spec: LevelSpec) -> torch.Tensor:
    """Levels (in units of the scale) of fp32 integer codes ``k``."""
    if spec.scheme == "lsq":
        return k
    if spec.scheme == "seq":
        return (k + spec.shift) * (1.0 / spec.n_levels)
    return k * 2.0 - 1.0


def dequantize_codes(k: torch.Tensor, s: torch.Tensor, spec: LevelSpec) -> torch.Tensor:
    """``level(k) * s`` in fp32: the one formula both fake quantization and the converted
    model use, so the two agree bit for bit."""
    return level_of_codes(k, spec) * s.float()


def fake_quant_forward_reference(w: torch.Tensor, s: torch.Tensor, spec: LevelSpec) -> torch.Tensor:
    """Fake-quantized ``w`` [G, g] (scales ``s`` [G, 1]) in ``w``'s dtype."""
    return dequantize_codes(codes_from_weights(w, s, spec), s, spec).to(w.dtype)


def fake_quant_backward_reference(
    w: torch.Tensor,
    s: torch.Tensor,
    grad_out: torch.Tensor,
    spec: LevelSpec,
    grad_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dw in w's dtype, dL/ds fp32 [G, 1])`` from ``dL/dout`` (see the module doc)."""
    v = w.float() * s.float().reciprocal()
    inside = (v >= spec.lo) & (v <= spec.hi)
    g = grad_out.float()
    level = level_of_codes(codes_from_weights(w, s, spec), spec)
    r = level if spec.scheme == "sign" else level - torch.where(inside, v, torch.zeros_like(v))
    grad_s = (g * r).sum(dim=-1, keepdim=True) * grad_scale
    grad_w = torch.where(inside, g, torch.zeros_like(g))
    return grad_w.to(w.dtype), grad_s


def fake_quant_reference(
    w: torch.Tensor, s: torch.Tensor, spec: LevelSpec, grad_scale: float
) -> torch.Tensor:
    """Differentiable fake quantization of ``w`` [G, g] with scales ``s`` [G, 1], built from
    the two functions above (the tests' reference for every backend)."""
    return _Reference.apply(w, s, spec, grad_scale)


class _Reference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, s, spec, grad_scale):  # type: ignore[override]
        ctx.save_for_backward(w, s)
        ctx.spec, ctx.grad_scale = spec, grad_scale
        return fake_quant_forward_reference(w, s, spec)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        w, s = ctx.saved_tensors
        grad_w, grad_s = fake_quant_backward_reference(w, s, grad_out, ctx.spec, ctx.grad_scale)
        return grad_w, grad_s.to(s.dtype), None, None
