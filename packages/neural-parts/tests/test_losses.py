"""Each loss equals a hand computation on a tiny case; the combined loss is wired right."""

import math

import pytest
import torch

from verger.neural_parts import LossConfig, ModelConfig, NeuralParts
from verger.neural_parts.geometry import sphere_directions
from verger.neural_parts.losses import (
    coverage_loss,
    neural_parts_loss,
    normal_loss,
    occupancy_loss,
    overlap_loss,
    reconstruction_loss,
    signed_surface_distance,
)

D = torch.float64


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_reconstruction_by_hand():
    pred = torch.tensor([[[[0, 0, 0], [1, 0, 0]], [[0, 2, 0], [5, 5, 5]]]], dtype=D)
    valid = torch.tensor([[[True, True], [True, False]]])
    target = torch.tensor([[[0, 0, 0], [0, 1, 0]]], dtype=D)
    # target -> valid preds: 0 and 1; valid preds -> target: 0, 1, 1 ([5,5,5] ignored)
    expected = (0 + 1) / 2 + (0 + 1 + 1) / 3
    assert float(reconstruction_loss(pred, target, valid)) == pytest.approx(expected)
    # without the mask the far point counts in both directions
    far = math.sqrt(25 + 16 + 25)
    expected_all = (0 + 1) / 2 + (0 + 1 + 1 + far) / 4
    assert float(reconstruction_loss(pred, target)) == pytest.approx(expected_all)
    # gradients are finite even where a distance is exactly zero
    pred.requires_grad_(True)
    reconstruction_loss(pred, target, valid).backward()
    assert torch.isfinite(pred.grad).all()


def test_normal_by_hand():
    grads = torch.tensor([[[3.0, 0, 0], [0, 0, -2.0]]], dtype=D)
    normals = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], dtype=D)
    assert float(normal_loss(grads, normals)) == pytest.approx((0 + 1) / 2)
    assert float(normal_loss(-grads, normals)) == pytest.approx((2 + 1) / 2)


def test_occupancy_by_hand():
    g = torch.tensor([[[0.01, -0.02], [0.03, 0.05]]], dtype=D)
    occ = torch.tensor([[1.0, 0.0]], dtype=D)
    w = torch.tensor([[2.0, 0.5]], dtype=D)
    # union -0.02 (inside, logit 2) and 0.03 (outside, logit -3)
    expected = (2 * math.log1p(math.exp(-2)) + 0.5 * math.log1p(math.exp(-3))) / 2.5
    assert float(occupancy_loss(g, occ, w, sharpness=100)) == pytest.approx(expected)


def test_coverage_by_hand():
    g = torch.tensor([[[-0.1, 0.2], [0.05, -0.01], [0.3, 0.4]]], dtype=D)
    occ = torch.tensor([[1.0, 1.0, 0.0]], dtype=D)
    nll = lambda v: -math.log(sig(-10 * v) + 1e-6)  # noqa: E731
    k1 = (nll(-0.1) + nll(-0.01)) / 2
    assert float(coverage_loss(g, occ, k=1, sharpness=10)) == pytest.approx(k1)
    # k larger than the inside points: both inside points, never the outside one
    k5 = ((nll(-0.1) + nll(0.05)) / 2 + (nll(0.2) + nll(-0.01)) / 2) / 2
    assert float(coverage_loss(g, occ, k=5, sharpness=10)) == pytest.approx(k5)
    # a shape with no inside point contributes nothing
    assert float(coverage_loss(g, torch.zeros_like(occ), k=2, sharpness=10)) == 0.0


def test_signed_surface_distance_by_hand():
    x = torch.tensor([[[0.0, 0, 0], [3.0, 0, 0]]], dtype=D)
    parts = torch.tensor([[[[1.0, 0, 0], [0, 2.0, 0]], [[0, 0, 5.0], [3.0, 0, 4.0]]]], dtype=D)
    inside = torch.tensor([[[True, False], [False, False]]])
    want = torch.tensor([[[-1.0, 5.0], [2.0, 4.0]]], dtype=D)
    assert torch.equal(signed_surface_distance(x, parts, inside), want)


def test_overlap_by_hand():
    g = torch.tensor([[[-0.5, -0.5, 0.1], [1.0, 1.0, 1.0]]], dtype=D)
    first = 2 * sig(5) + sig(-1) - 1.5
    assert float(overlap_loss(g, sharpness=10, threshold=1.5)) == pytest.approx(first / 2)


def _ellipsoid_model():
    """Zero-initialised couplings: each primitive is an ellipsoid with a known implicit."""
    config = ModelConfig(
        n_primitives=2, feature_dim=8, embedding_dim=8, hidden=16, projection_dim=8, head_hidden=16
    )
    torch.manual_seed(0)
    return NeuralParts(config).double()


def _analytic_g(model, cond, x):
    scale, rot, trans = model.primitives.inn.pose(cond)
    local = torch.einsum("bmji,bqmj->bqmi", rot, x[:, :, None, :] - trans[:, None])
    return (local * scale[:, None]).norm(dim=-1) - model.config.sphere_radius


