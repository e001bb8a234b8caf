"""The weighted-sum kernel: Triton (interpreted on CPU) and torch paths vs the reference."""

import pytest
import torch

from verger.core.testing import assert_close, requires_cuda, requires_triton
from verger.expert_soups.ops import weighted_sum, weighted_sum_reference

RTOL = {torch.float32: 2e-6, torch.float16: 2e-3}
BACKENDS = [pytest.param("triton", marks=requires_triton), "torch"]


def _run(fn, base, experts, alpha, dy):
    ins = [t.detach().clone().requires_grad_(True) for t in (base, experts, alpha)]
    out = fn(*ins)
    out.backward(dy)
    return out, [t.grad for t in ins]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,n", [((37, 21), 3), ((2053,), 5), ((4, 3, 5), 1)])
def test_weighted_sum_matches_reference(backend, dtype, shape, n):
    torch.manual_seed(0)
    base = torch.randn(shape).to(dtype)
    experts = torch.randn(n, *shape).to(dtype)
    alpha = torch.randn(n)  # coefficients stay fp32 (they come from the coefficient net)
    dy = torch.randn(shape).to(dtype)
    out, grads = _run(
        lambda b, e, a: weighted_sum(b, e, a, backend=backend), base, experts, alpha, dy
    )
    ref, ref_grads = _run(weighted_sum_reference, base.float(), experts.float(), alpha, dy.float())
    assert out.dtype == dtype
    assert_close(out.float(), ref, rtol=RTOL[dtype], name="out")
    for name, g, rg in zip(("d_base", "d_experts", "d_alpha"), grads, ref_grads):
        assert_close(g.float(), rg, rtol=RTOL[dtype], name=name)


def test_reference_closed_form():
    base = torch.tensor([1.0, 2.0])
    experts = torch.tensor([[1.0, 0.0], [0.0, 10.0]])
    out = weighted_sum_reference(base, experts, torch.tensor([0.5, -0.1]))
    assert out.tolist() == pytest.approx([1.5, 1.0])


def test_bad_inputs_are_named():
    base, experts, alpha = torch.zeros(4), torch.zeros(2, 4), torch.zeros(2)
    with pytest.raises(ValueError, match="experts"):
        weighted_sum(base, torch.zeros(2, 5), alpha)
    with pytest.raises(ValueError, match="alpha has 3"):
        weighted_sum(base, experts, torch.zeros(3))
    with pytest.raises(TypeError, match="share a dtype"):
        weighted_sum(base, experts.half(), alpha)
    with pytest.raises(TypeError, match="alpha"):
        weighted_sum(base, experts, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        weighted_sum(base, experts, alpha, backend="cuda")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_sum_cuda(dtype):
    torch.manual_seed(0)
    base = torch.randn(1000, 333, device="cuda").to(dtype)
    experts = torch.randn(8, 1000, 333, device="cuda").to(dtype)
    alpha = torch.randn(8, device="cuda")
    dy = torch.randn_like(base)
    out, grads = _run(weighted_sum, base, experts, alpha, dy)
    ref, ref_grads = _run(weighted_sum_reference, base.float(), experts.float(), alpha, dy.float())
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    assert_close(out.float(), ref, rtol=tol)
    for g, rg in zip(grads, ref_grads):
        assert_close(g.float(), rg, rtol=tol)
