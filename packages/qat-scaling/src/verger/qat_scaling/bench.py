"""``bench``: the issue's metrics, measured in one run (``metrics.json`` keys in the README).

Two sweeps on the embedded corpus sharing their FP trunks: unfused QAT runs and
full-precision baselines (same tokens, optimizer, warmup and cooldown as the QAT runs) at
every budget and seed, for the law; fused 4-bit runs at the largest budget, for the
fusion metric. Then: QAT vs FP and fused vs unfused losses, the law fitted without the largest
budget and tested on it, the optimal-fraction error (losses averaged over seeds), the
compute the shared FP prefix saves; the step time of QAT over FP on the same model and
batch; the packed 4-bit size (and per model size); on a GPU, the fused Triton fake-quant
kernel against its reference and the torch path.

Why four budgets and two seeds: the law's Chinchilla part E + B_D / D^beta has three
constants, so three fitted budgets are the fewest that identify it (with two, beta runs to
its bound and the held-out loss was off by 0.15 nats); the loss differences between QAT
fractions are a few hundredths of a nat, the size of one seed's run-to-run noise.
"""

from __future__ import annotations

import copy
import dataclasses
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
from verger.qat_scaling.sweep import SweepConfig, compute_plan
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
        (51_200, 102_400, 204_800, 409_600), quick=(16_384, 24_576, 32_768, 65_536), at_least=1,
        help="training tokens per run (the largest is held out of the law's fit)",
    )  # fmt: skip
    schedule: Literal["unfused", "fused", "both"] = option(
        "both", help="schedules to run (both: unfused at every budget, fused at the largest)"
    )  # fmt: skip
    seeds: int = option(2, quick=1, at_least=1, help="seeds per run (--seed, --seed + 1, ...)")
    workers: int = option(2, at_least=1, identity=False, help="local processes (one per GPU on CUDA)")  # fmt: skip
    starts: int = option(12, quick=6, at_least=1, help="law fit starts")
    bootstrap: int = option(30, quick=0, at_least=0, help="bootstrap refits for intervals")
    timing_size: str = option(
        "l", quick="s", choices=tuple(SIZES), help="model whose training step is timed"
    )  # fmt: skip
    packing_size: str = option(
        "l", choices=tuple(SIZES), help="model whose 4-bit weights are packed (no training)"
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


def packed_sizes(settings: BenchSettings, size: str) -> dict[str, float]:
    """4-bit storage of model ``size``'s quantized layers: packed codes + scales (``bytes``)
    and their ratio to the fp32 bytes (``ratio``). Per-channel fp32 scales add 32 / inputs
    bits per weight (0.67 at 48 inputs, 0.33 at 96), so the ratio depends on the widths."""
    model = build_model(size, vocab_size=257, seq_len=settings.seq_len, seed=0)
    prepare(model, QuantConfig(bits=4, group_size=settings.group_size))
    enable_fake_quant(model, True)
    report = storage_report(convert(model))
    stored = report["packed_bytes"] + report["scale_bytes"]
    return {"bytes": stored, "ratio": stored / report["fp32_bytes"]}


def packed_ratio(settings: BenchSettings) -> dict[str, float]:
    """(packed 4-bit codes + scales) / fp32 bytes of the quantized layers of ``packing_size``."""
    out = packed_sizes(settings, settings.packing_size)
    return {"packed_weight_bytes_ratio_4bit": out["ratio"], "packed_weight_bytes_4bit": out["bytes"]}  # fmt: skip


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


def bench_grids(settings: BenchSettings, seed: int) -> list[SweepConfig]:
    """The sweeps of the bench, sharing one folder and its FP trunks. With ``schedule="both"``:
    the law's grid (unfused and FP runs at every budget) and the fusion grid (fused 4-bit runs
    at the largest budget only: what the fusion metrics read)."""
    config = settings.sweep_config(seed)
    if settings.schedule != "both":
        return [config]
    law = dataclasses.replace(config, fused=(False,))
    fusion = dataclasses.replace(
        config, fused=(True,), bits=(4,), tokens=(max(config.tokens),), fp_baselines=False
    )
    return [law, fusion]


def run_bench(settings: BenchSettings, run: Run) -> Report:
    """The sweeps and the measurements above, into one report."""
    grids = bench_grids(settings, run.seed)
    records = [r for grid in grids for r in sweep_in_run(settings, run, config=grid).records]
    compute = compute_plan(grids[0], [spec for grid in grids for spec in grid.runs()])
    report = run.report("verger-qat-scaling bench")
    top = _largest_budget(records)
    report.metrics_from(loss_ratios(records, top))
    report.metric("sweep_fp_prefix_compute_saving", compute.saving)
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
    report.table(
        "4-bit storage by model size (packed codes + fp32 scales over fp32 weights)",
        [{"size": size, **packed_sizes(settings, size)} for size in SIZES],
    )
    if run.device.type == "cuda":
        report.metrics_from(kernel_check(run.device, settings.repeats))
    report.metric("torch_num_threads", torch.get_num_threads())
    loss_vs_fraction_plot(records, report)
    report.text(
        f"Tokens per run: {budgets}; seeds: {settings.seeds}. The law is fitted on the unfused "
        f"and FP runs of the budgets below {top} and tested on {top} (`law_heldout_rmse`, "
        "`optimal_fraction_grid_error`; the measured optimum is the best fraction of the "
        "seed-averaged losses). Fused runs: 4 bits at the largest budget only. The FP baselines train on "
        "the same tokens, optimizer, warmup and cooldown as the QAT runs."
    )
    return report
