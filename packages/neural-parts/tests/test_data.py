"""Data: procedural shapes, mesh files, winding numbers, batches, caches and bad input."""

import numpy as np
import pytest
import torch
import trimesh

from verger.neural_parts import ModelConfig, NeuralParts, SampleConfig
from verger.neural_parts.data.batches import BatchStream, balanced_volume
from verger.neural_parts.data.meshfiles import (
    MeshFileError,
    NotWatertightError,
    file_samples,
    load_mesh,
    mesh_samples,
    shapenet_models,
)
from verger.neural_parts.data.procedural import part_implicits
from verger.neural_parts.data.samples import SampleSpec, ShapeSamples
from verger.neural_parts.data.sets import mesh_shapes, procedural_parts, procedural_shapes
from verger.neural_parts.data.winding import winding_numbers

SPEC = SampleSpec(n_surface=2000, n_volume=4000, voxel_resolution=8)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return procedural_shapes(
        3, seed=7, spec=SPEC, cache_dir=tmp_path_factory.mktemp("cache"), show_progress=False
    )


def test_procedural_shapes_have_known_parts_and_consistent_samples(shapes):
    for i, shape in enumerate(shapes):
        parts = procedural_parts(7, i)
        assert shape.n_parts == len(parts) >= 1
        assert set(np.unique(shape.surface_parts)) == set(range(len(parts)))
        # inside the unit cube (the longest side is normalised to 1)
        assert np.abs(shape.surface).max() <= 0.5 + 1e-3
        # the occupancy labels are the union of the parts
        g = part_implicits(parts, shape.volume).min(1)
        assert np.array_equal(shape.occupancy, g < 0)
        assert 0.02 < shape.inside_fraction < 0.6
        # surface points lie on the union's boundary and their normals point outward
        step = 0.01 * shape.normals
        outside = part_implicits(parts, shape.surface + step).min(1) > 0
        inside = part_implicits(parts, shape.surface - step).min(1) < 0
        assert outside.mean() > 0.97 and inside.mean() > 0.97
        assert shape.voxels.shape == (8, 8, 8)


def test_procedural_cache_is_reused_and_damage_is_named(tmp_path):
    first = procedural_shapes(1, seed=3, spec=SPEC, cache_dir=tmp_path, show_progress=False)
    (cache,) = tmp_path.glob("procedural-*.npz")
    mtime = cache.stat().st_mtime_ns
    again = procedural_shapes(1, seed=3, spec=SPEC, cache_dir=tmp_path, show_progress=False)
    assert cache.stat().st_mtime_ns == mtime  # loaded, not rebuilt
    np.testing.assert_array_equal(first[0].surface, again[0].surface)
    cache.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="damaged sample cache"):
        procedural_shapes(1, seed=3, spec=SPEC, cache_dir=tmp_path, show_progress=False)


def test_winding_numbers_of_a_closed_box():
    box = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    pts = np.array([[0, 0, 0], [0.45, 0.25, 0.15], [0.55, 0, 0], [0, 0.35, 0], [2, 2, 2]])
    w = winding_numbers(box.vertices, box.faces, pts)
    np.testing.assert_allclose(w, [1, 1, 0, 0, 0], atol=1e-9)


def _write(tmp_path, name, mesh):
    path = tmp_path / name
    mesh.export(path)
    return path


@pytest.mark.parametrize("suffix", [".obj", ".off", ".ply"])
def test_mesh_files_give_exact_occupancy(tmp_path, suffix):
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.5))  # normalised to 1 x 0.5 x 0.25
    mesh = load_mesh(_write(tmp_path, f"box{suffix}", box))
    samples = mesh_samples(mesh, SPEC, seed=0, name="box")
    inside = np.all(np.abs(samples.volume) < [0.5, 0.25, 0.125], axis=1)
    assert np.array_equal(samples.occupancy, inside)
    assert np.allclose(np.abs(samples.normals).sum(1), 1.0)  # axis-aligned face normals
    centre_side = (samples.surface * samples.normals).sum(1)
    assert (centre_side > 0).all()  # outward


def test_shapenet_style_folder_and_split_lists(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=1)
    for cat in ("02691156", "03001627"):
        for model in ("a1", "b2", "c3"):
            folder = tmp_path / cat / model
            folder.mkdir(parents=True)
            if model == "b2":
                (folder / "models").mkdir()
                sphere.export(folder / "models" / "model_normalized.obj")
            else:
                sphere.export(folder / "model.obj")
    (tmp_path / "02691156" / "test.lst").write_text("a1\nc3\n")
    all_models = shapenet_models(tmp_path)
    assert len(all_models) == 6
    assert all_models[1].name == "model_normalized.obj"
    test = shapenet_models(tmp_path, split="test", categories=["02691156"])
    assert [p.parent.name for p in test] == ["a1", "c3"]
    with pytest.raises(ValueError, match="not found"):
        shapenet_models(tmp_path, categories=["nope"])
    shapes = mesh_shapes(test, spec=SPEC, cache_dir=tmp_path / "cache", show_progress=False)
    assert all(0.3 < s.inside_fraction < 0.7 for s in shapes)  # a sphere in its cube: ~0.45


