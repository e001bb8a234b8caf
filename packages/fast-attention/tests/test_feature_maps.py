"""Feature maps: elu+1, FAVOR+ (unbiased softmax kernel, redraw) and the custom registry."""

import pytest
import torch
import torch.nn.functional as F

from verger.core.testing import assert_close
from verger.fast_attention import (
    EluFeatureMap,
    FavorFeatureMap,
    FeatureMap,
    available_feature_maps,
    get_feature_map,
    linear_attention,
    register_feature_map,
)


def test_elu_map_and_its_gradient_match_autograd():
    x = torch.randn(500, dtype=torch.float64, requires_grad=True)
    fm = EluFeatureMap(4)
    assert torch.autograd.gradcheck(lambda t: fm(t, is_query=True), (x,))
    assert_close(fm(x, is_query=True), F.elu(x) + 1, rtol=1e-12)


def test_elu_map_of_a_large_strided_tensor_is_formed_slice_by_slice_correctly():
    # over 2**19 elements (several slices, the last one partial) and not contiguous
    x = torch.randn(3, 700, 300, dtype=torch.float64).transpose(1, 2)
    x.requires_grad_()
    phi = EluFeatureMap(700)(x, is_query=False)
    assert phi.shape == x.shape
    assert_close(phi, F.elu(x) + 1, rtol=1e-12)
    grad = torch.randn_like(phi)
    (got,) = torch.autograd.grad(phi, x, grad)
    (want,) = torch.autograd.grad(F.elu(x) + 1, x, grad)
    assert_close(got, want, rtol=1e-12)


def test_favor_is_an_unbiased_softmax_kernel():
    g = torch.Generator().manual_seed(0)
    d = 8
    q, k = torch.randn(d, generator=g) * 0.5, torch.randn(d, generator=g) * 0.5
    fm = FavorFeatureMap(d, 512, seed=1)
    estimates = []
    for _ in range(40):
        fm.redraw()
        estimates.append(float(fm(q, is_query=False) @ fm(k, is_query=False)))
    exact = float(torch.exp(q @ k / d**0.5))
    mean = sum(estimates) / len(estimates)
    assert abs(mean - exact) / exact < 0.02


def test_favor_attention_approaches_softmax_with_more_features():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=g) * 0.5 for _ in range(3))
    exact = torch.softmax(q @ k.mT / 8**0.5, -1) @ v
    errs = []
    for m in (8, 512):
        fm = FavorFeatureMap(8, m, seed=2)
        out = linear_attention(q, k, v, feature_map=fm)
        errs.append(float((out - exact).norm() / exact.norm()))
    assert errs[1] < errs[0] and errs[1] < 0.1


def test_favor_redraw_interval():
    fm = FavorFeatureMap(4, 8, redraw_interval=2, seed=0).train()
    x = torch.randn(3, 4)
    first = fm.projection.clone()
    fm(x, is_query=True)
    fm(x, is_query=True)
    assert torch.equal(fm.projection, first)
    fm(x, is_query=True)  # third call: a new draw
    assert not torch.equal(fm.projection, first)
    fm.eval()
    frozen = fm.projection.clone()
    for _ in range(5):
        fm(x, is_query=True)
    assert torch.equal(fm.projection, frozen)


def test_custom_feature_map_registry():
    @register_feature_map("test_square")
    class Square(FeatureMap):
        def forward(self, x, *, is_query):
            return x.float() ** 2

    assert "test_square" in available_feature_maps()
    q, k, v = (torch.randn(1, 1, 10, 4) for _ in range(3))
    out = linear_attention(q, k, v, feature_map="test_square")
    sim = (q**2) @ (k**2).mT
    assert_close(out, sim @ v / (sim.sum(-1, keepdim=True) + 1e-6), rtol=1e-5)
    with pytest.raises(ValueError, match="already registered"):
        register_feature_map("test_square")(EluFeatureMap)


def test_feature_map_errors():
    with pytest.raises(ValueError, match="unknown"):
        get_feature_map("nope", 4)
    with pytest.raises(ValueError, match="head_dim"):
        get_feature_map(EluFeatureMap(4), 8)
    with pytest.raises(TypeError, match="feature_map"):
        get_feature_map(3, 4)
    with pytest.raises(TypeError, match="instance"):  # options would be ignored
        get_feature_map(FavorFeatureMap(4, seed=0), 4, seed=1)
    with pytest.raises(TypeError, match="'seeds'"):
        get_feature_map("favor", 4, seeds=1)
    with pytest.raises(ValueError, match="n_features"):
        FavorFeatureMap(4, 0)
