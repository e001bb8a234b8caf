"""Meshes from files (OBJ / OFF / PLY through trimesh), ShapeNet-style folders, wheel meshes.

- :func:`load_mesh`: read and check one file; a missing, unreadable, empty or NaN-holding
  file raises :class:`MeshFileError` naming it.
- :func:`mesh_samples`: normalise into the unit cube and build the pools; the occupancy
  comes from generalized winding numbers and needs a closed mesh
  (:class:`NotWatertightError` otherwise, with the usual remedy).
- :func:`shapenet_models`: the model files of a ShapeNet-style folder
  ``root/<category>/<model_id>/...`` (ShapeNetCore v1 ``model.obj``, v2
  ``models/model_normalized.obj``, Occupancy-Networks watertight ``*.off``), with
  ``<category>/<split>.lst`` splits when present.
- :func:`embedded_mesh_paths`: the closed meshes shipped inside the ``pymeshlab`` and
  ``pyvista`` wheels (the ``meshes`` extra), found without importing either package.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import trimesh

from verger.neural_parts.data.samples import (
    SampleSpec,
    ShapeSamples,
    cache_key,
    cached_samples,
    volume_samples,
)
from verger.neural_parts.data.winding import inside_mesh

MESH_SUFFIXES = (".obj", ".off", ".ply")


class MeshFileError(ValueError):
    """A mesh file is missing, unreadable or holds no usable triangles."""


class NotWatertightError(ValueError):
    """Occupancy needs a closed mesh and this one has holes or non-manifold edges."""


def load_mesh(path: str | Path) -> trimesh.Trimesh:
    """Read a triangle mesh (``.obj``, ``.off``, ``.ply``; scenes are merged into one mesh)."""
    path = Path(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise MeshFileError(f"{path}: unsupported mesh format {path.suffix!r}; use {MESH_SUFFIXES}")
    if not path.is_file():
        raise MeshFileError(f"{path}: no such mesh file")
    try:
        # process=False: trimesh's cleanup would silently drop NaN vertices and their faces
        mesh = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types on garbage input
        raise MeshFileError(f"{path}: unreadable mesh ({type(exc).__name__}: {exc})") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0 or len(mesh.vertices) < 3:
        raise MeshFileError(f"{path}: holds no triangles (corrupt or empty mesh file)")
    if not np.isfinite(mesh.vertices).all():
        raise MeshFileError(f"{path}: vertices hold NaN or infinite coordinates")
    mesh.process()  # merge duplicate vertices (OBJ/STL-style files split them per face)
    if mesh.area <= 0:
        raise MeshFileError(f"{path}: all triangles are degenerate (zero area)")
    return mesh


def normalize_mesh(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy centred on its bounding box, scaled so its longest side is 1."""
    out = mesh.copy()
    lo, hi = out.bounds
    extent = float(np.max(hi - lo))
    if not extent > 0:
        raise MeshFileError("the mesh has zero extent")
    out.apply_translation(-(lo + hi) / 2)
    out.apply_scale(1.0 / extent)
    return out


def require_watertight(mesh: trimesh.Trimesh, name: str) -> None:
    """Raise :class:`NotWatertightError` unless ``mesh`` is closed and consistently wound."""
    if not (mesh.is_watertight and mesh.is_winding_consistent):
        raise NotWatertightError(
            f"{name}: the mesh is not watertight (open boundary or non-manifold edges), so "
            "inside/outside is undefined; make it watertight first (e.g. ManifoldPlus, or the "
            "Occupancy Networks preprocessing) or use a closed mesh"
        )


