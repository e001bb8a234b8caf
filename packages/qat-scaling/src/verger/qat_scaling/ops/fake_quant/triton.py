"""Fused fake quantization kernels: one program per scale group.

Forward: quantize and dequantize a group in one pass. Backward: the straight-through
weight gradient and the group's LSQ scale gradient (a reduction over the group) in one
pass. The math follows ``reference.py``; rounding is half-to-even, written with ``floor``
so the compiled kernel and the CPU interpreter agree, and ``1 / s`` is an IEEE division
(``div_rn``) as in torch, so codes match the reference exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from verger.core.kernels import next_power_of_2

MODES = {"lsq": 0, "seq": 1, "sign": 2}
MAX_BLOCK = 4096


@triton.jit
def _round_half_even(x):
    f = tl.floor(x)
    d = x - f  # exact for |x| < 2**22; larger floats are integers already (d == 0)
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _codes_and_levels(w, inv_s, code_min, code_max, n, inv_n, shift, lo, hi, MODE: tl.constexpr):
    v = w * inv_s
    if MODE == 0:
        k = tl.minimum(tl.maximum(_round_half_even(v), code_min), code_max)
        level = k
    elif MODE == 1:
        k = _round_half_even(tl.minimum(tl.maximum(v, lo), hi) * n - shift)
        level = (k + shift) * inv_n
    else:
        k = tl.where(w >= 0.0, 1.0, 0.0)
        level = k * 2.0 - 1.0
    return v, level


@triton.jit
def _group(S, GS):
    """This program's group: its index, scale, 1 / scale (IEEE) and first element."""
    group = tl.program_id(0)
    s = tl.load(S + group).to(tl.float32)
    inv_s = tl.math.div_rn(tl.full([], 1.0, tl.float32), s)
    return group, s, inv_s, group.to(tl.int64) * GS


@triton.jit
def _fake_quant_fwd_kernel(
    W, S, OUT, GS, code_min, code_max, n, inv_n, shift, lo, hi,
    MODE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    _, s, inv_s, base = _group(S, GS)
    for start in range(0, GS, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < GS
        w = tl.load(W + base + cols, mask=mask, other=0.0).to(tl.float32)
        _, level = _codes_and_levels(w, inv_s, code_min, code_max, n, inv_n, shift, lo, hi, MODE)
        tl.store(OUT + base + cols, (level * s).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _fake_quant_bwd_kernel(
    W, S, DY, DW, DS, GS, code_min, code_max, n, inv_n, shift, lo, hi, grad_scale,
    MODE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    group, _, inv_s, base = _group(S, GS)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, GS, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < GS
        w = tl.load(W + base + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
        v, level = _codes_and_levels(w, inv_s, code_min, code_max, n, inv_n, shift, lo, hi, MODE)
        inside = (v >= lo) & (v <= hi)
        if MODE == 2:  # noqa: SIM108 (a constexpr branch)
            r = level
        else:
            r = level - tl.where(inside, v, 0.0)
        acc += tl.where(mask, dy * r, 0.0)
        tl.store(DW + base + cols, tl.where(inside, dy, 0.0).to(DW.dtype.element_ty), mask=mask)
    tl.store(DS + group, tl.sum(acc, axis=0) * grad_scale)


def _scalars(spec) -> tuple[float, ...]:
    return (
        float(spec.code_min),
        float(spec.code_max),
        float(spec.n_levels),
        1.0 / spec.n_levels,
        float(spec.shift),
        float(spec.lo),
        float(spec.hi),
    )


def _block(group_size: int) -> int:
    return min(MAX_BLOCK, next_power_of_2(group_size))


@torch.compiler.disable
def fake_quant_fwd(w2d: torch.Tensor, s1d: torch.Tensor, spec) -> torch.Tensor:
    """``w2d`` [G, g] contiguous, ``s1d`` [G] fp32 -> fake-quantized [G, g] in w's dtype."""
    groups, size = w2d.shape
    out = torch.empty_like(w2d)
    if groups:
        block = _block(size)
        _fake_quant_fwd_kernel[(groups,)](
            w2d, s1d, out, size, *_scalars(spec),
            MODE=MODES[spec.scheme], BLOCK=block, num_warps=4 if block <= 1024 else 8,
        )  # fmt: skip
    return out


@torch.compiler.disable
def fake_quant_bwd(
    w2d: torch.Tensor, s1d: torch.Tensor, dy: torch.Tensor, spec, grad_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(dw like w2d, ds fp32 [G])``."""
    groups, size = w2d.shape
    dw = torch.empty_like(w2d)
    ds = torch.empty(groups, device=w2d.device, dtype=torch.float32)
    if groups:
        block = _block(size)
        _fake_quant_bwd_kernel[(groups,)](
            w2d, s1d, dy, dw, ds, size, *_scalars(spec), float(grad_scale),
            MODE=MODES[spec.scheme], BLOCK=block, num_warps=4 if block <= 1024 else 8,
        )  # fmt: skip
    return dw, ds
