"""The Soup-of-Experts experiment behind ``demo`` and ``bench``: soup vs generic vs oracle.

For each seed: a soup and a generic ``TransformerLM`` of the instantiated size, trained on
the same number of tokens (the soup on mixtures drawn from its meta-distribution, the
generic model on the uniform mixture of the clusters); for each specialist task (a corpus
domain or a random mixture of them, known through a small in-domain sample) an oracle of the
same size trained on the task's estimated mixture with the same tokens. Every model is
evaluated on the task's held-out windows before and after the same short fine-tune on the
sample. The run folder caches every trained model, so a killed run resumes where it was.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from verger.core.bench import Report, compare, new_figure
from verger.core.nn import TransformerLM
from verger.core.train import LoopConfig, TrainLoop
from verger.expert_soups.domains import named_weights
from verger.expert_soups.evaluation import SpecialistTask, build_tasks, domain_losses
from verger.expert_soups.finetune import FineTuneSettings, fine_tune
from verger.expert_soups.ops import weighted_sum_reference
from verger.expert_soups.settings import SoupDemoSettings
from verger.expert_soups.soup import SoupOfExperts
from verger.expert_soups.training import (
    lm_loss,
    rank_seed,
    soup_loss,
    soup_stream,
    train_model,
)
from verger.expert_soups.workbench import Workbench

# gap closed is only defined where the oracle beats the generic model by this much (nats)
MIN_ORACLE_GAIN = 0.01


PathFn = Callable[[str], Path]


class _Runs:
    """Trained models of the run folder: trained once, cached, resumed after a kill."""

    def __init__(
        self, runs: Path, settings: SoupDemoSettings, bench: Workbench, device: torch.device,
        show_progress: bool | None,
    ) -> None:  # fmt: skip
        self.runs, self.settings, self.bench = runs, settings, bench
        self.device, self.show_progress = device, show_progress
        self.seconds: dict[str, float] = {}
        self.tokens: dict[str, int] = {}

    def _train(
        self, name: str, model: nn.Module, data: Any, seed: int, loss_fn: Callable = lm_loss
    ) -> None:
        result = train_model(
            model, data, self.settings.train_settings(seed), loss_fn=loss_fn, device=self.device,
            out_dir=self.runs / name, show_progress=self.show_progress, desc=name,
        )  # fmt: skip
        self.seconds[name], self.tokens[name] = result.seconds, result.tokens

    def soup(self, seed: int) -> SoupOfExperts:
        name, s = f"soup-s{seed}", self.settings
        folder = self.runs / name / "model"
        if (folder / "soup_config.json").is_file():
            return SoupOfExperts.load(folder, device=self.device)
        torch.manual_seed(seed)
        soup = SoupOfExperts(s.soup_config(self.bench))
        stream = soup_stream(
            self.bench.clusters, s.meta(), batch_size=s.batch_size, seed=seed, groups=s.groups
        )
        self._train(name, soup, stream, seed, soup_loss)
        soup.save(folder)
        return soup

    def plain(self, name: str, seed: int, weights: torch.Tensor) -> TransformerLM:
        folder = self.runs / name / "model"
        if (folder / "config.json").is_file():
            return TransformerLM.from_pretrained(folder, device=self.device)
        torch.manual_seed(seed)
        model = TransformerLM(self.settings.soup_config(self.bench).model)
        sampler = self.bench.clusters.sampler(
            weights, batch_size=self.settings.batch_size, seed=rank_seed(seed, 0)
        )
        self._train(name, model, sampler, seed)
        model.save_pretrained(folder)
        return model


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _gap(generic: float, soup: float, oracle: float) -> float:
    gain = generic - oracle
    return (generic - soup) / gain if gain > MIN_ORACLE_GAIN else math.nan


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _train_step_timings(
    settings: SoupDemoSettings, bench: Workbench, device: torch.device
) -> dict[str, Any]:
    """One optimizer step of the soup vs one of the generic model, same batch, interleaved."""
    config = settings.soup_config(bench)
    torch.manual_seed(0)
    soup, generic = SoupOfExperts(config).to(device), TransformerLM(config.model).to(device)
    stream = soup_stream(
        bench.clusters, settings.meta(), batch_size=settings.batch_size, seed=0,
        groups=settings.groups,
    )  # fmt: skip
    batch = tuple(t.to(device) for t in stream.next())
    loops = {
        name: TrainLoop(
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-4),
            config=LoopConfig(max_steps=1),
            loss_fn=loss,
            show_progress=False,
        )
        for name, model, loss in (("generic", generic, lm_loss), ("soup", soup, soup_loss))
    }

    def step(loop: TrainLoop) -> Callable[[], Any]:
        return lambda: loop.train_step([batch])

    return compare(
        {name: step(loop) for name, loop in loops.items()},
        warmup=2,
        repeats=settings.timing_repeats,
    )


def _reference_sums(soup: SoupOfExperts, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """theta(h) with the specification's weighted sum (an [n, *P] product, then a sum)."""
    alpha = soup.coefficients(h)
    params: dict[str, torch.Tensor] = dict(soup.shared.named_parameters())
    for name in soup.expert_names:
        key = soup._key(name)
        if key in soup.experts:  # full experts; low-rank ones have no reference to compare
            params[name] = weighted_sum_reference(
                params[name], soup.experts[key], alpha[soup.groups[name]]
            )
    return params


