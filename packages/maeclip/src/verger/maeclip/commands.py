"""The commands ``demo``, ``compare`` and ``train``: ``run_x(settings, run) -> Report``.

Each receives its validated settings (:mod:`verger.maeclip.settings`) and an open run folder
(:class:`verger.core.runs.Run`: ``run.device``, ``run.seed``, ``run.resumed``, ``run.path``),
writes under it and returns the report whose metrics become ``metrics.json``. The comparison
commands train each method under ``methods/<name>/`` (metrics log + checkpoints), so
``--resume`` continues an interrupted comparison method by method.

Under ``torchrun`` every rank runs the command line and verger-core's run folder lets rank 0
decide (fresh, resumed, finished or refused) while the others follow: ``train`` joins the
process group and trains on every rank; the comparisons run on rank 0 alone
(:func:`leader_only`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from verger.core.bench import Report
from verger.core.distributed import DistInfo, destroy_distributed, init_distributed
from verger.core.runs import Run, launch_id
from verger.maeclip.data import ImageTextSet
from verger.maeclip.experiment import (
    MethodResult,
    comparison_rows,
    evaluate_method,
    load_train_data,
    loss_curves_figure,
    retrieval_grid_figure,
    run_comparison,
    split_embedded,
    variant_config,
)
from verger.maeclip.settings import CompareSettings, DemoSettings, ModelSettings, TrainSettings
from verger.maeclip.towers import CaptionTokenizer, image_size
from verger.maeclip.train import load_finished, train

S = TypeVar("S")


def leader_only(
    fn: Callable[[S, Run], Report],
) -> Callable[[S, Run], Report | dict[str, float]]:
    """``fn`` on rank 0 alone: under torchrun the other ranks end at once with no metrics
    (they would train the same methods into the same folders; rank 0 writes the report)."""

    @functools.wraps(fn)
    def on_rank_zero(settings: S, run: Run) -> Report | dict[str, float]:
        return fn(settings, run) if run.leader else {}

    return on_rank_zero


def join_group(device: torch.device) -> DistInfo:
    """Join torchrun's process group (a no-op outside torchrun): gloo on CPU; NCCL on CUDA,
    where each rank takes ``cuda:LOCAL_RANK``."""
    cuda = device.type == "cuda"
    under_torchrun = launch_id()[1] is not None
    return init_distributed(
        "nccl" if cuda else "gloo", device=None if cuda and under_torchrun else device
    )


def plot(run: Run, report: Report, name: str, fig: Any) -> None:
    """``report.plot`` with the PNG recorded as the run's own first (so ``--overwrite`` and
    a killed run's leftovers are accounted for)."""
    run.path(f"{name}.png")
    report.plot(name, fig)


def compare_methods(
    settings: ModelSettings, run: Run, report: Report, methods: Sequence[str]
) -> tuple[dict[str, MethodResult], ImageTextSet]:
    """Train and evaluate ``methods`` alike; their figures, table and loss curves go into
    ``report``. Returns the results and the held-out set."""
    base = settings.model_config()
    data = settings.data_name()
    train_set, test_set = split_embedded(
        data, image_size=image_size(base.model_name), test_size=1000, seed=run.seed
    )
    cfg = settings.train_config(seed=run.seed, device=str(run.device))
    results = run_comparison(
        base=base,
        train_cfg=cfg,
        train_set=train_set,
        test_set=test_set,
        methods=methods,
        out_dir=run.path("methods"),
        checkpoint_every=settings.checkpoint_every,
        resume=run.resumed,
    )
    for name, r in results.items():
        for key, value in r.metrics.items():
            report.metric(f"{key}_{name}", float(value))
    for metric in ("zero_shot_acc", "linear_probe_acc"):
        if f"{metric}_maeclip" in report.metrics and f"{metric}_clip" in report.metrics:
            gain = float(report.metrics[f"{metric}_maeclip"]) - float(
                report.metrics[f"{metric}_clip"]
            )
            report.metric(f"{metric}_gain_maeclip_vs_clip", gain)
    report.metric("steps", cfg.steps)
    report.metric("batch_size", cfg.batch_size)
    report.metric("train_pairs", len(train_set))
    report.metric("test_pairs", len(test_set))
    report.text(
        f"Data: `{data}` ({len(train_set)} train / {len(test_set)} held-out pairs); model "
        f"`{base.model_name}`; {cfg.steps} steps of batch {cfg.batch_size} on {run.device}, "
        f"seed {run.seed} for every method; mask ratio {base.mask_ratio}, MAE weight "
        f"{base.mae_weight}, contrastive input `{base.contrastive_input}`. Zero-shot uses prompt "
        "templates unseen in training; the linear probe is a logistic regression on frozen "
        "encoder features (pooled token + mean patch token); retrieval recall@k on 500 "
        "held-out pairs."
    )
    report.table("CLIP vs MAE vs MAE+CLIP", comparison_rows(results))
    plot(run, report, "loss_curves", loss_curves_figure(results))
    return results, test_set


