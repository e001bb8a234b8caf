"""The rescaled exclusive prefix over chunks (causal clustered attention's scan): the Triton
forward and backward against the reference loop, masked chunks and large logits included."""

import pytest
import torch

from verger.core.kernels.resources import KernelConfig, kernel_resources, ptxas_available
from verger.core.testing import assert_close
from verger.fast_attention.ops.rescaled_scan import (
    rescaled_prefix,
    rescaled_prefix_reference,
)
from verger.fast_attention.ops.rescaled_scan import triton as kernels

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")


def _chunks(g, nb, c, dv, *, dtype=torch.float32, seed=0, spread=30.0):
    """Per-chunk (max, sums, norms) as chunk_prefix forms them; chunk 0 of group 0, a middle
    chunk of every group and one centroid everywhere have no valid key (max −inf, sums 0)."""
    gen = torch.Generator().manual_seed(seed)
    m = (torch.randn(g, nb, c, generator=gen) * spread).to(dtype)
    s = torch.randn(g, nb, c, dv, generator=gen).to(dtype)
    z = torch.rand(g, nb, c, generator=gen).to(dtype) + 0.5
    empty = torch.zeros(g, nb, c, dtype=torch.bool)
    empty[0, 0] = True
    empty[:, nb // 2] = True
    empty[:, :, c - 1] = True
    m = m.masked_fill(empty, float("-inf"))
    s = s.masked_fill(empty[..., None], 0.0)
    z = z.masked_fill(empty, 0.0)
    return m, s.requires_grad_(), z.requires_grad_()


def _grads(loss, inputs):
    """Gradients, zeros where the loss does not depend on an input (one chunk: no prefix)."""
    if not loss.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    got = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, got)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("g, nb, c, dv", [(2, 9, 21, 70), (1, 1, 3, 8), (3, 16, 16, 64)])
def test_triton_scan_and_its_gradients_equal_the_reference(dtype, g, nb, c, dv):
    m, s, z = _chunks(g, nb, c, dv, dtype=dtype)
    got = rescaled_prefix(m, s, z, backend="triton")
    want = rescaled_prefix_reference(m, s, z)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert torch.equal(got[0], want[0])  # the prefix maxima, −inf included
    for name, a, b in zip(("sums", "norms"), got[1:], want[1:]):
        assert torch.isfinite(a).all()
        assert_close(a, b, rtol=tol, name=name)
    gen = torch.Generator().manual_seed(1)
    d_s = torch.randn(g, nb, c, dv, generator=gen).to(dtype)
    d_z = torch.randn(g, nb, c, generator=gen).to(dtype)
    grads = [_grads((out[1] * d_s).sum() + (out[2] * d_z).sum(), (s, z)) for out in (got, want)]
    for name, a, b in zip(("ds", "dz"), *grads):
        assert torch.isfinite(a).all()
        assert_close(a, b, rtol=tol, name=name)


@needs_triton
def test_triton_scan_handles_an_unused_output_gradient():
    m, s, z = _chunks(1, 5, 4, 8)
    _, sums, _ = rescaled_prefix(m, s, z, backend="triton")
    d_s, d_z = torch.autograd.grad(sums.sum(), (s, z), allow_unused=True)
    want = torch.autograd.grad(rescaled_prefix_reference(m, s, z)[1].sum(), s)[0]
    assert_close(d_s, want, rtol=1e-6)
    assert d_z is None or not d_z.any()


def test_dispatch_and_bad_inputs():
    m, s, z = _chunks(1, 3, 2, 4)
    assert torch.equal(rescaled_prefix(m, s, z)[1], rescaled_prefix_reference(m, s, z)[1])
    with pytest.raises(ValueError, match=r"m \(G, nb, C\), s \(G, nb, C, Dv\)"):
        rescaled_prefix(m, s[..., 0], z)
    with pytest.raises(ValueError, match="backend"):
        rescaled_prefix(m, s, z, backend="cuda")
    if kernels.HAS_TRITON:
        with pytest.raises(TypeError, match="float32 or float64"):
            kernels.rescaled_prefix_forward_triton(m.half(), s.detach().half(), z.detach().half())


@pytest.mark.slow  # ptxas compile: minutes on 2 CPU cores (run by tests_latest)
@pytest.mark.ptxas
def test_scan_kernels_do_not_spill():
    if not kernels.HAS_TRITON or not ptxas_available():
        pytest.skip("needs triton's NVIDIA backend")
    sizes = {"nb": "i32", "c": "i32", "dv": "i32"}
    fwd = {n: "*fp32" for n in ("m_ptr", "s_ptr", "z_ptr", "out_m_ptr", "out_s_ptr", "out_z_ptr")}
    bwd = {n: "*fp32" for n in ("m_ptr", "out_m_ptr", "d_out_s_ptr", "d_out_z_ptr", "d_s_ptr",
                                "d_z_ptr")}  # fmt: skip
    meta = kernels.launch_meta(25, 64)
    warps = meta.pop("num_warps")
    configs = [
        KernelConfig(kernels._prefix_fwd_kernel, {**fwd, **sizes}, meta, warps),
        KernelConfig(kernels._prefix_bwd_kernel, {**bwd, **sizes}, meta, warps),
    ]
    for arch in (80, 90):
        for res in kernel_resources(*configs, arch=arch):
            assert not res.spills, res