def _file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")


def _instantiate_timings(
    settings: SoupDemoSettings, bench: Workbench, soup: SoupOfExperts, h: torch.Tensor,
    scratch: Path,
) -> list[dict[str, Any]]:  # fmt: skip
    """instantiate(h) by model size (the trained soup's size first), against two baselines.

    The baselines run interleaved with it: loading the same specialist from disk
    (``TransformerLM.from_pretrained``: serving k domains by storing k specialists) and
    theta(h) through the reference weighted sum (``weighted_sum_reference``). Storage is
    measured on disk: the soup's file against one specialist's file.
    """
    rows = []
    device = soup.shared.embed.weight.device
    for size in dict.fromkeys((settings.size, *settings.instantiate_sizes)):
        subject = (
            soup if size == settings.size else SoupOfExperts(settings.soup_config(bench, size))
        )
        subject = subject.to(device)
        folder = scratch / size
        subject.export_specialist(h, folder / "specialist")
        subject.save(folder / "soup")
        with torch.no_grad():
            t = compare(
                {
                    "instantiate": partial(subject.instantiate, h),
                    "load specialist": partial(
                        TransformerLM.from_pretrained, folder / "specialist", device=device
                    ),
                    "theta (addmm)": partial(subject.parameters_for, h),
                    "theta (reference)": partial(_reference_sums, subject, h),
                },
                warmup=2,
                repeats=settings.timing_repeats,
            )
        soup_bytes, one_bytes = _file_bytes(folder / "soup"), _file_bytes(folder / "specialist")
        rows.append({
            "size": size,
            "instantiated parameters": subject.num_instantiated_parameters(),
            "soup parameters": subject.num_parameters(),
            "instantiate ms (median)": t["instantiate"].median_s * 1e3,
            "IQR ms": t["instantiate"].iqr_s * 1e3,
            "load specialist ms": t["load specialist"].median_s * 1e3,
            "instantiate / load": t["instantiate"].median_s / t["load specialist"].median_s,
            "theta addmm / reference": t["theta (addmm)"].median_s
            / t["theta (reference)"].median_s,
            "soup MB": soup_bytes / 1e6,
            "specialist MB": one_bytes / 1e6,
            "soup / specialist bytes": soup_bytes / one_bytes,
        })  # fmt: skip
    return rows


