"""The command functions of ``python -m verger.expert_soups``: ``(settings, run) -> Report``.

Each writes only under its run folder (through ``run.path``), resumes what a killed run left
(trained models, checkpoints, grid records) and returns a report; verger-core's
``PackageCLI`` owns parsing, the run folder rules and the exit codes.

- ``train``: a soup and the generic baseline (same tokens), ``--nproc N`` DDP processes.
- ``instantiate``: a specialist from a trained soup (h given, or estimated from a sample),
  exported with ``save_pretrained``; times the weighted sum.
- ``eval``: a trained soup's specialists against the generic baseline on every task.
- ``demo`` / ``bench``: soup vs generic vs oracle (:mod:`verger.expert_soups.soup_experiment`).
- ``plan-early-run|plan|demo|bench``: the "Plan Early" grid, planner and reports.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from verger.core.bench import Report, compare
from verger.core.data import ByteTokenizer, KMeansClusterer
from verger.core.distributed import get_rank, init_distributed, run_multiprocess
from verger.core.files import atomic_write_json
from verger.core.nn import TransformerLM
from verger.core.runs import Run
from verger.expert_soups.config import check_domain_weights
from verger.expert_soups.domains import named_weights, token_histogram
from verger.expert_soups.evaluation import build_tasks, domain_losses
from verger.expert_soups.finetune import fine_tune
from verger.expert_soups.plan_early.experiment import default_budgets, run_plan_early
from verger.expert_soups.plan_early.grid import RECORDS_NAME, read_records
from verger.expert_soups.plan_early.planner import (
    cost_crossover,
    cost_curves,
    plan,
    plot_costs,
    summarize,
)
from verger.expert_soups.settings import (
    EvalSettings,
    InstantiateSettings,
    PlanSettings,
    TrainCommandSettings,
)
from verger.expert_soups.soup import SoupOfExperts
from verger.expert_soups.soup_experiment import run_soup_experiment
from verger.expert_soups.training import rank_seed, soup_loss, soup_stream, train_model
from verger.expert_soups.workbench import DataSettings, Workbench

DATA_FILE = "data.json"
PACKAGE = "verger-expert-soups"


# ---------------------------------------------------------------------------------- train
def _train_worker(
    settings_dict: dict[str, Any], folder: str, device_type: str, seed: int
) -> dict[str, Any]:
    """Train the soup (and the generic model) on this process; rank 0 saves them.

    Runs alone, or on each rank of a process group (``run_multiprocess``): the ranks share
    every h (one meta-distribution seed) and draw their own windows (per-rank samplers).
    """
    settings = TrainCommandSettings.from_dict(settings_dict)
    info = init_distributed()
    rank = get_rank()
    device = torch.device(f"cuda:{info.local_rank}" if device_type == "cuda" else device_type)
    out = Path(folder)
    bench = Workbench.build(settings.data_settings(), cache_dir=out / "clusters", seed=seed)
    train = settings.train_settings(seed, checkpoint_every=settings.checkpoint_every)
    result: dict[str, Any] = {}
    torch.manual_seed(seed)
    soup = SoupOfExperts(settings.soup_config(bench))
    stream = soup_stream(
        bench.clusters, settings.meta(), batch_size=settings.batch_size, seed=seed, rank=rank,
        groups=settings.groups,
    )  # fmt: skip
    soup_run = train_model(
        soup, stream, train, loss_fn=soup_loss, device=device, out_dir=out / "runs" / "soup",
        desc="soup",
    )  # fmt: skip
    result["soup"] = soup_run
    if rank == 0:
        soup.save(out / "soup")
    if settings.baseline:
        torch.manual_seed(seed)
        generic = TransformerLM(settings.soup_config(bench).model)
        sampler = bench.clusters.sampler(
            bench.clusters.uniform_weights(), batch_size=settings.batch_size,
            seed=rank_seed(seed, rank),
        )  # fmt: skip
        result["generic"] = train_model(
            generic, sampler, train, device=device, out_dir=out / "runs" / "generic",
            desc="generic",
        )  # fmt: skip
        if rank == 0:
            generic.save_pretrained(out / "generic")
    result["parameters"] = soup.num_instantiated_parameters()
    result["soup_parameters"] = soup.num_parameters()
    return {k: (v.__dict__ if hasattr(v, "losses") else v) for k, v in result.items()}


def train(settings: TrainCommandSettings, run: Run) -> Report:
    """``train``: the soup and the generic baseline, checkpointed and resumable."""
    for name in ("clusters", "runs", "soup", "generic", DATA_FILE):
        run.path(name)
    data = settings.data_settings()
    # fit (or load) the clusters once, before any worker starts
    Workbench.build(data, cache_dir=run.path("clusters"), seed=run.seed, rebuild=run.rebuild_corpus)
    atomic_write_json(run.path(DATA_FILE), data.__dict__ | {"domains": data.domains})
    args = (settings.to_dict(), str(run.folder), run.device.type, run.seed)
    if settings.nproc > 1:
        backend = "nccl" if run.device.type == "cuda" else "gloo"
        results = run_multiprocess(
            _train_worker, settings.nproc, *args, backend=backend, timeout=30 * 24 * 3600.0
        )
        result = results[0]
    else:
        result = _train_worker(*args)
    report = run.report(f"{PACKAGE} train")
    tokens = result["soup"]["tokens"]
    report.metric("instantiated_parameters", result["parameters"])
    report.metric("soup_parameters", result["soup_parameters"])
    report.metric("train_tokens", tokens)
    report.metric("tokens_per_parameter", tokens / result["parameters"])
    report.metric("processes", settings.nproc)
    for name in ("soup", "generic"):
        if name in result and result[name]["losses"]:
            tail = result[name]["losses"][-max(1, len(result[name]["losses"]) // 10) :]
            report.metric(f"train_loss_final_{name}", statistics.fmean(tail))
            report.metric(f"train_seconds_{name}", result[name]["seconds"])
    report.text(
        f"Trained into {run.folder}: `soup/` (SoupOfExperts.load) and `generic/` "
        "(TransformerLM.from_pretrained); logs under `runs/<model>/logs/metrics.jsonl`."
    )
    return report


# ---------------------------------------------------------------------------------- loading
def _trained(folder: Path) -> tuple[SoupOfExperts, DataSettings]:
    for name in ("soup/soup_config.json", DATA_FILE, "clusters/clusterer.npz"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} is missing: --soup must be the folder of a finished `train` run"
            )
    soup = SoupOfExperts.load(folder / "soup")
    raw = json.loads((folder / DATA_FILE).read_text())
    if raw.get("domains") is not None:
        raw["domains"] = tuple(raw["domains"])
    return soup, DataSettings(**raw)


def _parse_weights(text: str, names: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--weights: {part!r} must be <cluster>=<weight>, e.g. c03=0.5")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--weights: {value!r} is not a number") from None
    check_domain_weights(out, len(names), names, what="--weights")
    return out


def instantiate(settings: InstantiateSettings, run: Run) -> Report:
    """``instantiate``: one specialist, exported; the weighted sum timed."""
    soup, data = _trained(settings.soup)
    soup.to(run.device)
    names = soup.config.names
    if settings.weights is not None:  # --weights, else --sample-file, else --domain
        h = check_domain_weights(_parse_weights(settings.weights, names), len(names), names)
        source = "--weights"
    elif settings.sample_file is not None:
        text = Path(settings.sample_file).read_text(encoding="utf-8")
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        if not docs:
            raise ValueError(f"{settings.sample_file} holds no text")
        clusterer = KMeansClusterer.load(settings.soup / "clusters" / "clusterer.npz")
        h = token_histogram(docs, clusterer, ByteTokenizer())
        source = f"{len(docs)} documents of {settings.sample_file}"
    else:
        bench = Workbench.build(data, cache_dir=settings.soup / "clusters")
        task = build_tasks(
            bench.corpus, bench.clusters, bench.tokenizer, domains=[settings.domain],
            n_mixtures=0, sample_tokens=settings.sample_tokens, seed=run.seed,
        )[0]  # fmt: skip
        h, source = task.h, f"{task.sample_tokens.numel()} tokens of corpus domain {task.name}"
    out = soup.export_specialist(h, run.path("specialist"))
    t = compare({"instantiate": lambda: soup.instantiate(h)}, warmup=2, repeats=settings.repeats)
    report = run.report(f"{PACKAGE} instantiate")
    report.metric("instantiate_ms", t["instantiate"].median_s * 1e3)
    report.metric("instantiated_parameters", soup.num_instantiated_parameters())
    report.text(
        f"h from {source}: {named_weights(h.cpu(), names, top=8)}. The specialist is in "
        f"`{out.name}/` (`TransformerLM.from_pretrained`)."
    )
    report.timings("instantiate(h)", t)
    return report


def evaluate(settings: EvalSettings, run: Run) -> Report:
    """``eval``: per task, the soup's specialist vs the generic model, before/after fine-tune."""
    soup, data = _trained(settings.soup)
    soup.to(run.device)
    generic = None
    if (settings.soup / "generic" / "config.json").is_file():
        generic = TransformerLM.from_pretrained(settings.soup / "generic", device=run.device)
    bench = Workbench.build(data, cache_dir=settings.soup / "clusters")
    tasks = build_tasks(
        bench.corpus, bench.clusters, bench.tokenizer, domains=bench.domains,
        n_mixtures=settings.n_mixtures, sample_tokens=settings.sample_tokens, seed=run.seed,
    )  # fmt: skip
    finetune = settings.finetune_settings()
    rows = []
    for task in tasks:
        domains = list(task.mixture)
        row: dict[str, Any] = {"task": task.name}
        models = {"soup": soup.instantiate(task.h)}
        if generic is not None:
            models["generic"] = generic
        for kind, model in models.items():
            row[kind] = task.loss(domain_losses(model, bench.val, domains, device=run.device))
            tuned = fine_tune(model, task.sample_tokens, finetune, device=run.device).model
            row[kind + " ft"] = task.loss(
                domain_losses(tuned, bench.val, domains, device=run.device)
            )
        rows.append(row)
    report = run.report(f"{PACKAGE} eval")
    for kind in ("soup", "generic"):
        if kind in rows[0]:
            report.metric(f"val_loss_{kind}_mean", statistics.fmean(r[kind] for r in rows))
            report.metric(f"val_loss_{kind}_ft_mean", statistics.fmean(r[kind + " ft"] for r in rows))  # fmt: skip
    if generic is not None:
        report.metric(
            "specialist_win_rate_vs_generic",
            statistics.fmean(float(r["soup"] < r["generic"]) for r in rows),
        )
        report.metric(
            "specialist_win_rate_vs_generic_finetuned",
            statistics.fmean(float(r["soup ft"] < r["generic ft"]) for r in rows),
        )
    report.table("Validation loss per task (nats/byte)", rows)
    return report


