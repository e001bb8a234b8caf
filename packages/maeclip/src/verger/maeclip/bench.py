"""``bench``: the comparison figures plus the training-step throughput and memory of each
variant, measured interleaved on ``--device`` (and ViT-B/16 when that device is CUDA)."""

from __future__ import annotations

import torch

from verger.core.bench import Report, new_figure
from verger.core.runs import Run
from verger.maeclip.commands import compare_methods, plot
from verger.maeclip.model import MAECLIPConfig
from verger.maeclip.settings import BenchSettings
from verger.maeclip.throughput import measure_throughput


def run_bench(settings: BenchSettings, run: Run) -> Report:
    """Train and evaluate ``settings.methods``, then time one training step of each variant."""
    report = run.report("verger-maeclip bench")
    compare_methods(settings, run, report, settings.methods)
    base = settings.model_config()
    device = run.device
    tp = measure_throughput(
        base, batch_size=settings.batch_size, device=device, repeats=settings.repeats
    )
    throughput_section(
        run,
        report,
        tp,
        prefix="",
        title=f"training-step throughput, {base.model_name}, batch {settings.batch_size}, "
        f"{device.type}",
    )
    if settings.gpu_vit and device.type == "cuda":
        big = MAECLIPConfig(model_name="ViT-B-16", decoder_width=512, decoder_depth=8)
        tp = measure_throughput(
            big,
            batch_size=64,
            device=device,
            amp=True,
            repeats=5,
            variants=("clip", "maeclip", "maeclip_masked", "flip"),
        )
        throughput_section(
            run,
            report,
            tp,
            prefix="gpu_vitb16_",
            title=f"ViT-B/16 on {torch.cuda.get_device_name(device)}, batch 64, bf16 autocast, "
            "decoder 512x8",
        )
    return report


def throughput_section(
    run: Run, report: Report, tp: dict[str, dict[str, float]], *, prefix: str, title: str
) -> None:
    """Metrics ``<prefix>images_per_s_V``, ``peak_memory_mb_V``, ``throughput_ratio_V_vs_clip``,
    a table and a bar chart."""
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
    plot(run, report, f"{prefix}throughput", fig)
