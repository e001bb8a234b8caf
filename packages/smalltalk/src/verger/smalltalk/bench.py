"""``bench``: the mixture against the dense baseline at equal per-expert size and total tokens.

For each seed (and each learning rate of ``lrs``: the same tuning grid for both models) the
whole pipeline builds a mixture with its dense baseline in ``<out>/seed-S[-lr-X]``; the
figures are means over seeds (with their spread and per-seed values) of the best learning
rate of each model, picked on validation perplexity. Tokens per parameter sit beside every
ratio: the miniature only shows the paper's claim once the tiny models are trained far past
saturation. Then the balanced assignment itself: the greedy rule's and the fast solver's
gaps against the exact optimum on the run's real router scores, and both at a million rows.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from verger.core.bench import Report, new_figure
from verger.core.bench.timing import compare
from verger.core.runs import Run
from verger.core.settings import option
from verger.smalltalk.assign import solve_balanced
from verger.smalltalk.config import SmallTalkConfig
from verger.smalltalk.data import DATA_DIR, SequenceSet
from verger.smalltalk.evaluation import EvalResult, add_to_report, evaluate
from verger.smalltalk.experts import load_expert
from verger.smalltalk.model import SmallTalkLM, sequence_losses
from verger.smalltalk.pipeline import build_mixture
from verger.smalltalk.sharding import load_shard_index

TARGETS = {  # metric: (comparison, bound) from the issue
    "ppl_ratio_vs_dense": ("<=", 0.95),
    "ppl_ratio_vs_dense_prefix32": ("<", 1.0),
    "router_train_flops_fraction": ("<", 0.05),
}
SPREAD = (
    "ppl_ratio_vs_dense",
    "ppl_ratio_vs_dense_prefix32",
    "ppl_ratio_vs_dense_after_prefix32",
    "ppl_ratio_vs_dense_prefix_full",
    "ppl_ratio_vs_dense_oracle_routing",
    "routing_purity_by_domain",
    "ppl_mixture",
    "ppl_dense",
)


@dataclass(kw_only=True)
class BenchSettings(SmallTalkConfig):
    """``bench``: the recipe at bench scale, the seeds and the learning-rate grid."""

    seq_len: int = option(128, quick=64, at_least=2, help="tokens per sequence")
    expert_steps: int = option(6000, quick=300, at_least=1, help="optimizer steps per expert")
    batch_size: int = option(32, quick=16, at_least=1, help="sequences per step")
    warmup_steps: int = option(200, quick=20, at_least=0, help="linear warmup steps")
    em_rounds: int = option(10, quick=4, at_least=1, help="EM rounds")
    em_steps_per_round: int = option(80, quick=30, at_least=1, help="router steps per round")
    max_bytes_per_domain: int | None = option(
        1_500_000, quick=300_000, at_least=1, help="corpus budget per domain (none: all)"
    )
    checkpoint_every: int = option(
        1000, quick=100, at_least=1, identity=False, help="steps between expert checkpoints"
    )
    seeds: tuple[int, ...] = option((0, 1, 2), quick=(0,), at_least=0, help="seeds")
    lrs: tuple[float, ...] = option(
        (3e-3,), above=0.0, help="learning rates tried for both the experts and the dense model"
    )
    parallel: int = option(2, at_least=1, identity=False, help="expert processes at once")
    prefix_lens: tuple[int, ...] = option(
        (8, 16, 32, 64, 0), at_least=0, help="routing prefixes to evaluate (0: full)"
    )
    assign_rows: int = option(
        1_000_000, quick=100_000, at_least=1000, help="rows of the large assignment benchmark"
    )
    inference_rows: int = option(
        512, quick=128, at_least=1, help="validation sequences timed at inference"
    )
    inference_repeats: int = option(
        7, quick=3, at_least=1, identity=False, help="timed repeats of each inference path"
    )


def _runs(settings: BenchSettings, run: Run) -> dict[tuple[int, float], tuple[Path, EvalResult]]:
    out = {}
    for seed in settings.seeds:
        for lr in settings.lrs:
            name = f"seed-{seed}" if len(settings.lrs) == 1 else f"seed-{seed}-lr-{lr:g}"
            config = settings.as_model_config().replace(lr=lr)
            folder = run.path(name)
            build_mixture(
                config,
                folder,
                device=run.device,
                seed=seed,
                parallel=settings.parallel,
                threads=1,
                rebuild_corpus=run.rebuild_corpus,
            )
            result = evaluate(folder, prefix_lens=settings.prefix_lens, device=run.device)
            out[(seed, lr)] = (folder, result)
    return out


def _best_lr(results: dict[tuple[int, float], tuple[Path, EvalResult]], key: str) -> float:
    """The learning rate with the lowest mean ``key`` over seeds."""
    lrs = sorted({lr for _, lr in results})
    seeds = sorted({s for s, _ in results})
    return min(
        lrs, key=lambda lr: statistics.fmean(results[(s, lr)][1].metrics[key] for s in seeds)
    )


def run_bench(settings: BenchSettings, run: Run) -> Report:
    """Build and evaluate every (seed, lr) mixture; aggregate; then the assignment benchmark."""
    start = time.perf_counter()
    results = _runs(settings, run)
    lr_mix = _best_lr(results, "ppl_mixture")
    lr_dense = _best_lr(results, "ppl_dense")
    per_seed = []
    for seed in settings.seeds:
        mixture = results[(seed, lr_mix)][1].metrics
        dense = results[(seed, lr_dense)][1].metrics
        row = dict(mixture)
        # each model at its own best learning rate: the ratios against the tuned dense model
        for key in list(row):
            if key.startswith("ppl_ratio_vs_dense"):
                row.pop(key)
        scale = mixture["ppl_dense"] / dense["ppl_dense"]
        for key, value in mixture.items():
            if key.startswith("ppl_ratio_vs_dense"):
                row[key] = value * scale
        row["ppl_dense"] = dense["ppl_dense"]
        row["seed"] = seed
        per_seed.append(row)
    report = run.report("verger-smalltalk bench: SmallTalk LM vs a dense LM of an expert's size")
    for key in SPREAD:
        values = [r[key] for r in per_seed if key in r]
        if not values:
            continue
        report.metric(key, statistics.fmean(values))
        if len(values) > 1:
            report.metric(f"{key}_std", statistics.stdev(values))
        for r in per_seed:
            report.metric(f"{key}_seed{r['seed']}", r[key])
    first = per_seed[0]
    for key in (
        "router_train_flops_fraction",
        "router_inference_flops_fraction",
        "router_inference_flops_fraction_prefix32",
        "mixture_train_flops_ratio_vs_dense",
        "expert_tokens_per_parameter",
        "dense_tokens_per_parameter",
        "expert_parameters",
        "router_parameters",
        "eval_sequences",
    ):
        if key in first:
            report.metric(key, first[key])
    domains = [k.removeprefix("routing_purity_") for k in first if k.startswith("routing_purity_")]
    for name in domains:
        if name == "by_domain":
            continue
        report.metric(
            f"routing_purity_{name}",
            statistics.fmean(r[f"routing_purity_{name}"] for r in per_seed),
        )
        key = f"ppl_ratio_vs_dense_{name}"
        if all(key in r for r in per_seed):
            report.metric(key, statistics.fmean(r[key] for r in per_seed))
    report.metric("lr_mixture", lr_mix)
    report.metric("lr_dense", lr_dense)
    report.metric("seeds", len(settings.seeds))
    for key, (op, bound) in TARGETS.items():
        value = report.metrics.get(key)
        if isinstance(value, float):
            met = value <= bound if op == "<=" else value < bound
            report.metric(f"{key}_target_met", bool(met))
    seed0_folder = results[(settings.seeds[0], lr_mix)][0]
    report.metrics_from(assignment_benchmark(seed0_folder, settings.assign_rows, run.seed))
    report.metrics_from(
        inference_benchmark(
            seed0_folder,
            rows=settings.inference_rows,
            prefix_lens=settings.prefix_lens,
            device=run.device,
            repeats=settings.inference_repeats,
        )
    )
    report.metric("bench_seconds", time.perf_counter() - start)
    _describe(report, settings, per_seed)
    add_to_report(report, results[(settings.seeds[0], lr_mix)][1], prefix="seed0_")
    _plot_seeds(report, per_seed)
    return report


def assignment_benchmark(folder: Path, rows: int, seed: int) -> dict[str, float]:
    """Greedy and fast assignment against the exact optimum on a run's real router scores,
    then both on ``rows`` rows resampled from them (with a little noise), timed."""
    index = load_shard_index(folder)
    from safetensors import safe_open

    with safe_open(str(index.folder / "index.safetensors"), framework="pt") as f:
        scores = f.get_tensor("scores").double().numpy()
    n, num_experts = scores.shape
    rng = np.random.default_rng(seed)
    small = scores[rng.choice(n, size=min(n, 2000), replace=False)]
    caps = [len(small) // num_experts + (e < len(small) % num_experts) for e in range(num_experts)]
    exact = solve_balanced(small, caps, method="exact")
    greedy = solve_balanced(small, caps, method="greedy")
    fast = solve_balanced(small, caps, method="fast")
    out = {
        "assign_greedy_gap_vs_exact": (exact.total - greedy.total) / abs(exact.total),
        "assign_fast_gap_vs_exact": (exact.total - fast.total) / abs(exact.total),
    }
    big = scores[rng.integers(0, n, size=rows)] + rng.normal(scale=0.5, size=(rows, num_experts))
    caps = [rows // num_experts + (e < rows % num_experts) for e in range(num_experts)]
    t0 = time.perf_counter()
    greedy = solve_balanced(big, caps, method="greedy")
    t1 = time.perf_counter()
    fast = solve_balanced(big, caps, method="fast")
    t2 = time.perf_counter()
    assert fast.upper_bound is not None
    out["assign_rows"] = float(rows)
    out["assign_greedy_seconds"] = t1 - t0
    out["assign_fast_seconds"] = t2 - t1
    out["assign_fast_relative_gap_bound"] = float(fast.relative_gap or 0.0)
    out["assign_greedy_relative_gap_bound"] = (fast.upper_bound - greedy.total) / abs(greedy.total)
    out["assign_fast_gain_over_greedy_per_row"] = (fast.total - greedy.total) / rows
    return out


def inference_benchmark(
    folder: Path,
    *,
    rows: int,
    prefix_lens: tuple[int, ...],
    device: torch.device,
    repeats: int = 5,
) -> dict[str, float]:
    """Measured inference cost of the routed mixture against the dense baseline, same run.

    On the first ``rows`` validation sequences: the dense model's forward pass, the E
    routers' prefix passes (``routing``) and the whole routed pass (``route`` then each
    sequence's expert), timed side by side (rotated order, medians). Ratios are over the
    dense pass: the mixture's inference overhead is ``inference_time_ratio_vs_dense - 1``.
    """
    model = SmallTalkLM.from_pretrained(folder, device=device)
    dense = load_expert(folder, "dense", device=device)
    tokens = SequenceSet.load(folder / DATA_DIR / "validation.safetensors").tokens[:rows]
    length = tokens.shape[1] - 1
    prefixes = {"full" if m == 0 else str(min(m, length)): length if m == 0 else min(m, length)
                for m in prefix_lens}  # fmt: skip
    prefixes.setdefault(str(model.config.prefix_len), model.config.prefix_len)
    fns: dict[str, Any] = {"dense": lambda: sequence_losses(dense, tokens, device=device)}
    for name, prefix in prefixes.items():
        fns[f"routing_prefix{name}"] = lambda p=prefix: model.route(tokens[:, :length], p)
        fns[f"mixture_prefix{name}"] = lambda p=prefix: model.score(tokens, p)
    with torch.no_grad():
        timings = compare(fns, warmup=1, repeats=repeats)
    base = timings["dense"].median_s
    out = {"inference_rows": float(len(tokens)), "inference_seconds_dense": base}
    for name, timing in timings.items():
        if name == "dense":
            continue
        out[f"inference_seconds_{name}"] = timing.median_s
        kind, _, which = name.partition("_")
        key = "routing_time_fraction" if kind == "routing" else "inference_time_ratio_vs_dense"
        out[f"{key}_{which}"] = timing.median_s / base
    default = f"prefix{model.config.prefix_len}"
    out["routing_time_fraction"] = out[f"routing_time_fraction_{default}"]
    out["inference_time_ratio_vs_dense"] = out[f"inference_time_ratio_vs_dense_{default}"]
    return out


def _describe(report: Report, settings: BenchSettings, per_seed: list[dict[str, Any]]) -> None:
    first = per_seed[0]
    lines = [
        f"E = {settings.num_experts} experts of {first['expert_parameters']} parameters, "
        f"{first['expert_tokens_per_parameter']:.0f} tokens per parameter each; the dense "
        f"baseline has the same size and {first.get('dense_tokens_per_parameter', math.nan):.0f} "
        f"tokens per parameter (the same total tokens). Seeds: {list(settings.seeds)}; "
        f"learning rates tried for both: {list(settings.lrs)}.",
        "",
        "| target | value | met |",
        "|---|---|---|",
    ]
    for key, (op, bound) in TARGETS.items():
        value = report.metrics.get(key)
        met = report.metrics.get(f"{key}_target_met")
        shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
        lines.append(f"| `{key}` {op} {bound} | {shown} | {'yes' if met else 'MISSED'} |")
    report.text("\n".join(lines))


def _plot_seeds(report: Report, per_seed: list[dict[str, Any]]) -> None:
    fig, ax = new_figure()
    keys = [
        k
        for k in (
            "ppl_ratio_vs_dense",
            "ppl_ratio_vs_dense_prefix32",
            "ppl_ratio_vs_dense_oracle_routing",
        )
        if k in per_seed[0]
    ]
    for i, key in enumerate(keys):
        ax.scatter([i] * len(per_seed), [r[key] for r in per_seed], label=key)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.95, color="tab:red", ls="--", lw=0.8, label="target 0.95")
    ax.set_xticks(
        range(len(keys)), [k.removeprefix("ppl_ratio_vs_dense") or "prefix M" for k in keys]
    )
    ax.set_ylabel("perplexity ratio, mixture / dense")
    ax.set_title("per seed")
    ax.legend(fontsize=7)
    report.plot("ppl_ratio_by_seed", fig)


__all__ = ["BenchSettings", "assignment_benchmark", "inference_benchmark", "run_bench"]
