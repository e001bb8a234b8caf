"""``bench``: the issue's metrics, measured in one run (``metrics.json`` keys in the README).

One sweep on the embedded corpus (fused and unfused schedules, full-precision baselines
trained on the same tokens with the same optimizer, warmup and cooldown as the QAT runs),
then: QAT vs FP and fused vs unfused losses, the law fitted without the largest budget and
tested on it, the optimal-fraction error, the compute the shared FP prefix saves; the step
time of QAT over FP on the same model and batch; the packed 4-bit size; on a GPU, the fused
Triton fake-quant kernel against its reference and the torch path.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from verger.core.bench import Report, compare
from verger.core.runs import Run
from verger.core.settings import SettingsError, option
from verger.qat_scaling.analysis import optimal_fraction_table
from verger.qat_scaling.commands import fit_sections, loss_vs_fraction_plot, sweep_in_run
from verger.qat_scaling.config import QuantConfig
from verger.qat_scaling.convert import convert, storage_report
from verger.qat_scaling.data import load_data
from verger.qat_scaling.law import fit_law
from verger.qat_scaling.models import SIZES, build_model
from verger.qat_scaling.ops.fake_quant import Backend, fake_quant, fake_quant_reference, level_spec
from verger.qat_scaling.prepare import enable_fake_quant, prepare, set_backend
from verger.qat_scaling.settings import BIT_NAMES, GridSettings
from verger.qat_scaling.training import add_quantizers, make_optimizer


@dataclass(kw_only=True)
class BenchSettings(GridSettings):
    """``bench``: every metric of the issue in one run (``--quick``: a few minutes on CPU)."""

    sizes: tuple[str, ...] = option(("xs",), quick=("xxs",), choices=tuple(SIZES), help="model sizes")  # fmt: skip
    bits: tuple[str, ...] = option(("2", "4"), quick=("4",), choices=BIT_NAMES, help="bit widths (4 is required)")  # fmt: skip
    fractions: tuple[float, ...] = option(
        (0.1, 0.2, 0.35, 0.5, 0.65, 0.8), quick=(0.2, 0.4, 0.6, 0.75), above=0.0, at_most=1.0,
        help="QAT fractions f",
    )  # fmt: skip
    tokens: tuple[int, ...] = option(
        (102_400, 204_800, 409_600), quick=(16_384, 32_768, 65_536), at_least=1,
        help="training tokens per run (the largest is held out of the law's fit)",
    )  # fmt: skip
    schedule: Literal["unfused", "fused", "both"] = option("both", help="schedules to run (both for the fusion metric)")  # fmt: skip
    workers: int = option(2, at_least=1, identity=False, help="local processes (one per GPU on CUDA)")  # fmt: skip
    starts: int = option(12, quick=6, at_least=1, help="law fit starts")
    bootstrap: int = option(30, quick=0, at_least=0, help="bootstrap refits for intervals")
    timing_size: str = option(
        "l", quick="s", choices=tuple(SIZES),
        help="model whose training step is timed and whose 4-bit weights are packed",
    )  # fmt: skip
    repeats: int = option(30, quick=10, at_least=3, identity=False, help="timed steps per candidate")  # fmt: skip

    def validate(self) -> None:
        super().validate()
        if "4" not in self.bits:
            raise SettingsError("bits must include 4: the bench's metrics are about 4-bit QAT")


# ---------------------------------------------------------------------- from records
def _largest_budget(records: Sequence[Mapping[str, Any]]) -> int:
    return max(int(r["tokens"]) for r in records)


def loss_ratios(records: Sequence[Mapping[str, Any]], tokens: int) -> dict[str, float]:
    """At ``tokens``: best 4-bit (unfused) / FP loss and fused / unfused 4-bit losses, per
    (size, seed), then averaged (``_std`` over them when there are several)."""
    by: dict[tuple[Any, ...], dict[Any, float]] = defaultdict(dict)
    for r in records:
        if r["tokens"] != tokens:
            continue
        key = (r["size"], r["seed"])
        if r["bits"] is None:
            by[key]["fp"] = r["val_loss"]
        elif r["bits"] == 4:
            by[key][(r["qat_fraction"], bool(r["fused"]))] = r["val_loss"]
    vs_fp, fused_mean, fused_best = [], [], []
    for losses in by.values():
        unfused = {
            f: v for (f, fu), v in ((k, v) for k, v in losses.items() if k != "fp") if not fu
        }
        fused = {f: v for (f, fu), v in ((k, v) for k, v in losses.items() if k != "fp") if fu}
        if "fp" in losses and unfused:
            vs_fp.append(min(unfused.values()) / losses["fp"])
        common = sorted(set(unfused) & set(fused))
        if common:
            fused_mean.append(float(np.mean([fused[f] / unfused[f] for f in common])))
            fused_best.append(min(fused.values()) / min(unfused.values()))
    out: dict[str, float] = {}
    for name, values in (
        ("qat_4bit_val_loss_ratio_vs_fp", vs_fp),
        ("fused_vs_unfused_val_loss_ratio_4bit", fused_mean),
        ("fused_vs_unfused_best_val_loss_ratio_4bit", fused_best),
    ):
        if values:
            out[name] = float(np.mean(values))
            if len(values) > 1:
                out[name + "_std"] = float(np.std(values, ddof=1))
    return out


# ---------------------------------------------------------------------- measured in-process
def step_time_ratio(settings: BenchSettings, device: torch.device, repeats: int) -> dict[str, Any]:
    """Median time of a training step (forward, backward, AdamW) with 4-bit fake quantization
    over the same step in full precision: same weights, batch, optimizer and threads."""
    data = load_data(settings.sweep_config(0).data)
    batch = data.batches(0).batch(0)
    x, y = (t.to(device) for t in batch)
    base = build_model(
        settings.timing_size, vocab_size=data.vocab_size, seq_len=settings.seq_len, seed=0
    )
    train = settings.sweep_config(0).train
    quant = QuantConfig(bits=4, group_size=settings.group_size, scale_init=settings.scale_init)

    def candidate(qat: bool, backend: Backend = "auto") -> Any:
        model = copy.deepcopy(base).to(device)
        opt = make_optimizer(model, train)
        if qat:
            add_quantizers(model, opt, quant, train.lr)
            enable_fake_quant(model, True)
            set_backend(model, backend)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = model(x, y).loss
            assert loss is not None
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return step

    fns = {"fp": candidate(False), "qat_4bit": candidate(True)}
    if device.type == "cuda":
        fns["qat_4bit_torch_path"] = candidate(True, "torch")
    timings = compare(fns, warmup=3, repeats=repeats)
    out: dict[str, Any] = {
        "fake_quant_step_time_ratio": timings["qat_4bit"].median_s / timings["fp"].median_s,
        "fp_step_ms": timings["fp"].median_s * 1e3,
        "qat_step_ms": timings["qat_4bit"].median_s * 1e3,
        "timings": timings,
    }
    if "qat_4bit_torch_path" in timings:
        out["fake_quant_step_time_ratio_torch_path"] = (
            timings["qat_4bit_torch_path"].median_s / timings["fp"].median_s
        )
    return out


def packed_ratio(settings: BenchSettings) -> dict[str, float]:
    """(packed 4-bit codes + scales) / fp32 bytes of the quantized layers of the timed model."""
    model = build_model(settings.timing_size, vocab_size=257, seq_len=settings.seq_len, seed=0)
    prepare(model, QuantConfig(bits=4, group_size=settings.group_size))
    enable_fake_quant(model, True)
    report = storage_report(convert(model))
    ratio = (report["packed_bytes"] + report["scale_bytes"]) / report["fp32_bytes"]
    return {"packed_weight_bytes_ratio_4bit": ratio, "packed_weight_bytes_4bit": report["packed_bytes"] + report["scale_bytes"]}  # fmt: skip


def kernel_check(device: torch.device, repeats: int) -> dict[str, float]:
    """CUDA only: the Triton kernel against the reference (output and both gradients, fp32)
    on a 4096 x 4096 weight, and its fwd + bwd time over the torch path."""
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(4096, 4096, device=device, generator=gen) * 0.02
    s = torch.rand(4096, 32, device=device, generator=gen) * 0.004 + 0.001
    dy = torch.randn(4096, 4096, device=device, generator=gen)
    out: dict[str, float] = {}
    for bits, scheme in ((4, "lsq"), (2, "seq"), (1, "sign")):
        spec = level_spec(bits, scheme)
        results = []
        for backend in ("triton", "reference"):
            a, b = w.clone().requires_grad_(True), s.clone().requires_grad_(True)
            g = spec.grad_scale(128)
            if backend == "triton":
                y = fake_quant(a, b, spec, g, backend="triton")
            else:
                y = fake_quant_reference(a.view(-1, 128), b.view(-1, 1), spec, g).view_as(a)
            y.backward(dy)
            assert a.grad is not None and b.grad is not None
            results.append((y, a.grad, b.grad))
        (y, ga, gb), (ry, rga, rgb) = results
        out[f"fake_quant_kernel_max_error_{bits}bit"] = max(
            float((y - ry).abs().max()), float((ga - rga).abs().max()),
            float(((gb - rgb).abs() / rgb.abs().clamp_min(1e-6)).max()),
        )  # fmt: skip
    spec = level_spec(4, "lsq")

    def run(backend: Literal["triton", "torch"]) -> Any:
        a, b = w.clone().requires_grad_(True), s.clone().requires_grad_(True)

        def call() -> None:
            fake_quant(a, b, spec, 1.0, backend=backend).backward(dy)
            torch.cuda.synchronize(device)

        return call

    t = compare({"triton": run("triton"), "torch": run("torch")}, warmup=3, repeats=repeats)
    out["fake_quant_kernel_speedup_vs_torch"] = t["torch"].median_s / t["triton"].median_s
    return out


def run_bench(settings: BenchSettings, run: Run) -> Report:
    """The sweep and the measurements above, into one report."""
    result = sweep_in_run(settings, run)
    records = result.records
    report = run.report("verger-qat-scaling bench")
    top = _largest_budget(records)
    report.metrics_from(loss_ratios(records, top))
    report.metric("sweep_fp_prefix_compute_saving", result.compute.saving)
    budgets = sorted({int(r["tokens"]) for r in records})
    heldout = (top,) if len(budgets) > 1 else ()
    unfused = [r for r in records if not r["fused"]]
    _, summary = fit_sections(
        unfused, report, starts=settings.starts, bootstrap=settings.bootstrap, seed=run.seed,
        heldout_tokens=heldout,
    )  # fmt: skip
    if heldout:
        held = [row["grid_error"] for row in summary["groups"] if row["tokens"] == top]
        if held:
            report.metric("optimal_fraction_grid_error", float(np.mean(held)))
            report.metric("optimal_fraction_grid_error_max", int(max(held)))
        # the same law fitted on every budget: how well its f* matches in sample
        everything = fit_law(unfused, starts=settings.starts, seed=run.seed)
        rows = optimal_fraction_table(unfused, everything)
        if rows:
            report.metric(
                "optimal_fraction_grid_error_all_budgets",
                float(np.mean([row["grid_error"] for row in rows])),
            )
    timing = step_time_ratio(settings, run.device, settings.repeats)
    report.metric("fake_quant_step_time_ratio", timing["fake_quant_step_time_ratio"])
    for key in ("fp_step_ms", "qat_step_ms", "fake_quant_step_time_ratio_torch_path"):
        if key in timing:
            report.metric(key, timing[key])
    report.timings(
        f"Training step of '{settings.timing_size}' on {run.device}",
        timing["timings"],
        baseline="fp",
    )
    report.metrics_from(packed_ratio(settings))
    if run.device.type == "cuda":
        report.metrics_from(kernel_check(run.device, settings.repeats))
    report.metric("torch_num_threads", torch.get_num_threads())
    loss_vs_fraction_plot(records, report)
    report.text(
        f"Tokens per run: {budgets}; the law is fitted on the unfused and FP runs of the budgets "
        f"below {top} and tested on {top} (`law_heldout_rmse`, `optimal_fraction_grid_error`). "
        "The FP baselines train on the same tokens, optimizer, warmup and cooldown as the QAT runs."
    )
    return report
