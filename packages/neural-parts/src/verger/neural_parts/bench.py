"""``bench``: Neural Parts against superquadric primitives, part counts, mesh extraction.

Every model has the same encoder, embeddings, data, steps, learning rate and batch draws;
only the primitive family (and, for ``iou_by_parts_<k>``, the number of parts) changes.
Scores are on held-out procedural shapes (and on the wheel meshes when installed). Mesh
extraction pushes an icosphere through the INN and is timed against marching cubes
(scikit-image's ``marching_cubes``) on the same implicit field G sampled on a grid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from verger.core.bench import Report, compare, new_figure
from verger.core.files import atomic_write_json
from verger.core.runs import Run
from verger.neural_parts.config import LossConfig
from verger.neural_parts.data.meshfiles import embedded_mesh_paths
from verger.neural_parts.data.samples import ShapeSamples
from verger.neural_parts.data.sets import default_cache_dir, mesh_shapes
from verger.neural_parts.demo import procedural_split
from verger.neural_parts.mesh import extract_meshes
from verger.neural_parts.metrics import ShapeResult, encode, evaluate_shapes, mean_metrics
from verger.neural_parts.model import NeuralParts
from verger.neural_parts.render import render_panels
from verger.neural_parts.settings import BenchSettings
from verger.neural_parts.train import TrainConfig, train

METRICS = ("iou", "chamfer_l1", "normal_consistency", "parts_used", "max_part_share")


def _train_one(
    settings: BenchSettings,
    run: Run,
    shapes: list[ShapeSamples],
    *,
    primitive: str,
    parts: int,
    seed: int,
) -> NeuralParts:
    name = f"{primitive}-{parts}parts-seed{seed}"
    torch.manual_seed(seed)
    model = NeuralParts(settings.model_config(primitive=primitive, n_primitives=parts))
    train(
        model,
        shapes,
        config=TrainConfig(
            steps=settings.steps,
            batch_size=settings.batch_size,
            lr=settings.lr,
            checkpoint_every=max(1, settings.steps // 4),
            seed=seed,
        ),
        samples=settings.sample_config(),
        loss=LossConfig(volume_distance=settings.volume_distance),
        out=run.path("models") / name,
        device=run.device,
        resume=run.resumed,
        desc=name,
    )
    return model


def _evaluate(
    settings: BenchSettings, run: Run, model: NeuralParts, shapes: list[ShapeSamples]
) -> list[ShapeResult]:
    return evaluate_shapes(
        model,
        shapes,
        device=run.device,
        n_points=settings.eval_points,
        n_input=settings.n_input,
        subdivisions=settings.subdivisions,
        seed=0,
    )


def marching_cubes_mesh(
    model: NeuralParts, cond: torch.Tensor, grid: int, half_extent: float, *, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """The union's zero level set by marching cubes on a ``grid``^3 sampling of G."""
    try:
        from skimage.measure import marching_cubes
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the marching-cubes baseline needs scikit-image: "
            "pip install 'verger-neural-parts[bench]'"
        ) from exc

    axis = torch.linspace(-half_extent, half_extent, grid, dtype=cond.dtype, device=cond.device)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3)
    with torch.no_grad():
        values = torch.cat([model.union(cond, c) for c in points.split(chunk, dim=1)], dim=1)
    field = values.reshape(grid, grid, grid).cpu().numpy()
    if field.min() >= 0 or field.max() <= 0:
        raise RuntimeError("the implicit field has no zero crossing inside the grid")
    step = 2 * half_extent / (grid - 1)
    verts, faces, _, _ = marching_cubes(field, level=0.0, spacing=(step, step, step))
    return verts - half_extent, faces


def _time_extraction(
    settings: BenchSettings, run: Run, model: NeuralParts, shape: ShapeSamples, report: Report
) -> None:
    cond = encode(model, shape, device=run.device, n_input=settings.n_input)
    candidates: dict[str, Callable[[], object]] = {
        "pushforward": lambda: extract_meshes(model, cond, subdivisions=settings.subdivisions),
        "marching_cubes": lambda: marching_cubes_mesh(
            model, cond, settings.grid, shape.half_extent
        ),
    }
    timings = compare(candidates, warmup=1, repeats=settings.repeats)
    push, mc = timings["pushforward"], timings["marching_cubes"]
    (meshes,) = extract_meshes(model, cond, subdivisions=settings.subdivisions)
    _, mc_faces = marching_cubes_mesh(model, cond, settings.grid, shape.half_extent)
    report.metric("mesh_extraction_ms", push.median_s * 1e3)
    report.metric("marching_cubes_ms", mc.median_s * 1e3)
    report.metric("mesh_extraction_speedup_vs_marching_cubes", push.speedup_over(mc))
    report.metric("mesh_extraction_faces", int(meshes.n_parts * len(meshes.faces)))
    report.metric("marching_cubes_faces", len(mc_faces))
    report.metric("marching_cubes_grid", settings.grid)
    report.timings(
        f"Mesh extraction: icosphere level {settings.subdivisions} pushed through 5 parts vs "
        f"marching cubes (scikit-image) on a {settings.grid}^3 grid of the same G",
        timings,
        baseline="marching_cubes",
    )


def _record(
    report: Report, prefix: str, suffix: str, runs: list[dict[str, float]]
) -> dict[str, float]:
    means = {k: float(np.mean([r[k] for r in runs])) for k in METRICS}
    for k in METRICS:
        report.metric(f"{prefix}{k}_{suffix}", means[k])
        if len(runs) > 1:
            report.metric(f"{prefix}{k}_{suffix}_std", float(np.std([r[k] for r in runs], ddof=1)))
    return means