def run_soup_experiment(
    settings: SoupDemoSettings,
    out: str | Path,
    device: torch.device | str = "cpu",
    *,
    seed: int = 0,
    path: PathFn | None = None,
    rebuild_corpus: bool = False,
    title: str = "expert-soups: Soup-of-Experts",
    show_progress: bool | None = None,
) -> Report:
    """Train, evaluate and time; returns the report (metrics, tables, plots) for ``out``.

    Seeds ``seed .. seed + settings.seeds - 1``; ``path(name)`` names each top-level entry
    written under ``out`` (a run folder's :meth:`~verger.core.runs.Run.path`); models and
    clusters already there are reused (a resumed run).
    """
    out, device = Path(out), torch.device(device)
    name_path: PathFn = path if path is not None else (lambda name: out / name)
    bench = Workbench.build(
        settings.data_settings(), cache_dir=name_path("clusters"), seed=seed, rebuild=rebuild_corpus
    )
    tasks = build_tasks(
        bench.corpus, bench.clusters, bench.tokenizer, domains=bench.domains,
        n_mixtures=settings.n_mixtures, sample_tokens=settings.sample_tokens, seed=seed,
    )  # fmt: skip
    runs = _Runs(name_path("runs"), settings, bench, device, show_progress)
    report = Report(out, title=title)
    finetune = settings.finetune_settings()
    rows: list[dict[str, Any]] = []
    per_seed: dict[str, list[float]] = {k: [] for k in ("win", "gap", "win_ft", "gap_ft")}
    soups: dict[int, SoupOfExperts] = {}
    seeds = [seed + i for i in range(settings.seeds)]
    for seed_i in seeds:
        soups[seed_i] = soup = runs.soup(seed_i)
        generic = runs.plain(f"generic-s{seed_i}", seed_i, bench.clusters.uniform_weights())
        generic_losses = domain_losses(generic, bench.val, bench.domains, device=device)
        wins, gaps, wins_ft, gaps_ft = [], [], [], []
        for task in tasks:
            # oracles of their own for the first oracle_seeds seeds, then the first seed's
            oracle_seed = seed_i if seed_i < seed + settings.oracle_seeds else seed
            oracle = runs.plain(f"oracle-{_slug(task.name)}-s{oracle_seed}", oracle_seed, task.h)
            specialist = soup.instantiate(task.h)
            row = _evaluate(
                task, specialist, generic, oracle, generic_losses, bench, finetune, device
            )
            row["seed"] = seed_i
            rows.append(row)
            wins.append(float(row["soup"] < row["generic"]))
            gaps.append(_gap(row["generic"], row["soup"], row["oracle"]))
            wins_ft.append(float(row["soup ft"] < row["generic ft"]))
            gaps_ft.append(_gap(row["generic ft"], row["soup ft"], row["oracle ft"]))
        per_seed["win"].append(statistics.fmean(wins))
        per_seed["gap"].append(_mean_std(gaps)[0])
        per_seed["win_ft"].append(statistics.fmean(wins_ft))
        per_seed["gap_ft"].append(_mean_std(gaps_ft)[0])

    soup0 = soups[seed]
    soup0.export_specialist(tasks[0].h, name_path("specialists") / _slug(tasks[0].name))
    instantiate_rows = _instantiate_timings(
        settings, bench, soup0, tasks[0].h, name_path("instantiate")
    )
    step = _train_step_timings(settings, bench, device)
    params = soup0.num_instantiated_parameters()
    tokens = settings.steps * settings.batch_size * bench.clusters.seq_len

    for key, metric in (
        ("win", "specialist_win_rate_vs_generic"),
        ("gap", "gap_closed_vs_oracle"),
        ("win_ft", "specialist_win_rate_vs_generic_finetuned"),
        ("gap_ft", "gap_closed_vs_oracle_finetuned"),
    ):
        mean, std = _mean_std(per_seed[key])
        if not math.isnan(mean):
            report.metric(metric, mean)
            report.metric(metric + "_std", std)
    first = instantiate_rows[0]
    report.metric("instantiate_ms", first["instantiate ms (median)"])
    report.metric("load_specialist_ms", first["load specialist ms"])
    report.metric("instantiate_time_ratio_vs_load", first["instantiate / load"])
    report.metric("weighted_sum_time_ratio_vs_reference", first["theta addmm / reference"])
    # serving k domains: one soup file against k specialist files
    report.metric(
        "storage_ratio_vs_specialists",
        first["soup / specialist bytes"] / bench.clusters.n_clusters,
    )
    report.metric(
        "train_step_time_ratio_vs_generic", step["soup"].median_s / step["generic"].median_s
    )
    for kind in ("soup", "generic", "oracle", "soup ft", "generic ft", "oracle ft"):
        report.metric("val_loss_" + kind.replace(" ", "_") + "_mean",
                      statistics.fmean(r[kind] for r in rows))  # fmt: skip
    report.metric("instantiated_parameters", params)
    report.metric("soup_parameters", soup0.num_parameters())
    report.metric("train_tokens", tokens)
    report.metric("tokens_per_parameter", tokens / params)
    report.metric("tokens_per_soup_parameter", tokens / soup0.num_parameters())
    report.metric("seeds", settings.seeds)
    report.metric("tasks", len(tasks))
    report.metric("clusters", bench.clusters.n_clusters)
    report.metric("torch_num_threads", torch.get_num_threads())

    report.text(
        f"Soup of {settings.n_experts} experts over a `{settings.size}` model "
        f"({params:,} instantiated parameters, {soup0.num_parameters():,} in the soup); "
        f"{tokens:,} training tokens per model = {tokens / params:.0f} tokens per "
        f"instantiated parameter ({tokens / soup0.num_parameters():.0f} per soup parameter). "
        f"{bench.clusters.n_clusters} clusters of {len(bench.domains)} corpus domains "
        f"({', '.join(bench.domains)}); {settings.seeds} seed(s), oracles from "
        f"{settings.oracle_seeds}. Gap closed is averaged over tasks where the oracle beats "
        f"the generic model by more than {MIN_ORACLE_GAIN} nats. Device: {device}."
    )
    report.table("Validation loss per task (nats/byte)", rows)
    report.table("Tasks: estimated domain weights", [
        {"task": t.name, "sample tokens": t.sample_tokens.numel(),
         "h (top clusters)": named_weights(t.h, bench.clusters.names, top=4)}
        for t in tasks
    ])  # fmt: skip
    report.table("Clusters", bench.clusters.composition(bench.labels, bench.domains))
    report.table("instantiate(h) by model size", instantiate_rows)
    report.timings("Train step (soup vs generic, same batch)", step, baseline="generic")
    report.plot("val_loss_per_task", _plot(rows, tasks))
    report.write()
    return report


