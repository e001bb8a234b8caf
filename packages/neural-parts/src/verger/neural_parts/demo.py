"""``demo``: train Neural Parts on procedural shapes, reconstruct held-out shapes.

Writes ``model/`` (the trained model), ``train/`` (checkpoints and the loss log),
``meshes/`` (each held-out shape's parts as PLY and OBJ, one colour per part),
``reconstructions.png`` (ground-truth parts beside the predicted ones), ``loss.png`` and
the metric table (``metrics.json``, ``report.md``).
"""

from __future__ import annotations

import torch

from verger.core.bench import Report, new_figure
from verger.core.runs import Run
from verger.core.train import read_metrics
from verger.neural_parts.data.procedural import Part
from verger.neural_parts.data.samples import ShapeSamples
from verger.neural_parts.data.sets import default_cache_dir, procedural_parts, procedural_shapes
from verger.neural_parts.mesh import PartMeshes, export_mesh
from verger.neural_parts.metrics import ShapeResult, evaluate_shapes, mean_metrics
from verger.neural_parts.model import NeuralParts
from verger.neural_parts.render import render_panels
from verger.neural_parts.settings import DemoSettings, ModelOptions
from verger.neural_parts.train import TrainConfig, TrainResult, train

DATA_SEED = 0  # the procedural set; runs with other --seed values see the same shapes
HELD_OUT_FIRST = 100_000  # held-out shapes are far from every training index


def procedural_split(
    settings: ModelOptions, n_train: int, n_test: int
) -> tuple[list[ShapeSamples], list[ShapeSamples]]:
    """Training shapes 0..n_train-1 and held-out shapes from :data:`HELD_OUT_FIRST`."""
    cache = settings.cache_dir or default_cache_dir()
    spec = settings.sample_spec()
    train_shapes = procedural_shapes(n_train, seed=DATA_SEED, spec=spec, cache_dir=cache)
    test_shapes = procedural_shapes(
        n_test, seed=DATA_SEED, first=HELD_OUT_FIRST, spec=spec, cache_dir=cache
    )
    return train_shapes, test_shapes


def ground_truth_parts(n_test: int, subdivisions: int) -> list[list[Part]]:
    """The known parts of the held-out procedural shapes."""
    return [procedural_parts(DATA_SEED, HELD_OUT_FIRST + i) for i in range(n_test)]


def render_comparison(
    results: list[ShapeResult], parts: list[list[Part]], path: object, *, subdivisions: int
) -> None:
    """Ground truth (its known parts) and prediction side by side, two panels per shape."""
    panels: list[PartMeshes | list] = []
    titles = []
    for i, (result, gt) in enumerate(zip(results, parts)):
        panels += [[p.mesh(subdivisions) for p in gt], result.meshes]
        titles += [f"held-out {i}: {len(gt)} true parts", f"IoU {result.metrics['iou']:.2f}"]
    render_panels(panels, path, titles=titles, columns=4)  # type: ignore[arg-type]


def plot_losses(report: Report, log: object, name: str = "loss") -> None:
    """The total loss and its terms over the steps of a training log."""
    rows = read_metrics(log)  # type: ignore[arg-type]
    fig, ax = new_figure()
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="total", color="black")
    for key in ("reconstruction", "occupancy", "normal", "coverage", "overlap"):
        if rows and f"loss_{key}" in rows[0]:
            ax.plot(steps, [r[f"loss_{key}"] for r in rows], label=key, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (unweighted terms)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=7)
    report.plot(name, fig)


def train_model(
    settings: DemoSettings, run: Run, shapes: list[ShapeSamples]
) -> tuple[NeuralParts, TrainResult]:
    torch.manual_seed(run.seed)
    model = NeuralParts(settings.model_config())
    config = TrainConfig(
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        checkpoint_every=settings.checkpoint_every,
        seed=run.seed,
    )
    result = train(
        model,
        shapes,
        config=config,
        samples=settings.sample_config(),
        out=run.path("train"),
        device=run.device,
        resume=run.resumed,
        desc="neural parts",
    )
    return model, result


def run_demo(settings: DemoSettings, run: Run) -> Report:
    """Train on the procedural set, reconstruct held-out shapes, write renders and meshes."""
    report = run.report("verger-neural-parts demo")
    train_shapes, test_shapes = procedural_split(settings, settings.n_train, settings.n_test)
    model, trained = train_model(settings, run, train_shapes)
    model.save_pretrained(run.path("model"))
    results = evaluate_shapes(
        model,
        test_shapes,
        device=run.device,
        n_points=settings.eval_points,
        n_input=settings.n_input,
        subdivisions=settings.subdivisions,
        seed=run.seed,
    )
    meshes = run.path("meshes")
    for i, result in enumerate(results):
        export_mesh(result.meshes, meshes / f"heldout-{i}.ply")
        export_mesh(result.meshes, meshes / f"heldout-{i}.obj")
    gt = ground_truth_parts(settings.n_test, settings.subdivisions)
    render_comparison(results, gt, run.path("reconstructions.png"), subdivisions=3)
    means = mean_metrics(results)
    watertight = [m.is_watertight for r in results for m in r.meshes.parts()]
    report.metric("iou", means["iou"])
    report.metric("chamfer_l1", means["chamfer_l1"])
    report.metric("normal_consistency", means["normal_consistency"])
    report.metric("parts_used", means["parts_used"])  # of n_primitives; 1 = one blob
    report.metric("max_part_share", means["max_part_share"])
    report.metric("n_primitives", settings.n_primitives)
    report.metric("held_out_shapes", len(test_shapes))
    report.metric("train_shapes", len(train_shapes))
    report.metric("train_steps", settings.steps)
    report.metric("train_seconds", trained.seconds)
    report.metric("train_loss_final", trained.losses[-1] if trained.losses else float("nan"))
    report.metric("model_parameters", sum(p.numel() for p in model.parameters()))
    report.metric("watertight_part_fraction", sum(watertight) / len(watertight))
    report.table(
        "Held-out shapes (procedural, never trained on)",
        [
            {"shape": i, "true parts": s.n_parts, **{k: round(v, 4) for k, v in r.metrics.items()}}
            for i, (s, r) in enumerate(zip(test_shapes, results))
        ],
    )
    report.text("![reconstructions](reconstructions.png)")
    plot_losses(report, run.path("train") / "logs" / "metrics.jsonl")
    return report
