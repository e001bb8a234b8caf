"""``bench``: the mixture against the dense baseline at equal per-expert size and total tokens.

The held-out text is cut in two halves (:func:`~verger.smalltalk.data.heldout_halves`).
On the first seed, a mixture with its dense baseline is built per learning rate of ``lrs``
(``<out>/tune-lr-X``, one EM run shared); each model's rate is picked on the tuning half.
The other seeds are built at the picked rates (``<out>/seed-S``), and every reported figure
is on the test half: means over seeds with their spread and per-seed values. Then the curve:
the first seed again at shorter expert budgets (``<out>/curve-steps-N``), the gap against
tokens per parameter, beside train perplexities (how much the repeated epochs overfit). The
paper's gain needs experts limited by their capacity rather than by their tokens: tiny
models far past saturation. Last, the balanced assignment itself (the greedy rule's and the
fast solver's gaps against the exact optimum on the run's router scores, and both at a
million rows) and the measured inference cost.
"""

from __future__ import annotations

import math
import shutil
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
from verger.smalltalk.data import DATA_DIR, SequenceSet, heldout_halves
from verger.smalltalk.evaluation import EvalResult, add_to_report, evaluate
from verger.smalltalk.experts import load_expert
from verger.smalltalk.model import SmallTalkLM, sequence_losses
from verger.smalltalk.pipeline import build_mixture, train_all_experts
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
    "dense_train_ppl",
    "expert_train_ppl",
)


@dataclass(kw_only=True)
class BenchSettings(SmallTalkConfig):
    """``bench``: the recipe at bench scale, the seeds, the learning-rate grid and the curve.

    The default regime is chosen so that the claim can show at all on a CPU: experts (and
    the dense model) of 7.5k parameters trained to about 550 tokens per parameter each
    (the dense model to 2200), where a model of that size is limited by its capacity rather
    than by the tokens it saw; the curve shows the gap at 1/16 and 1/4 of that budget.
    """

    seq_len: int = option(128, at_least=2, help="tokens per sequence")
    d_model: int = option(16, at_least=2, help="expert (and dense) width")
    n_layers: int = option(1, at_least=1, help="expert layers")
    mlp_hidden: int = option(48, at_least=1, help="expert SwiGLU hidden width")
    router_d_model: int = option(8, at_least=2, help="router width")
    router_mlp_hidden: int = option(16, at_least=1, help="router SwiGLU hidden width")
    expert_steps: int = option(4000, quick=300, at_least=1, help="optimizer steps per expert")
    batch_size: int = option(8, at_least=1, help="sequences per step")
    warmup_steps: int = option(100, quick=20, at_least=0, help="linear warmup steps")
    em_rounds: int = option(4, quick=3, at_least=1, help="EM rounds")
    em_steps_per_round: int = option(30, at_least=1, help="router steps per round")
    em_sequences: int | None = option(
        1024, quick=512, at_least=2, help="sequences reassigned each round (none: all)"
    )
    max_bytes_per_domain: int | None = option(
        1_500_000, quick=300_000, at_least=1, help="corpus budget per domain (none: all)"
    )
    checkpoint_every: int = option(
        1000, quick=100, at_least=1, identity=False, help="steps between expert checkpoints"
    )
    seeds: tuple[int, ...] = option((0, 1, 2), quick=(0,), at_least=0, help="seeds")
    lrs: tuple[float, ...] = option(
        (3e-3, 1e-2, 3e-2),
        quick=(1e-2,),
        above=0.0,
        help="learning rates tried for both the experts and the dense model (first seed, "
        "picked on the tuning half of the held-out text)",
    )
    curve: tuple[int, ...] = option(
        (16, 4),
        quick=(4,),
        at_least=1,
        help="the tokens-per-parameter curve: extra runs at expert_steps divided by each",
    )
    parallel: int = option(2, at_least=1, identity=False, help="expert processes at once")
    prefix_lens: tuple[int, ...] = option(
        (8, 16, 32, 0), at_least=0, help="routing prefixes to evaluate (0: full)"
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


ROUTING_PARTS = (DATA_DIR, "routers", "shards")  # shards last: its presence marks a copy done


def _clone_routing(source: Path, folder: Path) -> None:
    """Give ``folder`` the data, routers and shards of ``source`` (same seed: the routers
    would come out identical, so the EM loop and the sharding run once per seed)."""
    if (folder / "shards").is_dir():
        return
    for part in ROUTING_PARTS:
        shutil.copytree(source / part, folder / part, dirs_exist_ok=True)


def _build(
    config: SmallTalkConfig, folder: Path, settings: BenchSettings, run: Run, seed: int,
    routing_from: Path | None = None,
) -> Path:  # fmt: skip
    if routing_from is None:
        build_mixture(config, folder, device=run.device, seed=seed, parallel=settings.parallel,
                      threads=1, rebuild_corpus=run.rebuild_corpus)  # fmt: skip
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    _clone_routing(routing_from, folder)
    config.save(folder)
    train_all_experts(config, folder, device=run.device, seed=seed, parallel=settings.parallel,
                      threads=1)  # fmt: skip
    return folder


def train_perplexity(folder: Path, name: str, *, rows: int = 1024, seed: int = 0) -> float:
    """Perplexity of one trained model on ``rows`` sequences of its own training data (the
    whole training set for ``dense``, its shard for an expert): against the held-out
    perplexity, how far the repeated epochs overfit."""
    if name == "dense":
        data = SequenceSet.load(folder / DATA_DIR / "train.safetensors")
    else:
        data = load_shard_index(folder).load_shard(int(name))
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:rows]
    model = load_expert(folder, name)
    return float(sequence_losses(model, data.tokens[pick]).mean().exp())