def test_bad_meshes_are_clear_errors(tmp_path):
    open_box = trimesh.creation.box()
    open_box.faces = open_box.faces[:-1]
    path = _write(tmp_path, "open.obj", open_box)
    with pytest.raises(NotWatertightError, match="not watertight"):
        file_samples(path, SPEC, cache_dir=tmp_path)
    for name, data in (
        ("bad.obj", b"v 0 0\nf 1 2 9\n"),
        ("bad.ply", b"ply\nformat binary\x00\xff"),
        ("bad.off", b""),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MeshFileError, match=name):
            load_mesh(tmp_path / name)
    with pytest.raises(MeshFileError, match="no such"):
        load_mesh(tmp_path / "missing.obj")
    with pytest.raises(MeshFileError, match="unsupported"):
        load_mesh(tmp_path / "x.stl")
    (tmp_path / "nan.obj").write_text(
        "v nan 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 3 4\nf 1 2 4\nf 2 3 4\n"
    )
    with pytest.raises(MeshFileError, match=r"nan\.obj"):
        load_mesh(tmp_path / "nan.obj")


def test_bad_model_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="n_primitives=0"):
        ModelConfig(n_primitives=0)
    with pytest.raises(ValueError, match="encoder='mesh'"):
        ModelConfig(encoder="mesh")
    model = NeuralParts(
        ModelConfig(
            n_primitives=2,
            feature_dim=8,
            embedding_dim=8,
            hidden=8,
            projection_dim=8,
            head_hidden=8,
        )
    )
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, 3))
    cloud = torch.rand(1, 10, 3)
    cloud[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(cloud)
    cond = model(torch.rand(1, 10, 3))
    with pytest.raises(ValueError, match="NaN"):
        model.implicit(cond, torch.full((1, 4, 3), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        model.implicit(cond, torch.rand(1, 4, 2))
    with pytest.raises(ValueError, match="empty"):
        ShapeSamples(
            name="x",
            surface=np.zeros((0, 3)),
            normals=np.zeros((0, 3)),
            volume=np.zeros((1, 3)),
            occupancy=np.zeros(1, bool),
            half_extent=0.55,
        )


def test_batches_are_a_function_of_the_step_and_resume_exactly(shapes):
    cfg = SampleConfig(n_surface=50, n_volume=64, n_sphere=20, n_input=32)
    a = BatchStream(shapes, samples=cfg, batch_size=2, seed=1)
    first = [next(a) for _ in range(3)]
    b = BatchStream(shapes, samples=cfg, batch_size=2, seed=1)
    b.load_state_dict({"step": 2, "seed": 1})
    assert torch.equal(next(b).volume, first[2].volume)
    other_rank = BatchStream(shapes, samples=cfg, batch_size=2, seed=1, rank=1)
    assert not torch.equal(other_rank.batch(0).surface, first[0].surface)
    with pytest.raises(ValueError, match="seed"):
        b.load_state_dict({"step": 0, "seed": 2})


def test_balanced_volume_weights_undo_the_balancing(shapes):
    shape = shapes[0]
    rng = np.random.default_rng(0)
    _, occ, w = balanced_volume(shape, 20_000, rng)
    assert occ.mean() == 0.5
    assert (w * occ).sum() / w.sum() == pytest.approx(shape.inside_fraction, rel=1e-6)


def test_wheel_meshes_are_found_without_importing_their_packages(tmp_path, monkeypatch):
    import sys

    fake = tmp_path / "site" / "pyvista"
    (fake / "examples").mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ImportError('importing pyvista is not allowed here')\n"
    )
    trimesh.creation.icosphere(subdivisions=1).export(fake / "examples" / "ant.ply")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    from verger.neural_parts.data.meshfiles import embedded_mesh_paths

    found = embedded_mesh_paths()
    assert found["ant"] == fake / "examples" / "ant.ply"
    assert "nut" not in found  # only files that exist
    assert "pyvista" not in sys.modules or sys.modules["pyvista"].__file__ != str(
        fake / "__init__.py"
    )
    samples = mesh_shapes([found["ant"]], spec=SPEC, cache_dir=tmp_path / "c", show_progress=False)
    assert 0.3 < samples[0].inside_fraction < 0.6
