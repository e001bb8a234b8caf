"""The invertible network: exact inverse, log-determinant, sphere -> zero level set."""

import pytest
import torch
from _helpers import randomize

from verger.neural_parts import ConditionalINN, ModelConfig, NeuralParts
from verger.neural_parts.geometry import sphere_directions


def _inn(config: ModelConfig, dtype=torch.float64) -> ConditionalINN:
    torch.manual_seed(0)
    return randomize(ConditionalINN(config)).to(dtype)


def test_round_trip_fp64_below_1e6(tiny_config):
    inn = _inn(tiny_config)
    gen = torch.Generator().manual_seed(1)
    cond = torch.randn(2, 3, tiny_config.condition_dim, generator=gen, dtype=torch.float64)
    y = torch.randn(2, 3, 50, 3, generator=gen, dtype=torch.float64) * 0.3
    x, logdet_f = inn(y, cond)
    assert (x - y).abs().max() > 1e-2  # the deformation is not the identity
    y_back, logdet_i = inn.inverse(x, cond)
    assert (y_back - y).abs().max() < 1e-6
    x_back, _ = inn(inn.inverse(x, cond)[0], cond)
    assert (x_back - x).abs().max() < 1e-6
    assert torch.allclose(logdet_f, -logdet_i, atol=1e-9)


def test_log_determinant_equals_autograd_jacobian(tiny_config):
    inn = _inn(tiny_config)
    gen = torch.Generator().manual_seed(2)
    cond = torch.randn(1, 3, tiny_config.condition_dim, generator=gen, dtype=torch.float64)
    y = torch.randn(1, 3, 4, 3, generator=gen, dtype=torch.float64) * 0.3
    _, logdet = inn(y, cond)
    _, logdet_inv = inn.inverse(inn(y, cond)[0], cond)
    for m in range(3):
        for n in range(4):

            def f(p, m=m, n=n):
                pts = y.clone()
                pts[0, m, n] = p
                return inn(pts, cond)[0][0, m, n]

            jac = torch.autograd.functional.jacobian(f, y[0, m, n])
            sign, logabs = torch.linalg.slogdet(jac)
            assert sign > 0  # orientation preserving: meshes keep outward faces
            assert torch.allclose(logdet[0, m, n], logabs, atol=1e-9)
            assert torch.allclose(logdet_inv[0, m, n], -logabs, atol=1e-9)


def test_scale_clip_bounds_coupling_log_scales():
    config = ModelConfig(
        feature_dim=4, embedding_dim=4, hidden=8, projection_dim=4, head_hidden=8, scale_clip=0.5
    )
    inn = randomize(ConditionalINN(config), std=50.0).double()
    y = torch.randn(1, 5, 30, 3, dtype=torch.float64)
    cond = torch.randn(1, 5, 8, dtype=torch.float64)
    for layer in inn.layers:
        with torch.no_grad():
            s, _ = layer._scale_shift(y * layer.mask, cond)
        assert s.abs().max() <= 0.5 + 1e-12
        assert float(s.abs().max()) == pytest.approx(0.5)  # large weights do hit the clip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sphere_points_map_to_the_zero_level_set(tiny_config, dtype):
    torch.manual_seed(0)
    model = randomize(NeuralParts(tiny_config)).to(dtype)
    cloud = torch.rand(2, 64, 3, dtype=dtype) - 0.5
    cond = model(cloud)
    directions = sphere_directions(100, dtype=dtype)
    surface = model.surface(cond, directions)  # [B, M, N, 3]
    b, m, n, _ = surface.shape
    g = model.implicit(cond, surface.reshape(b, m * n, 3)).reshape(b, m, n, m)
    own = torch.stack([g[:, i, :, i] for i in range(m)], 1)
    assert own.abs().max() < 1e-5
    # points on one part are not all on every other part (the parts differ)
    assert g[:, 0, :, 1].abs().min() > 0 or g[:, 0, :, 1].abs().max() > 1e-2


@pytest.mark.parametrize("bias", [-0.7, 0.0, 2.0])
def test_scaled_implicit_is_the_signed_distance_of_a_scaled_sphere(bias):
    # Zero couplings and a constant isotropic scale s: part m is the sphere of radius r/s
    # centred at its translation, whose signed distance is ||x - t_m|| - r/s (closed form).
    config = ModelConfig(
        n_primitives=3, feature_dim=8, embedding_dim=8, hidden=16, projection_dim=8, head_hidden=16
    )
    torch.manual_seed(0)
    model = NeuralParts(config).double()
    head = model.primitives.inn.scale_head[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(bias)
    gen = torch.Generator().manual_seed(3)
    cond = model(torch.rand(2, 32, 3, generator=gen, dtype=torch.float64) - 0.5)
    x = torch.rand(2, 200, 3, generator=gen, dtype=torch.float64) - 0.5
    scale, _, translation = model.primitives.inn.pose(cond)
    s = scale[..., 0]  # [B, M], the same on every axis
    assert torch.allclose(scale, s.unsqueeze(-1).expand_as(scale))
    distance = (x[:, :, None] - translation[:, None]).norm(dim=-1) - 0.25 / s[:, None]
    scaled = model.implicit(cond, x, scaled=True)
    assert torch.allclose(scaled, distance, atol=1e-12)
    raw = model.implicit(cond, x)
    if bias != 0.0:  # s != 1: the sphere-space value is off by the factor s
        assert not torch.allclose(raw, distance, atol=1e-3)
    assert torch.allclose(raw, distance * s[:, None], atol=1e-12)


def test_scaled_implicit_keeps_the_sign_and_superquadrics_are_unchanged(tiny_config):
    from dataclasses import replace

    torch.manual_seed(0)
    model = randomize(NeuralParts(tiny_config)).double()
    gen = torch.Generator().manual_seed(4)
    cond = model(torch.rand(2, 64, 3, generator=gen, dtype=torch.float64) - 0.5)
    x = torch.rand(2, 300, 3, generator=gen, dtype=torch.float64) - 0.5
    raw, scaled = model.implicit(cond, x), model.implicit(cond, x, scaled=True)
    assert torch.equal(raw < 0, scaled < 0)
    # divided by exp(log|det dy/dx| / 3) of the inverse map at each query point
    m = cond.shape[1]
    _, logdet = model.primitives.inn.inverse(x.unsqueeze(1).expand(-1, m, -1, -1), cond)
    assert torch.allclose(scaled, raw * torch.exp(-logdet / 3).transpose(1, 2), atol=1e-12)
    assert not torch.allclose(scaled, raw, atol=1e-3)
    # the superquadric's radial distance is Euclidean already: the option changes nothing
    sq = NeuralParts(replace(tiny_config, primitive="superquadric")).double()
    cond = sq(torch.rand(2, 64, 3, generator=gen, dtype=torch.float64) - 0.5)
    assert torch.equal(sq.implicit(cond, x, scaled=True), sq.implicit(cond, x))
