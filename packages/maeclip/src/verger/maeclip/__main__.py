"""``python -m verger.maeclip demo|compare|bench|train`` (console script ``verger-maeclip``).

* ``demo``: CLIP, MAE and MAE+CLIP on the embedded image-text data; table, loss curves,
  retrieval grid.
* ``compare``: the same with every knob exposed (model, mask ratio, MAE weight, contrastive
  input, methods), for sweeps.
* ``bench``: the comparison figures plus training-step throughput/memory of each variant
  (and ViT-B/16 on a GPU when one is visible).
* ``train``: one method on embedded, CSV or webdataset data; works under ``torchrun``.
"""

from __future__ import annotations

import argparse
import glob
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from verger.core import resolve_device
from verger.core.bench import Report, add_cli_args, new_figure
from verger.maeclip.data import CsvImageText, ImageTextSet, WebDatasetShards, find_emoji_font
from verger.maeclip.experiment import (
    VARIANTS,
    MethodResult,
    comparison_rows,
    default_data,
    evaluate_method,
    loss_curves_figure,
    retrieval_grid_figure,
    run_comparison,
    split_embedded,
    variant_config,
)
from verger.maeclip.model import MAECLIPConfig
from verger.maeclip.throughput import measure_throughput
from verger.maeclip.towers import CaptionTokenizer, check_model_name, model_config
from verger.maeclip.train import TrainConfig, check_checkpoint_dir, train

QUICK_STEPS, FULL_STEPS = 60, 400


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="maeclip-tiny", help="open_clip config name")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--mae-weight", type=float, default=1.0)
    parser.add_argument("--contrastive-input", choices=("full", "masked"), default="full")
    parser.add_argument("--decoder-width", type=int, default=64)
    parser.add_argument("--decoder-depth", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, default=None, help=f"default {FULL_STEPS} ({QUICK_STEPS} with --quick)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--data", default=None, help="mnist | emoji (default: emoji if its font is installed)"
    )


def _base_config(args: argparse.Namespace) -> MAECLIPConfig:
    return MAECLIPConfig(
        model_name=args.model,
        mask_ratio=args.mask_ratio,
        mae_weight=args.mae_weight,
        contrastive_input=args.contrastive_input,
        decoder_width=args.decoder_width,
        decoder_depth=args.decoder_depth,
    )


def _train_config(args: argparse.Namespace, **extra: Any) -> TrainConfig:
    default = QUICK_STEPS if args.quick else FULL_STEPS
    # `is None`, not `or`: `--steps 0` must be refused, not read as "the default"
    steps = default if args.steps is None else args.steps
    return TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=min(20, steps // 5),
        seed=args.seed,
        **({"device": args.device} | extra),
    )


def _image_size(model_name: str) -> int:
    size = model_config(model_name)["vision_cfg"]["image_size"]
    return int(size if isinstance(size, int) else size[0])


def _compare(
    args: argparse.Namespace, report: Report, methods: Sequence[str]
) -> tuple[dict[str, MethodResult], ImageTextSet]:
    base = _base_config(args)
    data = args.data or default_data()
    train_set, test_set = split_embedded(
        data, image_size=_image_size(base.model_name), test_size=1000, seed=args.seed
    )
    cfg = _train_config(args)
    results = run_comparison(
        base=base, train_cfg=cfg, train_set=train_set, test_set=test_set, methods=methods
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
        f"`{base.model_name}`; {cfg.steps} steps of batch {cfg.batch_size}, same seed for every "
        f"method; mask ratio {base.mask_ratio}, MAE weight {base.mae_weight}, contrastive input "
        f"`{base.contrastive_input}`. Zero-shot uses prompt templates unseen in training; the "
        "linear probe is a logistic regression on frozen encoder features (pooled token + mean "
        "patch token); retrieval recall@k on 500 held-out pairs."
    )
    report.table("CLIP vs MAE vs MAE+CLIP", comparison_rows(results))
    report.plot("loss_curves", loss_curves_figure(results))
    return results, test_set


