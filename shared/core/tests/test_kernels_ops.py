"""RMSNorm, rotary and SwiGLU: Triton (interpreted on CPU) and torch paths vs the reference."""

import pytest
import torch

from verger.core.kernels import (
    apply_rotary_emb,
    rms_norm,
    rms_norm_reference,
    rotary_reference,
    rotary_tables,
    swiglu,
    swiglu_reference,
)
from verger.core.testing import assert_close, requires_triton

# fp16 stores round to ~5e-4 relative; fp32 paths agree to float rounding.
RTOL = {torch.float32: 2e-6, torch.float16: 2e-3}
BACKENDS = [pytest.param("triton", marks=requires_triton), "torch"]


def _grads(fn, inputs, dy):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(dy)
    return out, [t.grad for t in inputs]


def _compare(fn, ref, inputs, dtype, name):
    """Compare output and every input gradient; the reference runs on fp32 copies of the
    same (rounded) inputs, so only the implementation's own error is measured."""
    out_ref_shape = ref(*inputs).shape
    dy = torch.randn(out_ref_shape, dtype=dtype)
    out, grads = _grads(fn, inputs, dy)
    ref_out, ref_grads = _grads(ref, [t.float() for t in inputs], dy.float())
    assert out.dtype == dtype
    assert_close(out.float(), ref_out, rtol=RTOL[dtype], name=f"{name} out")
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == dtype
        assert_close(g.float(), rg, rtol=RTOL[dtype], name=f"{name} grad[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 40), (7, 33), (1, 3)])  # ragged feature sizes
def test_rms_norm_matches_reference(backend, dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 3
    w = (1 + 0.5 * torch.randn(shape[-1])).to(dtype)
    _compare(
        lambda a, b: rms_norm(a, b, 1e-5, backend=backend),
        lambda a, b: rms_norm_reference(a, b, 1e-5),
        [x, w],
        dtype,
        "rms_norm",
    )


def test_rms_norm_reference_closed_form():
    x = torch.tensor([[3.0, 4.0]])  # mean square 12.5
    y = rms_norm_reference(x, torch.tensor([1.0, 2.0]), 0.0)
    expected = torch.tensor([[3.0, 8.0]]) / 12.5**0.5
    assert torch.allclose(y, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 7, 3, 10), (5, 1, 6), (1, 9, 5, 2)])  # [.., T, H, D]
def test_rotary_matches_reference(backend, dtype, shape):
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=dtype)
    t, _, d = shape[-3:]
    cos, sin = rotary_tables(t, d, base=100.0, start=3)
    _compare(
        lambda a: apply_rotary_emb(a, cos, sin, backend=backend),
        lambda a: rotary_reference(a, cos, sin),
        [x],
        dtype,
        "rotary",
    )


def test_rotary_is_a_rotation_with_relative_positions():
    torch.manual_seed(2)
    q, k = torch.randn(2, 1, 1, 8).unbind(0)
    cos, sin = rotary_tables(20, 8)
    # norm preserved, and <R_m q, R_n k> depends only on m - n
    rq = apply_rotary_emb(q.expand(20, 1, 8).reshape(1, 20, 1, 8).contiguous(), cos, sin)
    rk = apply_rotary_emb(k.expand(20, 1, 8).reshape(1, 20, 1, 8).contiguous(), cos, sin)
    assert torch.allclose(rq.norm(dim=-1), q.norm().expand(1, 20, 1), rtol=1e-5)
    dots = rq[0, :, 0] @ rk[0, :, 0].T
    assert torch.allclose(dots[5, 2], dots[15, 12], atol=1e-5)
    assert not torch.allclose(dots[5, 2], dots[5, 3], atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 1031), (2, 5, 7)])  # 1031 spans two ragged blocks
def test_swiglu_matches_reference(backend, dtype, shape):
    torch.manual_seed(3)
    gate, up = torch.randn(shape, dtype=dtype) * 3, torch.randn(shape, dtype=dtype)
    _compare(
        lambda a, b: swiglu(a, b, backend=backend),
        swiglu_reference,
        [gate, up],
        dtype,
        "swiglu",
    )


def test_swiglu_reference_closed_form():
    gate = torch.tensor([0.0, 1.0, -2.0])
    up = torch.tensor([5.0, 2.0, 3.0])
    sig = 1 / (1 + torch.exp(-gate))
    assert torch.allclose(swiglu_reference(gate, up), gate * sig * up)
