"""The paper's experiment in miniature: train CLIP, MAE and MAE+CLIP alike, evaluate, tabulate."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from verger.core.train import read_metrics
from verger.maeclip.data import (
    CsvImageText,
    ImageTextSet,
    WebDatasetShards,
    denormalize_images,
    emoji_pairs,
    find_emoji_font,
    mnist_pairs,
    train_test_split,
)
from verger.maeclip.evaluate import (
    image_embeddings,
    linear_probe_accuracy,
    retrieval_recall,
    text_embeddings,
    zero_shot_accuracy,
)
from verger.maeclip.model import MAECLIP, MAECLIPConfig
from verger.maeclip.towers import CaptionTokenizer
from verger.maeclip.train import TrainConfig, TrainResult, load_finished, train

# name -> overrides of the base MAECLIPConfig; "maeclip_masked" is the FLIP-style variant whose
# contrastive branch reuses the MAE encoder pass on the masked image.
VARIANTS: dict[str, dict[str, Any]] = {
    "clip": {"clip_weight": 1.0, "mae_weight": 0.0},
    "mae": {"clip_weight": 0.0, "mae_weight": 1.0},
    "maeclip": {"clip_weight": 1.0, "mae_weight": 1.0, "contrastive_input": "full"},
    "maeclip_masked": {"clip_weight": 1.0, "mae_weight": 1.0, "contrastive_input": "masked"},
}


def variant_config(base: MAECLIPConfig, name: str) -> MAECLIPConfig:
    """``base`` with the weights/contrastive input of variant ``name`` (see VARIANTS)."""
    if name not in VARIANTS:
        raise ValueError(f"variant {name!r} is not one of {list(VARIANTS)}")
    overrides = dict(VARIANTS[name])
    if name.startswith("maeclip") and base.mae_weight > 0 and base.clip_weight > 0:
        overrides.pop("mae_weight")  # keep a swept MAE weight for the combined runs
    return replace(base, **overrides)


@dataclass
class MethodResult:
    """One trained method: its figures (``metrics``), loss history and the model."""

    name: str
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    model: MAECLIP | None = None


def load_embedded(name: str, *, image_size: int, seed: int = 0) -> ImageTextSet:
    """'mnist' (always available) or 'emoji' (needs an emoji font and the emoji package)."""
    if name == "mnist":
        return mnist_pairs(image_size=image_size, seed=seed)
    if name == "emoji":
        return emoji_pairs(image_size=image_size)
    raise ValueError(f"data={name!r} must be 'mnist' or 'emoji'")


def default_data() -> str:
    """'emoji' if the colour-emoji font and names are installed, else 'mnist'."""
    try:
        import emoji  # noqa: F401
    except ImportError:
        return "mnist"
    return "emoji" if find_emoji_font() is not None else "mnist"


def evaluate_method(
    model: MAECLIP,
    tokenizer: CaptionTokenizer,
    train_set: ImageTextSet,
    test_set: ImageTextSet,
    *,
    contrastive: bool,
    probe_train: int = 2000,
    retrieval_size: int = 500,
) -> dict[str, float]:
    """Zero-shot (contrastive models, labelled data), linear probe (labelled), retrieval."""
    out: dict[str, float] = {}
    labelled = test_set.labels is not None and train_set.labels is not None
    if contrastive and labelled and test_set.class_names:
        out["zero_shot_acc"] = zero_shot_accuracy(model, tokenizer, test_set)
    if labelled:
        probe = train_set.subset(range(min(probe_train, len(train_set))))
        out["linear_probe_acc"] = linear_probe_accuracy(model, probe, test_set)
    if contrastive:
        subset = test_set.subset(range(min(retrieval_size, len(test_set))))
        recall = retrieval_recall(model, tokenizer, subset, ks=(1, 5))
        out |= {k.replace("@", ""): v for k, v in recall.items()}
    return out


def run_comparison(
    *,
    base: MAECLIPConfig,
    train_cfg: TrainConfig,
    train_set: ImageTextSet,
    test_set: ImageTextSet,
    methods: Sequence[str] = ("clip", "mae", "maeclip"),
    out_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
) -> dict[str, MethodResult]:
    """Train every method for the same steps from the same seed; evaluate each alike.

    With ``out_dir``, each method logs every step and checkpoints under ``out_dir/<method>``
    (every ``checkpoint_every`` steps and at the end), and ``resume=True`` continues each
    from its latest checkpoint (a method already trained is loaded, not trained again).
    """
    tokenizer = CaptionTokenizer.for_model(base.model_name)
    results = {}
    for name in methods:
        cfg = variant_config(base, name)
        folder = Path(out_dir) / name if out_dir is not None else None
        method_cfg = replace(
            train_cfg,
            desc=name,
            out_dir=folder,
            log_every=1 if folder is not None else train_cfg.log_every,
            checkpoint_every=checkpoint_every if folder is not None else 0,
        )
        run: TrainResult | None = load_finished(cfg, method_cfg) if resume else None
        if run is None:
            run = train(cfg, method_cfg, train_set, resume=resume)
        metrics = evaluate_method(
            run.model, tokenizer, train_set, test_set, contrastive=cfg.clip_weight > 0
        )
        metrics["images_per_s"] = run.images_per_s
        last = run.history[-1]
        for key in ("clip_loss", "mae_loss"):
            if key in last:
                metrics[f"final_{key}"] = last[key]
        # a resumed method's own history starts at its checkpoint: the log has every step
        history = read_metrics(folder / "metrics.jsonl") if folder is not None else run.history
        results[name] = MethodResult(name, metrics, history, run.model)
    return results


def comparison_rows(results: dict[str, MethodResult]) -> list[dict[str, Any]]:
    """One table row per method (missing figures shown as '-')."""
    columns = [
        "zero_shot_acc",
        "linear_probe_acc",
        "i2t_r1",
        "t2i_r1",
        "final_clip_loss",
        "final_mae_loss",
        "images_per_s",
    ]
    return [
        {"method": name, **{c: r.metrics.get(c, "-") for c in columns}}
        for name, r in results.items()
    ]


def loss_curves_figure(results: dict[str, MethodResult]) -> Any:
    """Contrastive and MAE losses against step for every method (two panels)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in zip(
        axes, ("clip_loss", "mae_loss"), ("contrastive loss", "MAE loss (masked patches)")
    ):
        for name, r in results.items():
            points = [(h["step"], h[key]) for h in r.history if key in h]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=name, lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