def cmd_compare(args: argparse.Namespace) -> None:
    report = Report(args.out, title="verger-maeclip: CLIP vs MAE vs MAE+CLIP")
    _compare(args, report, args.methods)
    print(report.write() / "report.md")


def cmd_demo(args: argparse.Namespace) -> None:
    report = Report(args.out, title="verger-maeclip demo: does MAE help CLIP at small scale?")
    results, test_set = _compare(args, report, ("clip", "mae", "maeclip"))
    queries = _queries(test_set)
    report.plot(
        "retrieval_grid",
        retrieval_grid_figure(results, test_set.subset(range(min(500, len(test_set)))), queries),
    )
    print(report.write() / "report.md")


def _queries(test_set: ImageTextSet) -> list[str]:
    if test_set.class_names:
        return [f"a handwritten digit {n}" for n in test_set.class_names[2:8:2]]
    return list(dict.fromkeys(test_set.captions))[:3]


def cmd_bench(args: argparse.Namespace) -> None:
    report = Report(args.out, title="verger-maeclip bench")
    args.data = args.data or "mnist"  # the contract keys need labelled data (zero-shot, probe)
    methods = (
        ("clip", "mae", "maeclip") if args.quick else ("clip", "mae", "maeclip", "maeclip_masked")
    )
    _compare(args, report, methods)
    device = resolve_device(args.device)
    base = _base_config(args)
    tp = measure_throughput(
        base, batch_size=args.batch_size, device=device, repeats=3 if args.quick else 8
    )
    _throughput_section(
        report,
        tp,
        prefix="",
        title=f"training-step throughput, {base.model_name}, batch {args.batch_size}, {device.type}",
    )
    if torch.cuda.is_available() and not args.skip_gpu_vit:
        big = MAECLIPConfig(model_name="ViT-B-16", decoder_width=512, decoder_depth=8)
        tp = measure_throughput(
            big,
            batch_size=64,
            device=torch.device("cuda"),
            amp=True,
            repeats=5,
            variants=("clip", "maeclip", "maeclip_masked", "flip"),
        )
        _throughput_section(
            report,
            tp,
            prefix="gpu_vitb16_",
            title="ViT-B/16 on GPU, batch 64, bf16 autocast, decoder 512x8",
        )
    print(report.write() / "report.md")


def _throughput_section(
    report: Report, tp: dict[str, dict[str, float]], *, prefix: str, title: str
) -> None:
    clip = tp["clip"]["images_per_s"]
    rows = []
    for name, figures in tp.items():
        report.metric(f"{prefix}images_per_s_{name}", figures["images_per_s"])
        if "peak_memory_mb" in figures:
            report.metric(f"{prefix}peak_memory_mb_{name}", figures["peak_memory_mb"])
        if name != "clip":
            report.metric(
                f"{prefix}throughput_ratio_{name}_vs_clip", figures["images_per_s"] / clip
            )
        rows.append({"variant": name, **figures, "vs clip": figures["images_per_s"] / clip})
    report.table(title, rows)
    fig, ax = new_figure(width=7.5, height=3.4)
    ax.bar(list(tp), [f["images_per_s"] for f in tp.values()], color="tab:blue")
    ax.tick_params(axis="x", labelrotation=15)
    ax.set_ylabel("images / s (train step)")
    ax.set_title(title, fontsize=9)
    report.plot(f"{prefix}throughput", fig)


def _load_data(spec: str, image_size: int, seed: int) -> Any:
    if spec.startswith("csv:"):
        return CsvImageText(
            spec[4:], image_size=image_size, sep="\t" if spec.endswith(".tsv") else ","
        )
    if spec.startswith("wds:"):
        shards = sorted(glob.glob(spec[4:]))
        return WebDatasetShards(shards, image_size=image_size, shuffle=True, seed=seed)
    return split_embedded(spec, image_size=image_size, test_size=1000, seed=seed)


