"""Pushed-forward meshes: closed, outward, volumes equal to the implicit occupancy's."""

import numpy as np
import pytest
import torch
import trimesh
from _helpers import randomize

from verger.neural_parts import ModelConfig, NeuralParts, export_mesh, extract_meshes
from verger.neural_parts.data.winding import inside_mesh


@pytest.fixture
def deformed(tiny_config):
    torch.manual_seed(3)
    model = randomize(NeuralParts(tiny_config), std=0.3, seed=4).double().eval()
    cond = model(torch.rand(1, 64, 3, dtype=torch.float64) - 0.5)
    return model, cond


def test_meshes_are_watertight_with_outward_faces(deformed):
    model, cond = deformed
    (parts,) = extract_meshes(model, cond, subdivisions=3)
    assert parts.n_parts == 3
    for mesh in parts.parts():
        assert mesh.is_watertight and mesh.is_winding_consistent
        assert mesh.volume > 0  # outward orientation
        assert len(mesh.faces) == 20 * 4**3


@pytest.mark.parametrize("primitive", ["inn", "superquadric"])
def test_mesh_volume_matches_implicit_occupancy(tiny_config, primitive):
    config = ModelConfig(**{**tiny_config.to_dict(), "primitive": primitive})
    torch.manual_seed(5)
    model = randomize(NeuralParts(config), std=0.3, seed=6).double().eval()
    cond = model(torch.rand(1, 64, 3, dtype=torch.float64) - 0.5)
    (parts,) = extract_meshes(model, cond, subdivisions=4)
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    for m, mesh in enumerate(parts.parts()):
        lo, hi = mesh.bounds[0] - 0.02, mesh.bounds[1] + 0.02
        box = torch.as_tensor(hi - lo)
        x = torch.as_tensor(lo) + torch.rand(n, 3, generator=gen, dtype=torch.float64) * box
        with torch.no_grad():
            inside = model.implicit(cond, x[None])[0, :, m] <= 0
        fraction = inside.double().mean()
        mc_volume = float(fraction * box.prod())
        stderr = float(box.prod() * (fraction * (1 - fraction) / n).sqrt())
        # the inscribed triangulation loses a little volume; sampling noise is ~stderr
        assert mesh.volume == pytest.approx(mc_volume, rel=0.01, abs=4.5 * stderr)
        # and the mesh's own inside test agrees with the implicit one away from the surface
        g = model.implicit(cond, x[:600][None])[0, :, m].detach().numpy()
        far = np.abs(g) > 0.01
        contained = inside_mesh(mesh.vertices, mesh.faces, x[:600].numpy()[far])
        assert (contained == (g[far] <= 0)).mean() > 0.999


def test_export_ply_and_obj_keep_parts_and_colours(deformed, tmp_path):
    model, cond = deformed
    (parts,) = extract_meshes(model, cond, subdivisions=2)
    ply = export_mesh(parts, tmp_path / "shape.ply")
    loaded = trimesh.load(ply, process=False)
    assert len(loaded.faces) == 3 * 320
    colours = np.unique(loaded.visual.face_colors[:, :3], axis=0)
    assert len(colours) == 3
    np.testing.assert_allclose(loaded.vertices, parts.vertices.reshape(-1, 3), atol=1e-6)
    obj = export_mesh(parts, tmp_path / "shape.obj")
    text = obj.read_text()
    assert text.count("\no part_") == 3
    scene = trimesh.load(obj, process=False, group_material=False)
    total_faces = (
        sum(len(g.faces) for g in scene.geometry.values())
        if isinstance(scene, trimesh.Scene)
        else len(scene.faces)
    )
    assert total_faces == 3 * 320
    with pytest.raises(ValueError, match=r"must be \.ply or \.obj"):
        export_mesh(parts, tmp_path / "shape.stl")