def run_compare(settings: CompareSettings, run: Run) -> Report:
    """``compare``: the chosen methods with every knob exposed."""
    report = run.report("verger-maeclip: CLIP vs MAE vs MAE+CLIP")
    compare_methods(settings, run, report, settings.methods)
    return report


def run_demo(settings: DemoSettings, run: Run) -> Report:
    """``demo``: CLIP, MAE and MAE+CLIP; table, loss curves and a text-to-image retrieval grid."""
    report = run.report("verger-maeclip demo: does MAE help CLIP at small scale?")
    results, test_set = compare_methods(settings, run, report, ("clip", "mae", "maeclip"))
    if test_set.class_names:
        queries = [f"a handwritten digit {n}" for n in test_set.class_names[2:8:2]]
    else:
        queries = list(dict.fromkeys(test_set.captions))[:3]
    shown = test_set.subset(range(min(500, len(test_set))))
    plot(run, report, "retrieval_grid", retrieval_grid_figure(results, shown, queries))
    return report


def run_train(settings: TrainSettings, run: Run) -> Report | dict[str, float]:
    """``train``: one method; under ``torchrun`` every rank trains (rank 0 reports).

    Metrics go to ``metrics.jsonl`` and checkpoints to ``checkpoints/`` in the run folder;
    ``--resume`` continues from the latest checkpoint (or, when training had finished, only
    evaluates). A CSV's images are all decoded first (``check_images``).
    """
    info = join_group(run.device)
    try:
        base = variant_config(settings.model_config(), settings.method)
        data = settings.data_name()
        train_set, test_set = load_train_data(
            data,
            image_size=image_size(base.model_name),
            seed=run.seed,
            check_images=settings.check_images and run.leader,
        )
        for name in ("metrics.jsonl", "checkpoints", "tb"):
            run.path(name)  # what train() writes into the run folder
        cfg = settings.train_config(
            seed=run.seed,
            device=str(info.device),
            out_dir=run.folder,
            checkpoint_every=settings.checkpoint_every,
            log_every=settings.log_every,
            num_workers=settings.num_workers,
            desc=settings.method,
        )
        result = load_finished(base, cfg) if run.resumed else None
        if result is None:
            result = train(base, cfg, train_set, resume=run.resumed)
    finally:
        if info.world_size > 1:
            destroy_distributed()
    if not run.leader:
        return {}  # rank 0 writes the report
    report = run.report(f"verger-maeclip train: {settings.method}")
    report.metric("images_per_s", result.images_per_s)
    report.metric("world_size", info.world_size)
    for key, value in result.history[-1].items():
        report.metric(f"final_{key}", int(value) if key == "step" else float(value))
    if isinstance(train_set, ImageTextSet) and test_set is not None:
        tok = CaptionTokenizer(result.model.context_length)
        figures = evaluate_method(
            result.model, tok, train_set, test_set, contrastive=base.clip_weight > 0
        )
        report.metrics_from(figures)
    report.text(
        f"`{settings.method}` on `{data}`, model `{base.model_name}`, {cfg.steps} steps of "
        f"global batch {cfg.batch_size} on {info.world_size} rank(s), device {info.device}."
    )
    return report
