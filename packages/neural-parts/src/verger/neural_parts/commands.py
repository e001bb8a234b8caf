"""``train``, ``reconstruct``, ``export`` and ``render``: the commands around a saved model.

``train`` fits a model on procedural shapes or on a ShapeNet-style folder and saves it to
``<out>/model``; under ``torchrun --nproc-per-node N`` every rank trains (DDP) in the same
run folder: rank 0 owns it (verger-core's run rules) and alone writes the checkpoints, the
log and the model; the other ranks follow its decision (fresh or resumed) and read its
checkpoints when resuming.
The other three load ``--model`` (default: the default ``train`` run's model) and process
``--inputs``: held-out procedural shapes, one mesh file, or a ShapeNet-style folder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import trimesh

from verger.core.bench import Report
from verger.core.distributed import all_gather_object
from verger.core.runs import Run
from verger.neural_parts.data.meshfiles import (
    MESH_SUFFIXES,
    load_mesh,
    normalize_mesh,
    shapenet_models,
)
from verger.neural_parts.data.samples import ShapeSamples
from verger.neural_parts.data.sets import (
    default_cache_dir,
    mesh_shapes,
    procedural_parts,
    procedural_shapes,
)
from verger.neural_parts.demo import DATA_SEED, plot_losses
from verger.neural_parts.mesh import PartMeshes, export_mesh, extract_meshes
from verger.neural_parts.metrics import encode, evaluate_shapes, mean_metrics
from verger.neural_parts.model import NeuralParts
from verger.neural_parts.render import render_panels
from verger.neural_parts.settings import (
    ExportSettings,
    ReconstructSettings,
    RenderSettings,
    ShapesOptions,
    TrainSettings,
)
from verger.neural_parts.train import train


def _training_shapes(settings: TrainSettings) -> list[ShapeSamples]:
    cache = settings.cache_dir or default_cache_dir()
    if settings.data == "procedural":
        return procedural_shapes(
            settings.n_shapes, seed=DATA_SEED, spec=settings.sample_spec(), cache_dir=cache
        )
    files = shapenet_models(settings.data, split=settings.split)[: settings.n_shapes]
    return mesh_shapes(files, spec=settings.sample_spec(), cache_dir=cache)


def parameter_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes (equal models, equal digests)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_train(settings: TrainSettings, run: Run) -> Report:
    """Train a model (DDP under torchrun); save it to ``<out>/model``."""
    shapes = _training_shapes(settings)
    torch.manual_seed(run.seed)
    model = NeuralParts(
        settings.model_config(primitive=settings.primitive, sphere_radius=settings.sphere_radius)
    )
    result = train(
        model,
        shapes,
        config=settings.train_config(run.seed),
        samples=settings.sample_config(),
        loss=settings.loss_config(),
        out=run.path("train"),  # ranks > 0 only read its checkpoints (see train())
        device=run.device,
        resume=run.resumed,
    )
    report = run.report("verger-neural-parts train")
    if run.leader:
        model.save_pretrained(run.path("model"))
        plot_losses(report, run.path("train") / "logs" / "metrics.jsonl")
    report.metric("train_shapes", len(shapes))
    report.metric("train_steps", settings.steps)
    report.metric("steps_run", result.steps_run)
    report.metric("world_size", result.world_size)
    if result.world_size > 1:  # DDP keeps every rank's weights equal; check it (a collective)
        digests = all_gather_object(parameter_digest(model))
        report.metric("ranks_in_sync", len(set(digests)) == 1)
    report.metric("train_seconds", result.seconds)
    report.metric("model_parameters", sum(p.numel() for p in model.parameters()))
    for name, value in result.terms.items():
        report.metric(f"loss_{name}_final", value)
    return report


@dataclass
class _Inputs:
    shapes: list[ShapeSamples]
    ground_truth: list[list[trimesh.Trimesh]]  # known parts, or the normalised mesh
    names: list[str]


def _inputs(settings: ShapesOptions) -> _Inputs:
    cache = settings.cache_dir or default_cache_dir()
    source = settings.inputs
    if source == "procedural":
        shapes = procedural_shapes(
            settings.n_shapes, seed=DATA_SEED, first=settings.first, cache_dir=cache
        )
        gt = [
            [p.mesh(3) for p in procedural_parts(DATA_SEED, settings.first + i)]
            for i in range(settings.n_shapes)
        ]
        return _Inputs(shapes, gt, [s.name for s in shapes])
    path = Path(source)
    if path.is_file() and path.suffix.lower() in MESH_SUFFIXES:
        files = [path]
    elif path.is_dir():
        files = shapenet_models(path)[: settings.n_shapes]
    else:
        raise ValueError(
            f"inputs={source!r} is neither 'procedural', a mesh file ({', '.join(MESH_SUFFIXES)}) "
            "nor a ShapeNet-style folder"
        )
    shapes = mesh_shapes(files, cache_dir=cache)
    gt = [[normalize_mesh(load_mesh(f))] for f in files]
    names = [f.parent.name if f.stem.startswith("model") else f.stem for f in files]
    return _Inputs(shapes, gt, names)


def _model(settings: ShapesOptions, device: torch.device) -> NeuralParts:
    if not (settings.model / "config.json").is_file():
        raise FileNotFoundError(
            f"model={str(settings.model)!r} holds no saved model: train one first "
            "(python -m verger.neural_parts train) or pass --model <train out>/model"
        )
    return NeuralParts.from_pretrained(settings.model, device=device).eval()


def _predict(
    model: NeuralParts, inputs: _Inputs, settings: ShapesOptions, device: torch.device
) -> list[PartMeshes]:
    out = []
    for shape in inputs.shapes:
        cond = encode(model, shape, device=device)
        out += extract_meshes(model, cond, subdivisions=settings.subdivisions)
    return out


def _render(
    inputs: _Inputs, meshes: list[PartMeshes], path: Path, columns: int, labels: list[str]
) -> None:
    panels: list[PartMeshes | list[trimesh.Trimesh]] = []
    titles, grey = [], []
    for name, gt, pred, label in zip(inputs.names, inputs.ground_truth, meshes, labels):
        panels += [gt, pred]
        titles += [f"{name}: input", label]
        grey += [len(gt) == 1, False]
    render_panels(panels, path, titles=titles, columns=2 * max(1, columns // 2), grey=grey)


def run_reconstruct(settings: ReconstructSettings, run: Run) -> Report:
    """Meshes, renders and metrics (IoU, Chamfer-L1, normal consistency) of a saved model."""
    model = _model(settings, run.device)
    inputs = _inputs(settings)
    results = evaluate_shapes(
        model,
        inputs.shapes,
        device=run.device,
        n_points=settings.eval_points,
        subdivisions=settings.subdivisions,
        seed=run.seed,
    )
    folder = run.path("meshes")
    for name, result in zip(inputs.names, results):
        export_mesh(result.meshes, folder / f"{name}.ply")
    labels = [f"{model.n_primitives} parts, IoU {r.metrics['iou']:.2f}" for r in results]
    _render(inputs, [r.meshes for r in results], run.path("reconstructions.png"), 4, labels)
    report = run.report("verger-neural-parts reconstruct")
    for key, value in mean_metrics(results).items():
        report.metric(key, value)
    report.metric("shapes", len(results))
    report.table("Shapes", [{"shape": n, **r.metrics} for n, r in zip(inputs.names, results)])
    report.text("![reconstructions](reconstructions.png)")
    return report


def run_export(settings: ExportSettings, run: Run) -> dict[str, float]:
    """Write each shape's part meshes (one colour per part) as PLY or OBJ under ``meshes/``."""
    model = _model(settings, run.device)
    inputs = _inputs(settings)
    meshes = _predict(model, inputs, settings, run.device)
    folder = run.path("meshes")
    for name, parts in zip(inputs.names, meshes):
        export_mesh(parts, folder / f"{name}.{settings.format}")
    watertight = [m.is_watertight for parts in meshes for m in parts.parts()]
    return {
        "shapes": len(meshes),
        "parts_per_shape": model.n_primitives,
        "faces_per_part": len(meshes[0].faces),
        "watertight_part_fraction": sum(watertight) / len(watertight),
    }


def run_render(settings: RenderSettings, run: Run) -> dict[str, float]:
    """A PNG of each shape's input beside its predicted parts (``render.png``)."""
    model = _model(settings, run.device)
    inputs = _inputs(settings)
    meshes = _predict(model, inputs, settings, run.device)
    labels = [f"{model.n_primitives} parts" for _ in meshes]
    _render(inputs, meshes, run.path("render.png"), settings.columns, labels)
    return {"shapes_rendered": len(meshes)}