def run_bench(settings: BenchSettings, run: Run) -> Report:
    """Train every model, score held-out shapes, time mesh extraction; write the report."""
    report = run.report("verger-neural-parts bench")
    train_shapes, test_shapes = procedural_split(settings, settings.n_train, settings.n_test)
    scores: dict[str, dict[str, float]] = {}
    models: dict[str, NeuralParts] = {}
    results: dict[str, list[ShapeResult]] = {}
    for seed in range(settings.seeds):
        for primitive in ("inn", "superquadric"):
            key = f"{primitive}-5-{seed}"
            models[key] = _train_one(
                settings, run, train_shapes, primitive=primitive, parts=5, seed=seed
            )
            results[key] = _evaluate(settings, run, models[key], test_shapes)
            scores[key] = mean_metrics(results[key])
    for parts in settings.part_counts:
        key = f"inn-{parts}-0"
        if key not in scores:
            model = _train_one(settings, run, train_shapes, primitive="inn", parts=parts, seed=0)
            scores[key] = mean_metrics(_evaluate(settings, run, model, test_shapes))
    seeds = range(settings.seeds)
    ours = _record(report, "", "5parts", [scores[f"inn-5-{s}"] for s in seeds])
    base = _record(
        report, "superquadric_", "5parts", [scores[f"superquadric-5-{s}"] for s in seeds]
    )
    # ratios of means measured in this run (IoU: > 1 favours Neural Parts; Chamfer: < 1 does)
    report.metric("iou_ratio_vs_superquadric_5parts", ours["iou"] / max(base["iou"], 1e-12))
    report.metric(
        "chamfer_l1_ratio_vs_superquadric_5parts",
        ours["chamfer_l1"] / max(base["chamfer_l1"], 1e-12),
    )
    report.metric("neural_parts_better_iou", ours["iou"] > base["iou"])
    report.metric("neural_parts_better_chamfer_l1", ours["chamfer_l1"] < base["chamfer_l1"])
    report.metric(
        "iou_wins_5parts",
        sum(scores[f"inn-5-{s}"]["iou"] > scores[f"superquadric-5-{s}"]["iou"] for s in seeds),
    )
    report.metric("seeds", settings.seeds)
    for parts in settings.part_counts:
        report.metric(f"iou_by_parts_{parts}", scores[f"inn-{parts}-0"]["iou"])
        report.metric(f"chamfer_l1_by_parts_{parts}", scores[f"inn-{parts}-0"]["chamfer_l1"])
    report.metric("train_steps", settings.steps)
    report.metric("held_out_shapes", len(test_shapes))
    report.table(
        "Held-out procedural shapes (mean over shapes; 5 parts per seed, then by part count)",
        [{"model": k, **{m: round(v, 4) for m, v in s.items()}} for k, s in scores.items()],
    )
    _time_extraction(settings, run, models["inn-5-0"], test_shapes[0], report)
    if settings.embedded:
        _embedded(settings, run, models, report)
    _plots(settings, run, report, scores, results)
    atomic_write_json(run.path("scores.json"), scores)
    return report


def _embedded(
    settings: BenchSettings, run: Run, models: dict[str, NeuralParts], report: Report
) -> None:
    paths = embedded_mesh_paths()
    if not paths:
        report.text(
            "Wheel meshes: not installed (`pip install 'verger-neural-parts[meshes]'`); skipped."
        )
        return
    cache = settings.cache_dir or default_cache_dir()
    shapes = mesh_shapes(list(paths.values()), spec=settings.sample_spec(), cache_dir=cache)
    rows = []
    for label, key in (("", "inn-5-0"), ("superquadric_", "superquadric-5-0")):
        res = _evaluate(settings, run, models[key], shapes)
        means = mean_metrics(res)
        for k in ("iou", "chamfer_l1"):
            report.metric(f"embedded_{label}{k}_5parts", means[k])
        rows += [{"model": key, "mesh": n, **r.metrics} for n, r in zip(paths, res)]
    report.metric("embedded_shapes", len(shapes))
    report.table("Wheel meshes (out of the training distribution)", rows)


def _plots(
    settings: BenchSettings,
    run: Run,
    report: Report,
    scores: dict[str, dict[str, float]],
    results: dict[str, list[ShapeResult]],
) -> None:
    fig, ax = new_figure()
    counts = list(settings.part_counts)
    ax.plot(counts, [scores[f"inn-{k}-0"]["iou"] for k in counts], "o-", label="Neural Parts")
    ax.axhline(
        scores["superquadric-5-0"]["iou"], color="grey", ls="--", label="superquadrics, 5 parts"
    )
    ax.set_xlabel("parts")
    ax.set_ylabel("held-out volumetric IoU")
    ax.legend()
    report.plot("iou_by_parts", fig)
    n = min(4, len(results["inn-5-0"]))
    panels, titles = [], []
    for i in range(n):
        for key, label in (("inn-5-0", "Neural Parts"), ("superquadric-5-0", "superquadrics")):
            panels.append(results[key][i].meshes)
            titles.append(f"{label}: IoU {results[key][i].metrics['iou']:.2f}")
    render_panels(panels, run.path("parts.png"), titles=titles, columns=4)
    report.text("![parts](parts.png)")