def test_combined_loss_matches_the_terms_on_analytic_ellipsoids():
    model = _ellipsoid_model()
    gen = torch.Generator().manual_seed(0)
    cond = model(torch.rand(2, 32, 3, generator=gen, dtype=D) - 0.5)
    surface = torch.rand(2, 20, 3, generator=gen, dtype=D) - 0.5
    normals = torch.nn.functional.normalize(torch.randn(2, 20, 3, generator=gen, dtype=D), dim=-1)
    volume = torch.rand(2, 40, 3, generator=gen, dtype=D) - 0.5
    occ = (torch.rand(2, 40, generator=gen) < 0.4).to(D)
    w = torch.rand(2, 40, generator=gen, dtype=D) + 0.5
    directions = sphere_directions(30, dtype=D)
    batch = dict(
        directions=directions,
        surface=surface,
        normals=normals,
        volume=volume,
        occupancy=occ,
        weights=w,
    )
    options = dict(sharpness=20.0, coverage_k=3, overlap_threshold=1.2)
    config = LossConfig(**options, volume_distance="implicit")
    terms = neural_parts_loss(model, cond, config=config, **batch)
    g = _analytic_g(model, cond, volume).detach()
    assert torch.allclose(model.implicit(cond, volume), g, atol=1e-12)
    assert terms.as_floats()["occupancy"] == pytest.approx(
        float(occupancy_loss(g, occ, w, sharpness=20.0))
    )
    assert terms.as_floats()["coverage"] == pytest.approx(
        float(coverage_loss(g, occ, k=3, sharpness=20.0))
    )
    assert terms.as_floats()["overlap"] == pytest.approx(
        float(overlap_loss(g, sharpness=20.0, threshold=1.2))
    )
    # normal: analytic gradient of the nearest ellipsoid's implicit
    x = surface.clone().requires_grad_(True)
    g_s = _analytic_g(model, cond, x)
    pick = g_s.square().argmin(-1, keepdim=True)
    (grad,) = torch.autograd.grad(g_s.gather(-1, pick).sum(), x)
    assert terms.as_floats()["normal"] == pytest.approx(float(normal_loss(grad, normals).detach()))
    # reconstruction: sphere points pushed through the ellipsoids, union-surface mask
    scale, rot, trans = model.primitives.inn.pose(cond)
    pts = (
        torch.einsum(
            "bmij,bmnj->bmni", rot, 0.25 * directions.expand(2, 2, -1, -1) / scale[:, :, None]
        )
        + trans[:, :, None]
    )
    other = _analytic_g(model, cond, pts.reshape(2, 60, 3)).reshape(2, 2, 30, 2)
    valid = torch.stack([other[:, 0, :, 1] >= 0, other[:, 1, :, 0] >= 0], 1)
    rec = reconstruction_loss(pts, surface, valid)
    assert terms.as_floats()["reconstruction"] == pytest.approx(float(rec.detach()))
    weighted = (
        0.3 * rec
        + 0.01 * terms.normal
        + terms.occupancy
        + 0.01 * terms.coverage
        + 0.1 * terms.overlap
    )
    assert terms.as_floats()["total"] == pytest.approx(float(weighted.detach()))
    # the default volume value: distance to the pushed sphere points, signed by the implicit
    surf = neural_parts_loss(model, cond, config=LossConfig(**options), **batch)
    g_surf = signed_surface_distance(volume, pts.detach(), g < 0)
    assert surf.as_floats()["occupancy"] == pytest.approx(
        float(occupancy_loss(g_surf, occ, w, sharpness=20.0))
    )
    assert surf.as_floats()["coverage"] == pytest.approx(
        float(coverage_loss(g_surf, occ, k=3, sharpness=20.0))
    )
    # "scaled": the same ellipsoids' implicit divided by the geometric mean of their scales
    sc = neural_parts_loss(
        model, cond, config=LossConfig(**options, volume_distance="scaled"), **batch
    )
    g_sc = g / scale.detach().prod(-1).pow(1 / 3)[:, None]
    assert sc.as_floats()["occupancy"] == pytest.approx(
        float(occupancy_loss(g_sc, occ, w, sharpness=20.0))
    )
    assert sc.as_floats()["overlap"] == pytest.approx(
        float(overlap_loss(g_sc, sharpness=20.0, threshold=1.2))
    )
    assert sc.as_floats()["occupancy"] != pytest.approx(terms.as_floats()["occupancy"])
    # every term carries a gradient to the parameters
    terms.total.backward()
    assert all(p.grad is not None for p in model.primitives.parameters() if p.requires_grad)


def test_zero_weight_skips_a_term_and_weights_are_validated():
    model = _ellipsoid_model()
    cond = model(torch.rand(1, 16, 3, dtype=D))
    kwargs = dict(
        directions=sphere_directions(10, dtype=D),
        surface=torch.rand(1, 5, 3, dtype=D),
        normals=torch.eye(3, dtype=D)[[0, 1, 2, 0, 1]][None],
        volume=torch.rand(1, 8, 3, dtype=D),
        occupancy=torch.ones(1, 8, dtype=D),
        weights=torch.ones(1, 8, dtype=D),
    )
    terms = neural_parts_loss(model, cond, config=LossConfig(normal=0.0, overlap=0.0), **kwargs)
    assert terms.as_floats()["normal"] == 0.0 and terms.as_floats()["overlap"] == 0.0
    with pytest.raises(ValueError, match="normal=-1"):
        LossConfig(normal=-1)
    with pytest.raises(ValueError, match="sharpness"):
        LossConfig(sharpness=float("nan"))
    with pytest.raises(ValueError, match="both 0"):
        LossConfig(reconstruction=0, occupancy=0)