def _evaluate(
    task: SpecialistTask,
    soup_model: TransformerLM,
    generic: TransformerLM,
    oracle: TransformerLM,
    generic_losses: dict[str, float],
    bench: Workbench,
    finetune: FineTuneSettings,
    device: torch.device,
) -> dict[str, Any]:
    domains = list(task.mixture)

    def loss(model: TransformerLM) -> float:
        return task.loss(domain_losses(model, bench.val, domains, device=device))

    row: dict[str, Any] = {
        "task": task.name,
        "soup": loss(soup_model),
        "generic": task.loss(generic_losses),
        "oracle": loss(oracle),
    }
    for kind, model in (("soup", soup_model), ("generic", generic), ("oracle", oracle)):
        tuned = fine_tune(model, task.sample_tokens, finetune, device=device).model
        row[kind + " ft"] = loss(tuned)
    return row


def _plot(rows: list[dict[str, Any]], tasks: list[SpecialistTask]) -> Any:
    import numpy as np

    fig, _ = new_figure(width=11, height=4.2)
    fig.clear()
    kinds = ("generic", "soup", "oracle")
    names = [t.name for t in tasks]
    x = np.arange(len(names))
    for i, suffix in enumerate(("", " ft")):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, kind in enumerate(kinds):
            means = [
                statistics.fmean(r[kind + suffix] for r in rows if r["task"] == n) for n in names
            ]
            ax.bar(x + (j - 1) * 0.27, means, width=0.27, label=kind)
        ax.set_xticks(
            x, [n.replace("mix:", "mix\n") for n in names], rotation=45, ha="right", fontsize=7
        )
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title("instantiated, no fine-tune" if not suffix else "after the same fine-tune")
        low = min(min(r[k + suffix] for k in kinds) for r in rows)
        ax.set_ylim(bottom=max(0.0, low - 0.3))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