def _train_ppls(folder: Path, num_experts: int) -> dict[str, float]:
    experts = [math.log(train_perplexity(folder, str(e))) for e in range(num_experts)]
    return {
        "dense_train_ppl": train_perplexity(folder, "dense"),
        "expert_train_ppl": math.exp(statistics.fmean(experts)),
    }


def _combine(mixture: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
    """The mixture's figures with every ratio taken against ``dense`` (the dense model at
    its own best learning rate, possibly from another folder of the same seed)."""
    row = dict(mixture)
    scale = mixture["ppl_dense"] / dense["ppl_dense"]
    for key, value in mixture.items():
        if key.startswith("ppl_ratio_vs_dense"):
            row[key] = value * scale
    row["ppl_dense"] = dense["ppl_dense"]
    return row


def run_bench(settings: BenchSettings, run: Run) -> Report:
    """Tune, test over seeds, trace the tokens-per-parameter curve; then the assignment
    solvers and the inference cost.

    1. Tuning: on the first seed, a mixture (with its dense baseline) per learning rate of
       ``lrs``; each model's learning rate is picked on the tuning half of the held-out text
       (:func:`heldout_halves`), so both get the same tuning effort.
    2. Test: every seed at the picked rates (``lr`` for the experts, ``dense_lr`` for the
       dense model); the figures are on the test half, which no choice has seen.
    3. Curve: the first seed again at ``expert_steps / c`` for each ``c`` of ``curve``
       (same routers and shards), the gap against tokens per parameter.
    """
    start = time.perf_counter()
    base = settings.as_model_config()
    first = settings.seeds[0]
    tune_folders: dict[float, Path] = {}
    for lr in settings.lrs:
        source = next(iter(tune_folders.values()), None)
        tune_folders[lr] = _build(base.replace(lr=lr), run.path(f"tune-lr-{lr:g}"), settings,
                                  run, first, routing_from=source)  # fmt: skip
    some = next(iter(tune_folders.values()))
    tune_rows, test_rows = heldout_halves(
        SequenceSet.load(some / DATA_DIR / "validation.safetensors")
    )
    tuning = {
        lr: evaluate(folder, prefix_lens=(), rows=tune_rows, device=run.device).metrics
        for lr, folder in tune_folders.items()
    }
    lr_mix = min(settings.lrs, key=lambda lr: tuning[lr]["ppl_mixture"])
    lr_dense = min(settings.lrs, key=lambda lr: tuning[lr]["ppl_dense"])
    tuned = base.replace(lr=lr_mix, dense_lr=None if lr_dense == lr_mix else lr_dense)

    def test(folder: Path, **kw: Any) -> EvalResult:
        return evaluate(folder, rows=test_rows, device=run.device, **kw)

    per_seed = []
    first_result = None
    for seed in settings.seeds:
        if seed == first:
            mix_folder = tune_folders[lr_mix]
            result = test(mix_folder, prefix_lens=settings.prefix_lens)
            dense = result.metrics
            if lr_dense != lr_mix:
                dense = test(tune_folders[lr_dense], prefix_lens=()).metrics
            first_result = result
            row = _combine(result.metrics, dense)
            row |= _train_ppls(mix_folder, settings.num_experts)
            row["dense_train_ppl"] = train_perplexity(tune_folders[lr_dense], "dense")
        else:
            folder = _build(tuned, run.path(f"seed-{seed}"), settings, run, seed)
            row = dict(test(folder, prefix_lens=settings.prefix_lens).metrics)
            row |= _train_ppls(folder, settings.num_experts)
        row["seed"] = seed
        per_seed.append(row)
    assert first_result is not None
    curve = [_curve_point(per_seed[0], settings.expert_steps)]
    for divisor in sorted(set(settings.curve)):
        steps = max(1, settings.expert_steps // divisor)
        if steps == settings.expert_steps:
            continue
        folder = _build(tuned.replace(expert_steps=steps), run.path(f"curve-steps-{steps}"),
                        settings, run, first, routing_from=tune_folders[lr_mix])  # fmt: skip
        row = dict(test(folder, prefix_lens=()).metrics)
        row |= _train_ppls(folder, settings.num_experts)
        curve.append(_curve_point(row, steps))
    curve.sort(key=lambda r: r["expert_steps"])

    report = run.report("verger-smalltalk bench: SmallTalk LM vs a dense LM of an expert's size")
    _aggregate(report, per_seed)
    report.metric("lr_mixture", lr_mix)
    report.metric("lr_dense", lr_dense)
    for lr in settings.lrs:
        report.metric(f"tune_ppl_mixture_lr{lr:g}", tuning[lr]["ppl_mixture"])
        report.metric(f"tune_ppl_dense_lr{lr:g}", tuning[lr]["ppl_dense"])
    report.metric("seeds", len(settings.seeds))
    report.metric("test_sequences", len(test_rows))
    report.metric("tune_sequences", len(tune_rows))
    for point in curve:
        tag = f"steps{point['expert_steps']}"
        for key in ("ppl_ratio_vs_dense", "ppl_ratio_vs_dense_oracle_routing",
                    "expert_tokens_per_parameter"):  # fmt: skip
            report.metric(f"curve_{key}_{tag}", point[key])
    for key, (op, bound) in TARGETS.items():
        value = report.metrics.get(key)
        if isinstance(value, float):
            met = value <= bound if op == "<=" else value < bound
            report.metric(f"{key}_target_met", bool(met))
    report.metrics_from(assignment_benchmark(tune_folders[lr_mix], settings.assign_rows, run.seed))
    report.metrics_from(
        inference_benchmark(
            tune_folders[lr_mix],
            rows=settings.inference_rows,
            prefix_lens=settings.prefix_lens,
            device=run.device,
            repeats=settings.inference_repeats,
        )
    )
    report.metric("bench_seconds", time.perf_counter() - start)
    _describe(report, settings, per_seed, tuning, curve)
    add_to_report(report, first_result, prefix="seed0_")
    _plot_seeds(report, per_seed)
    _plot_curve(report, curve)
    return report


def _curve_point(row: dict[str, Any], steps: int) -> dict[str, Any]:
    keys = ("ppl_ratio_vs_dense", "ppl_ratio_vs_dense_oracle_routing", "ppl_mixture",
            "ppl_dense", "expert_tokens_per_parameter", "dense_tokens_per_parameter",
            "dense_train_ppl", "expert_train_ppl")  # fmt: skip
    return {"expert_steps": steps} | {k: float(row[k]) for k in keys}


def _aggregate(report: Report, per_seed: list[dict[str, Any]]) -> None:
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


def _describe(
    report: Report,
    settings: BenchSettings,
    per_seed: list[dict[str, Any]],
    tuning: dict[float, dict[str, Any]],
    curve: list[dict[str, Any]],
) -> None:
    first = per_seed[0]
    lines = [
        f"E = {settings.num_experts} experts of {first['expert_parameters']} parameters, "
        f"{first['expert_tokens_per_parameter']:.0f} tokens per parameter each; the dense "
        f"baseline has the same size and {first.get('dense_tokens_per_parameter', math.nan):.0f} "
        f"tokens per parameter (the same total tokens). Seeds: {list(settings.seeds)}. "
        "Learning rates tried for both models on the first seed, each picked on the tuning "
        "half of the held-out text; every figure below is on the test half.",
        "",
        "| lr | mixture ppl (tuning half) | dense ppl (tuning half) |",
        "|---|---|---|",
        *(
            f"| {lr:g} | {m['ppl_mixture']:.4f} | {m['ppl_dense']:.4f} |"
            for lr, m in tuning.items()
        ),
        "",
        "| expert steps | expert / dense tokens per parameter | ratio | oracle-routing ratio "
        "| dense train / test ppl | expert train ppl, mixture test ppl |",
        "|---|---|---|---|---|---|",
        *(
            f"| {p['expert_steps']} | {p['expert_tokens_per_parameter']:.0f} / "
            f"{p['dense_tokens_per_parameter']:.0f} | {p['ppl_ratio_vs_dense']:.4f} | "
            f"{p['ppl_ratio_vs_dense_oracle_routing']:.4f} | {p['dense_train_ppl']:.3f} / "
            f"{p['ppl_dense']:.3f} | {p['expert_train_ppl']:.3f}, {p['ppl_mixture']:.3f} |"
            for p in curve
        ),
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


def _plot_curve(report: Report, curve: list[dict[str, Any]]) -> None:
    fig, ax = new_figure()
    xs = [p["expert_tokens_per_parameter"] for p in curve]
    ax.plot(xs, [p["ppl_ratio_vs_dense"] for p in curve], marker="o", label="routed (prefix M)")
    ax.plot(xs, [p["ppl_ratio_vs_dense_oracle_routing"] for p in curve], marker="s", ls=":",
            label="oracle routing")  # fmt: skip
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.95, color="tab:red", ls="--", lw=0.8, label="target 0.95")
    ax.set_xscale("log")
    ax.set_xlabel("tokens per parameter of each expert (dense: 4x)")
    ax.set_ylabel("test perplexity ratio, mixture / dense")
    ax.set_title("the mixture's gain against training length (first seed)")
    ax.legend(fontsize=7)
    report.plot("ppl_ratio_vs_tokens_per_parameter", fig)


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
