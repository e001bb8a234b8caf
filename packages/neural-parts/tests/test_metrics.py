"""Metrics against analytic shapes: two spheres."""

import math

import numpy as np
import pytest
import trimesh

from verger.neural_parts.metrics import chamfer_l1, normal_consistency, volumetric_iou


def _sphere_samples(r: float, n: int, rng, centre=(0.0, 0.0, 0.0)):
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return np.asarray(centre) + r * d, d


def test_iou_of_two_overlapping_spheres_matches_the_lens_volume():
    r, dist = 0.3, 0.25
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.6, 0.6, size=(400_000, 3))
    a = np.linalg.norm(x - [-dist / 2, 0, 0], axis=1) <= r
    b = np.linalg.norm(x - [dist / 2, 0, 0], axis=1) <= r
    # intersection of two equal spheres: π (4r + d)(2r - d)² / 12
    lens = math.pi * (4 * r + dist) * (2 * r - dist) ** 2 / 12
    ball = 4 / 3 * math.pi * r**3
    assert volumetric_iou(a, b) == pytest.approx(lens / (2 * ball - lens), abs=0.01)
    assert volumetric_iou(a, a) == 1.0
    far = np.linalg.norm(x - [0.55, 0.55, 0.55], axis=1) <= 0.02
    assert volumetric_iou(a, far) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        volumetric_iou(a, b[:-1])


def test_chamfer_l1_of_concentric_spheres_is_the_radius_gap():
    rng = np.random.default_rng(1)
    p, _ = _sphere_samples(0.30, 20_000, rng)
    g, _ = _sphere_samples(0.35, 20_000, rng)
    # every nearest neighbour is at least the gap away; dense samples make it nearly equal
    assert chamfer_l1(p, g) == pytest.approx(0.05, rel=0.05)
    assert chamfer_l1(p, g) >= 0.05
    q, _ = _sphere_samples(0.30, 20_000, rng, centre=(0.1, 0, 0))
    # a shifted sphere: mean distance from one unit sphere to another shifted by t is > 0
    assert chamfer_l1(p, q) > chamfer_l1(p, _sphere_samples(0.30, 20_000, rng)[0])
    with pytest.raises(ValueError, match="NaN"):
        chamfer_l1(np.array([[np.nan, 0, 0]]), g)
    with pytest.raises(ValueError, match="non-empty"):
        chamfer_l1(np.zeros((0, 3)), g)


def test_normal_consistency_of_spheres_and_of_a_cube_against_a_sphere():
    rng = np.random.default_rng(2)
    p, n_p = _sphere_samples(0.3, 10_000, rng)
    g, n_g = _sphere_samples(0.32, 10_000, rng)
    assert normal_consistency(p, n_p, g, n_g) == pytest.approx(1.0, abs=1e-3)
    # flipped normals count the same (absolute value, orientation-free)
    assert normal_consistency(p, -n_p, g, n_g) == pytest.approx(1.0, abs=1e-3)
    # a cube against its circumscribed-ish sphere: E|<n_face, radial>| over the cube surface
    cube = trimesh.creation.box(extents=(0.5, 0.5, 0.5))
    pts, faces = trimesh.sample.sample_surface(cube, 20_000, seed=rng)
    nc = normal_consistency(pts, cube.face_normals[faces], g, n_g)
    assert 0.6 < nc < 0.95


def test_part_shares_and_use_by_hand():
    from verger.neural_parts.metrics import part_shares, part_use

    inside = np.array(
        [[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]] * 5 + [[0, 0, 1]], dtype=bool
    )  # union: 21 points; part 0 holds 15, part 1 holds 10, part 2 holds 1
    assert np.allclose(part_shares(inside), [15 / 21, 10 / 21, 1 / 21])
    use = part_use(inside)
    assert use["parts_used"] == 2.0  # 1/21 < 5%
    assert use["max_part_share"] == pytest.approx(15 / 21)
    assert part_use(np.zeros((4, 2), bool))["max_part_share"] == 0.0  # empty union
    with pytest.raises(ValueError, match="part_inside"):
        part_shares(np.ones(4, bool))
