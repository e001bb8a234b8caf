"""CUDA checks of the Triton kernels (run by the tests_gpu session / ci/gpu-check.sh).

bf16 is covered here only: the CPU interpreter computes bf16 arithmetic wrongly.
"""

import pytest
import torch

from verger.core.kernels import (
    apply_rotary_emb,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    rms_norm,
    rms_norm_reference,
    rotary_reference,
    rotary_tables,
    swiglu,
    swiglu_reference,
    use_backend,
)
from verger.core.nn import TransformerLM
from verger.core.testing import assert_close, tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _check(fn, ref, inputs, dtype, name):
    inputs = [t.cuda().to(dtype) for t in inputs]
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    ref_leaves = [t.float().clone().requires_grad_(True) for t in inputs]
    out, expected = fn(*leaves), ref(*ref_leaves)
    dy = torch.randn_like(expected)
    out.backward(dy.to(out.dtype))
    expected.backward(dy)
    assert_close(out.float(), expected, rtol=RTOL[dtype], name=f"{name} out")
    for i, (a, b) in enumerate(zip(leaves, ref_leaves)):
        assert_close(a.grad.float(), b.grad, rtol=RTOL[dtype], name=f"{name} grad[{i}]")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cuda(dtype):
    x, w = torch.randn(37, 1000) * 2, 1 + 0.1 * torch.randn(1000)
    _check(lambda a, b: rms_norm(a, b, 1e-5), lambda a, b: rms_norm_reference(a, b, 1e-5),
           [x, w], dtype, "rms_norm")  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_cuda(dtype):
    cos, sin = rotary_tables(33, 24, device="cuda")
    _check(lambda a: apply_rotary_emb(a, cos, sin), lambda a: rotary_reference(a, cos, sin),
           [torch.randn(3, 33, 5, 24)], dtype, "rotary")  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_cuda(dtype):
    _check(
        swiglu, swiglu_reference, [torch.randn(17, 3001), torch.randn(17, 3001)], dtype, "swiglu"
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_cuda(dtype):
    t = torch.randint(0, 50257, (301,), device="cuda")
    t[::7] = -100
    _check(lambda a, b: linear_cross_entropy(a, b, t, chunk_size=64),
           lambda a, b: linear_cross_entropy_reference(a, b, t),
           [torch.randn(301, 128), torch.randn(50257, 128) * 0.05], dtype, "linear_ce")  # fmt: skip


def test_linear_cross_entropy_cuda_memory():
    x = torch.randn(4096, 256, device="cuda", requires_grad=True)
    w = (torch.randn(50257, 256, device="cuda") * 0.02).requires_grad_(True)
    t = torch.randint(0, 50257, (4096,), device="cuda")
    peaks = []
    for fn in (lambda: torch.nn.functional.cross_entropy(x @ w.T, t),
               lambda: linear_cross_entropy(x, w, t)):  # fmt: skip
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)
        x.grad = w.grad = None
    assert peaks[1] < 0.5 * peaks[0], peaks


def test_model_on_cuda_triton_matches_torch_path():
    torch.manual_seed(0)
    model = TransformerLM(tiny_config(fused=True)).cuda()
    ids = torch.randint(0, 61, (3, 40), device="cuda")
    loss = model(ids, ids).loss
    with use_backend("torch"):
        ref = model(ids, ids).loss
    assert_close(loss, ref, rtol=1e-5, name="loss")
    assert torch.equal(model.generate(ids[:, :4], 8, greedy=True)[:, :4], ids[:, :4])