# ---------------------------------------------------------------------------------- demos
def _experiment(run_fn: Any, command: str, doc: str) -> Any:
    """A command running ``run_fn`` (the soup or the Plan Early experiment) in the run folder."""

    def command_fn(settings: Any, run: Run) -> Report:
        report: Report = run_fn(
            settings, run.folder, run.device, seed=run.seed, path=run.path,
            rebuild_corpus=run.rebuild_corpus, title=f"{PACKAGE} {command}",
        )  # fmt: skip
        return report

    command_fn.__name__ = command.replace("-", "_")
    command_fn.__doc__ = doc
    return command_fn


demo = _experiment(
    run_soup_experiment, "demo", "``demo``: soup, generic and oracles on every task."
)
bench = _experiment(
    run_soup_experiment, "bench", "``bench``: the demo over seeds, with the timings."
)
plan_early_run = _experiment(
    run_plan_early, "plan-early-run", "``plan-early-run``: the grid's records and summary."
)
plan_early_demo = _experiment(
    run_plan_early, "plan-early-demo", "``plan-early-demo``: grid, losses, costs, a plan."
)
plan_early_bench = _experiment(
    run_plan_early, "plan-early-bench", "``plan-early-bench``: ratios over seeds, costs."
)


def plan_early_plan(settings: PlanSettings, run: Run) -> Report:
    """``plan-early-plan``: rank the methods of recorded runs for the four budgets."""
    source = settings.records
    path = source / RECORDS_NAME if source.is_dir() else source
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run `plan-early-run` first and pass its folder as --records"
        )
    records = read_records(path)
    summaries = summarize(records)
    largest = max(n for _, n in summaries)
    budgets = settings.budgets() or default_budgets(summaries, largest)
    rows = plan(records, budgets, n_domains=settings.n_domains)
    report = run.report(f"{PACKAGE} plan-early-plan")
    best = rows[0]
    report.metric("plan_best_method", best.method if best.feasible else "none")
    if best.feasible:
        report.metric("plan_predicted_loss", best.predicted_loss)
        report.metric("plan_total_flops", best.total_flops)
    crossover = cost_crossover(summaries, sample_tokens=largest)
    if crossover is not None:
        report.metric("cost_crossover_domains", crossover)
    report.table(
        f"Methods for {settings.n_domains} domains, budgets {budgets} (evidence: {path})",
        [row.as_row(i + 1) for i, row in enumerate(rows)],
    )
    curves = cost_curves(summaries, sample_tokens=largest, n_max=settings.max_domains)
    report.plot(
        "cost_vs_domains",
        plot_costs(curves, crossover=crossover, title=f"total cost, {largest} in-domain tokens"),
    )
    for row in rows[:3]:
        print(
            f"{row.method:8s} {'feasible' if row.feasible else 'infeasible'}  predicted loss "
            f"{row.predicted_loss:.4f}  {'; '.join(row.reasons)}"
        )
    return report