def mesh_samples(mesh: trimesh.Trimesh, spec: SampleSpec, *, seed: int, name: str) -> ShapeSamples:
    """Pools of a (closed) mesh after :func:`normalize_mesh`."""
    require_watertight(mesh, name)
    mesh = normalize_mesh(mesh)
    if mesh.volume < 0:  # inside-out winding: flip so that normals point outward
        mesh.invert()
    rng = np.random.default_rng(seed)
    surface, faces = trimesh.sample.sample_surface(mesh, spec.n_surface, seed=rng)
    normals = mesh.face_normals[faces]
    volume, occupancy, voxels = volume_samples(
        lambda x: inside_mesh(mesh.vertices, mesh.faces, x), spec, rng
    )
    return ShapeSamples(
        name=name,
        surface=surface.astype(np.float32),
        normals=normals.astype(np.float32),
        volume=volume,
        occupancy=occupancy,
        half_extent=spec.half_extent,
        voxels=voxels,
    )


def file_samples(
    path: str | Path, spec: SampleSpec, *, cache_dir: Path, seed: int = 0
) -> ShapeSamples:
    """:func:`mesh_samples` of a file, cached under ``cache_dir`` by content and settings."""
    path = Path(path)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise MeshFileError(f"{path}: cannot read ({exc})") from None
    target = cache_dir / f"mesh-{cache_key(digest, spec.key(), str(seed))}.npz"
    return cached_samples(
        target, lambda: mesh_samples(load_mesh(path), spec, seed=seed, name=path.stem)
    )


def shapenet_models(
    root: str | Path, *, split: str | None = None, categories: list[str] | None = None
) -> list[Path]:
    """Model files of a ShapeNet-style folder, sorted; one file per model folder.

    ``root/<category>/<model_id>/`` holds the mesh (searched in the order
    ``models/model_normalized.obj``, ``model.obj``, ``model.off``, then the first
    ``*.obj|*.off|*.ply`` found). With ``split``, ``root/<category>/<split>.lst`` lists the
    model ids to keep (categories without that file keep every model).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    chosen = sorted(p for p in root.iterdir() if p.is_dir())
    if categories is not None:
        missing = sorted(set(categories) - {p.name for p in chosen})
        if missing:
            raise ValueError(f"categories {missing} not found under {root}")
        chosen = [p for p in chosen if p.name in categories]
    found: list[Path] = []
    for category in chosen:
        keep = None
        if split is not None and (category / f"{split}.lst").is_file():
            keep = set((category / f"{split}.lst").read_text().split())
        for model in sorted(p for p in category.iterdir() if p.is_dir()):
            if keep is not None and model.name not in keep:
                continue
            mesh_file = _model_file(model)
            if mesh_file is not None:
                found.append(mesh_file)
    if not found:
        raise ValueError(
            f"{root}: no mesh files found (expected <category>/<model_id>/*.obj|off|ply)"
        )
    return found


def _model_file(folder: Path) -> Path | None:
    for candidate in ("models/model_normalized.obj", "model.obj", "model.off"):
        if (folder / candidate).is_file():
            return folder / candidate
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in MESH_SUFFIXES)
    return files[0] if files else None


# Closed meshes inside the wheels (checked watertight with trimesh 4/5).
_WHEEL_MESHES = {
    "pymeshlab": {
        "airplane": "tests/sample_meshes/airplane.obj",
        "bone": "tests/sample_meshes/bone.ply",
        "bunny": "tests/sample_meshes/bunny.obj",
        "cow": "tests/sample_meshes/cow.obj",
    },
    "pyvista": {"ant": "examples/ant.ply", "nut": "examples/nut.ply"},
}


def embedded_mesh_paths() -> dict[str, Path]:
    """Name -> file of the wheel meshes installed here (possibly empty).

    The packages are located with ``importlib.util.find_spec`` and never imported (pyvista
    would import VTK): ``pip install --no-deps pyvista`` is enough for its meshes.
    """
    found: dict[str, Path] = {}
    for package, files in _WHEEL_MESHES.items():
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        base = Path(next(iter(spec.submodule_search_locations)))
        for name, rel in files.items():
            if (base / rel).is_file():
                found[name] = base / rel
    return found