def cmd_train(args: argparse.Namespace) -> None:
    from verger.core.distributed import init_distributed

    info = init_distributed()
    base = variant_config(_base_config(args), args.method)
    data = _load_data(args.data or default_data(), _image_size(base.model_name), args.seed)
    train_set, test_set = data if isinstance(data, tuple) else (data, None)
    cfg = _train_config(
        args,
        out_dir=args.out,
        checkpoint_every=args.checkpoint_every,
        device=str(info.device) if info.world_size > 1 else args.device,
    )
    result = train(base, cfg, train_set, resume=not args.no_resume)
    if info.rank == 0:
        report = Report(args.out, title=f"verger-maeclip train: {args.method}")
        report.metric("images_per_s", result.images_per_s)
        report.metric("world_size", info.world_size)
        for key, value in result.history[-1].items():
            report.metric(f"final_{key}", value if key == "step" else float(value))
        if test_set is not None:
            tok = CaptionTokenizer(result.model.clip.context_length)
            for key, value in evaluate_method(
                result.model, tok, train_set, test_set, contrastive=base.clip_weight > 0
            ).items():
                report.metric(key, value)
        print(report.write() / "report.md")


def _check_data(spec: str | None, command: str) -> None:
    """Refuse a ``--data`` the command cannot load (a usage error, before any work)."""
    if spec is None or spec == "mnist":
        return
    if spec == "emoji":
        try:
            import emoji  # noqa: F401
        except ImportError:
            raise ValueError(
                "--data emoji needs the 'emoji' package: pip install verger-maeclip[emoji]"
            ) from None
        if find_emoji_font() is None:
            raise ValueError(
                "--data emoji: no colour emoji font found (apt install fonts-noto-color-emoji, "
                "or set VERGER_EMOJI_FONT)"
            )
        return
    if command == "train" and spec.startswith("csv:"):
        if not Path(spec[4:]).is_file():
            raise ValueError(f"--data {spec}: {spec[4:]!r} is not a file")
        return
    if command == "train" and spec.startswith("wds:"):
        if not glob.glob(spec[4:]):
            raise ValueError(f"--data {spec}: no shard matches {spec[4:]!r}")
        return
    allowed = "mnist, emoji, csv:PATH or wds:GLOB" if command == "train" else "mnist or emoji"
    raise ValueError(f"--data {spec!r}: must be {allowed}")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Bad options end as a usage error (exit 2) before any work starts.

    ``--out``, ``--device`` and ``--seed`` are checked as they are parsed (verger-core); the
    rest by building the configs they feed, whose errors name the field and its range.
    """
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: must be >= 1")
    try:
        base = _base_config(args)
        check_model_name(base.model_name)
        _check_data(args.data, args.command)
        if args.command == "train":
            variant_config(base, args.method)
            cfg = _train_config(args, out_dir=args.out, checkpoint_every=args.checkpoint_every)
            check_checkpoint_dir(args.out, steps=cfg.steps, resume=not args.no_resume)
        else:
            _train_config(args)
    except ValueError as err:
        parser.error(str(err))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verger-maeclip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("demo", "CLIP, MAE, MAE+CLIP on the embedded data: table, curves, retrieval grid"),
        ("compare", "the comparison with every knob exposed"),
        ("bench", "comparison figures + throughput/memory per variant"),
        ("train", "train one method (torchrun-ready)"),
    ):
        p = add_cli_args(sub.add_parser(name, help=helptext), default_out=f"build/{name}/maeclip")
        _model_args(p)
        if name == "compare":
            p.add_argument(
                "--methods", nargs="+", choices=list(VARIANTS), default=["clip", "mae", "maeclip"]
            )
        if name == "bench":
            p.add_argument("--skip-gpu-vit", action="store_true", help="no ViT-B/16 GPU section")
        if name == "train":
            p.add_argument("--method", choices=list(VARIANTS), default="maeclip")
            p.add_argument("--checkpoint-every", type=int, default=100)
            p.add_argument("--no-resume", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    commands = {"demo": cmd_demo, "compare": cmd_compare, "bench": cmd_bench, "train": cmd_train}
    commands[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