@torch.no_grad()
def retrieval_grid_figure(
    results: dict[str, MethodResult],
    test_set: ImageTextSet,
    queries: Sequence[str],
    *,
    top_k: int = 6,
) -> Any:
    """Text -> image retrieval: for each contrastive method and query, the top-k test images."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    models = {
        n: r.model for n, r in results.items() if r.model is not None and "i2t_r1" in r.metrics
    }
    if not models:
        raise ValueError("no contrastive model to show retrieval for")
    rows = [(n, q) for n in models for q in queries]
    fig, axes = plt.subplots(
        len(rows), top_k, figsize=(1.3 * top_k + 2.5, 1.35 * len(rows)), squeeze=False
    )
    pictures = denormalize_images(test_set.images)
    embedded = {name: image_embeddings(model, test_set.images) for name, model in models.items()}
    for row, (name, query) in enumerate(rows):
        model = models[name]
        assert model is not None
        tokenizer = CaptionTokenizer(model.context_length)
        scores = embedded[name] @ text_embeddings(model, tokenizer, [query])[0]
        best = scores.topk(top_k).indices
        for col, idx in enumerate(best.tolist()):
            ax = axes[row, col]
            ax.imshow(pictures[idx].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f'{name}\n"{query}"', rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"text -> image retrieval on held-out images (top {top_k})")
    fig.tight_layout()
    return fig


def split_embedded(
    name: str, *, image_size: int, test_size: int, seed: int = 0
) -> tuple[ImageTextSet, ImageTextSet]:
    """The embedded set ``name`` split into (train, test)."""
    data = load_embedded(name, image_size=image_size, seed=seed)
    return train_test_split(data, test_size=min(test_size, len(data) // 4), seed=seed)


def load_train_data(
    spec: str, *, image_size: int, seed: int = 0, check_images: bool = True
) -> tuple[Dataset, ImageTextSet | None]:
    """The ``train`` command's data: ``(train set, held-out set or None)``.

    ``spec`` is ``mnist`` or ``emoji`` (split 3:1, at most 1000 held out), ``csv:PATH`` (a
    ``.tsv`` suffix reads tabs) or ``wds:GLOB`` (webdataset shards, streamed). With
    ``check_images`` every image of a CSV is decoded once first, so a missing or corrupt
    file stops the run before training.
    """
    if spec.startswith("csv:"):
        pairs = CsvImageText(
            spec[4:], image_size=image_size, sep="\t" if spec.endswith(".tsv") else ","
        )
        if check_images:
            pairs.check_images()
        return pairs, None
    if spec.startswith("wds:"):
        shards = sorted(glob.glob(spec[4:]))
        if not shards:
            raise ValueError(f"data={spec!r}: no shard matches {spec[4:]!r}")
        return WebDatasetShards(shards, image_size=image_size, shuffle=True, seed=seed), None
    return split_embedded(spec, image_size=image_size, test_size=1000, seed=seed)
