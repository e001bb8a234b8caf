"""CUDA only (``-m gpu``): the Triton fake-quant kernel in bf16 and inside a training run."""

import copy

import pytest
import torch

from verger.core.nn import TransformerLM
from verger.core.testing import assert_close, requires_cuda, tiny_config
from verger.qat_scaling import (
    QuantConfig,
    enable_fake_quant,
    fake_quant,
    level_spec,
    prepare,
    set_backend,
)
from verger.qat_scaling.ops.fake_quant import fake_quant_reference

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "bits,scheme", [(4, "lsq"), (8, "lsq"), (2, "seq"), ("ternary", "seq"), (1, "sign")]
)
def test_kernel_matches_reference_on_cuda(dtype, bits, scheme):
    torch.manual_seed(0)
    w = (torch.randn(256, 1024, device="cuda") * 0.05).to(dtype)
    s = torch.rand(256, 8, device="cuda") * 0.01 + 0.002
    dy = torch.randn(256, 1024, device="cuda", dtype=dtype)
    spec = level_spec(bits, scheme)
    outs = []
    for backend in ("triton", "reference"):
        a, b = w.clone().requires_grad_(True), s.clone().requires_grad_(True)
        if backend == "triton":
            y = fake_quant(a, b, spec, spec.grad_scale(128), backend="triton")
        else:
            y = fake_quant_reference(
                a.view(-1, 128), b.view(-1, 1), spec, spec.grad_scale(128)
            ).view_as(a)
        y.backward(dy)
        outs.append((y, a.grad, b.grad))
    (y, gw, gs), (ry, rgw, rgs) = outs
    assert torch.equal(y, ry) and torch.equal(gw, rgw)
    assert_close(gs, rgs, rtol=1e-5, name="grad s")


def test_training_with_the_kernel_follows_the_torch_path():
    torch.manual_seed(0)
    base = prepare(TransformerLM(tiny_config(mlp_hidden=96)), QuantConfig(bits=4, group_size=16))
    enable_fake_quant(base, True)
    losses = {}
    for backend in ("triton", "torch"):
        model = copy.deepcopy(base).cuda()
        set_backend(model, backend)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        history = []
        for _ in range(5):
            ids = torch.randint(0, 61, (4, 33), generator=gen).cuda()
            loss = model(ids[:, :-1], ids[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            history.append(float(loss))
        losses[backend] = history
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-4)
