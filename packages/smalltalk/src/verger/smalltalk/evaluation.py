"""Evaluate a model folder: routed perplexity by domain and by prefix length, vs the dense LM.

Every expert (and the dense baseline) scores every validation sequence once; a routing (one
per prefix length) then picks, for each sequence, one expert's losses. The same losses give
the oracle routing (each sequence's best expert), an upper bound on what a router can reach.
Perplexity is ``exp`` of the mean token NLL over all tokens of the sequences (the prefix
included, as the paper reports it); ``*_after_prefix`` figures count only the tokens the
routers did not see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from verger.core.bench import Report, new_figure
from verger.smalltalk.config import SmallTalkConfig
from verger.smalltalk.data import DATA_DIR, SequenceSet
from verger.smalltalk.experts import load_expert, read_expert_info
from verger.smalltalk.flops import FlopAccount, account
from verger.smalltalk.metrics import routing_purity
from verger.smalltalk.model import SmallTalkLM, sequence_losses
from verger.smalltalk.routers import read_history
from verger.smalltalk.sharding import load_shard_index


@dataclass
class EvalResult:
    """Named figures (for ``metrics.json``), tables and the curves the plots draw."""

    metrics: dict[str, Any]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    by_prefix: dict[str, list[float]] = field(default_factory=dict)  # plot data
    by_domain: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion: list[list[int]] = field(default_factory=list)
    domain_names: list[str] = field(default_factory=list)


def _ppl(nll: torch.Tensor, tokens_per_row: int) -> float:
    if nll.numel() == 0:
        return math.nan
    return math.exp(float(nll.double().sum()) / (tokens_per_row * nll.numel()))


def _prefix_name(m: int, seq_len: int) -> str:
    """``prefix32`` (metric-name form), ``prefix_full`` for the whole sequence."""
    return "prefix_full" if m == seq_len else f"prefix{m}"


def evaluate(
    folder: str | Path,
    *,
    prefix_lens: tuple[int, ...] = (32, 64, 0),
    max_sequences: int | None = None,
    rows: torch.Tensor | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> EvalResult:
    """Score a model folder's validation sequences (see the module docstring).

    ``rows``: score only these validation sequences (before ``max_sequences``).
    ``prefix_lens``: routing prefixes to compare (0 = the full sequence); the config's own
    prefix is always included. Needs every expert; the dense baseline is optional (its
    figures are left out when it was not trained).
    """
    folder = Path(folder)
    config = SmallTalkConfig.load(folder)
    model = SmallTalkLM.from_pretrained(folder, device=device)
    val = SequenceSet.load(folder / DATA_DIR / "validation.safetensors")
    if rows is not None:  # a fixed part of the held-out set (bench: tuning or test half)
        val = val.subset(rows)
    if max_sequences is not None and max_sequences < len(val):
        gen = torch.Generator().manual_seed(seed)
        val = val.subset(torch.randperm(len(val), generator=gen)[:max_sequences].sort().values)
    seq_len = val.seq_len
    prefixes = sorted({seq_len if m == 0 else m for m in (*prefix_lens, config.prefix_len)})
    for m in prefixes:
        model._prefix(m, seq_len)  # a prefix longer than the sequence is a clear error
    losses = torch.stack(
        [
            sequence_losses(expert, val.tokens, batch_size=batch_size)  # type: ignore[arg-type]
            for expert in model.experts
        ]
    )  # [E, N, T]
    per_seq = losses.sum(dim=2)  # [E, N]
    rows = torch.arange(len(val))
    try:
        dense_model = load_expert(folder, "dense", device=device)
        dense = sequence_losses(dense_model, val.tokens, batch_size=batch_size)
        dense_info: dict[str, Any] | None = read_expert_info(folder, "dense")
    except FileNotFoundError:
        dense, dense_info = None, None
    metrics: dict[str, Any] = {"eval_sequences": len(val), "seq_len": seq_len}
    names = val.domain_names
    by_prefix: dict[str, list[float]] = {"prefix": [], "mixture": [], "after_prefix": []}
    routes = {}
    for m in prefixes:
        experts = model.route(val.tokens[:, :seq_len], m)
        routes[m] = experts
        chosen = losses[experts, rows]  # [N, T]
        key = _prefix_name(m, seq_len)
        ppl = _ppl(chosen.sum(dim=1), seq_len)
        metrics[f"ppl_mixture_{key}"] = ppl
        by_prefix["prefix"].append(float(m))
        by_prefix["mixture"].append(ppl)
        after = _ppl(chosen[:, m - 1 :].sum(dim=1), seq_len - m + 1) if m <= seq_len else math.nan
        by_prefix["after_prefix"].append(after)
        if dense is not None:
            dense_ppl = _ppl(dense.sum(dim=1), seq_len)
            metrics[f"ppl_ratio_vs_dense_{key}"] = ppl / dense_ppl
            if m < seq_len:
                dense_after = _ppl(dense[:, m - 1 :].sum(dim=1), seq_len - m + 1)
                metrics[f"ppl_ratio_vs_dense_after_{key}"] = after / dense_after
    main = routes[config.prefix_len]
    chosen = losses[main, rows]
    metrics["ppl_mixture"] = _ppl(chosen.sum(dim=1), seq_len)
    best = per_seq.argmin(dim=0)
    metrics["ppl_oracle_routing"] = _ppl(per_seq[best, rows], seq_len)
    metrics["routing_agreement_with_oracle"] = float((main == best).float().mean())
    if dense is not None:
        metrics["ppl_dense"] = _ppl(dense.sum(dim=1), seq_len)
        metrics["ppl_ratio_vs_dense"] = metrics["ppl_mixture"] / metrics["ppl_dense"]
        metrics["ppl_ratio_vs_dense_oracle_routing"] = (
            metrics["ppl_oracle_routing"] / metrics["ppl_dense"]
        )
    by_domain: dict[str, dict[str, float]] = {}
    for d, name in enumerate(names):
        mask = val.domains == d
        if not bool(mask.any()):
            continue
        row = {"mixture": _ppl(chosen[mask].sum(dim=1), seq_len)}
        metrics[f"ppl_mixture_{name}"] = row["mixture"]
        if dense is not None:
            row["dense"] = _ppl(dense[mask].sum(dim=1), seq_len)
            metrics[f"ppl_dense_{name}"] = row["dense"]
            metrics[f"ppl_ratio_vs_dense_{name}"] = row["mixture"] / row["dense"]
        by_domain[name] = row
    known = val.domains >= 0
    purity = routing_purity(main[known], val.domains[known], config.num_experts, len(names))
    metrics["routing_purity_by_domain"] = purity["purity"]
    for name, value in zip(names, purity["by_domain"]):
        if not math.isnan(value):
            metrics[f"routing_purity_{name}"] = value
    flops = flop_account(folder, config)
    metrics["router_train_flops_fraction"] = flops.router_train_fraction
    metrics["router_inference_flops_fraction"] = flops.router_inference_fraction
    metrics["mixture_train_flops_ratio_vs_dense"] = flops.mixture_vs_dense_training
    for m in prefixes:
        f = flop_account(folder, config, inference_prefix_len=m)
        metrics[f"router_inference_flops_fraction_{_prefix_name(m, seq_len)}"] = (
            f.router_inference_fraction
        )
    expert_info = read_expert_info(folder, 0)
    params = int(expert_info["parameters"])
    metrics["expert_parameters"] = params
    metrics["router_parameters"] = sum(p.numel() for p in model.routers[0].parameters())
    metrics["expert_tokens_per_parameter"] = expert_info["tokens_trained"] / params
    if dense_info is not None:
        metrics["dense_tokens_per_parameter"] = dense_info["tokens_trained"] / params
    metrics["shard_purity"] = load_shard_index(folder).manifest.get("purity")
    tables = {
        "Perplexity by domain": [
            {"domain": name, **row, "sequences": int((val.domains == d).sum())}
            for d, (name, row) in enumerate(by_domain.items())
        ],
        "Perplexity by routing prefix": [
            {
                "prefix": _prefix_name(int(m), seq_len).removeprefix("prefix").strip("_"),
                "mixture": p,
                "after prefix": a,
                "dense": metrics.get("ppl_dense", math.nan),
            }
            for m, p, a in zip(by_prefix["prefix"], by_prefix["mixture"], by_prefix["after_prefix"])
        ],
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return EvalResult(metrics, tables, by_prefix, by_domain, purity["confusion"], list(names))


def flop_account(
    folder: str | Path, config: SmallTalkConfig, *, inference_prefix_len: int | None = None
) -> FlopAccount:
    """The FLOPs of the run recorded in a model folder (EM history, shard, expert jobs)."""
    from verger.smalltalk.data import data_manifest

    vocab = int(data_manifest(folder)["vocab_size"])
    history = read_history(folder)
    shard = load_shard_index(folder)
    expert_steps = [int(read_expert_info(folder, e)["steps"]) for e in range(config.num_experts)]
    try:
        dense_steps = int(read_expert_info(folder, "dense")["steps"])
    except FileNotFoundError:
        dense_steps = config.total_dense_steps
    return account(
        router=config.router_model(vocab),
        expert=config.expert_model(vocab),
        num_experts=config.num_experts,
        seq_len=config.seq_len,
        prefix_len=config.prefix_len,
        router_steps=config.em_rounds * config.em_steps_per_round,
        router_batch_size=config.router_batch_size,
        em_rounds=config.em_rounds,
        em_sequences=int(history["em_sequences"]),
        train_sequences=int(shard.manifest["sequences"]),
        expert_steps=expert_steps,
        dense_steps=dense_steps,
        batch_size=config.batch_size,
        inference_prefix_len=inference_prefix_len,
    )


def add_to_report(report: Report, result: EvalResult, *, prefix: str = "") -> None:
    """The evaluation's tables and plots (perplexity by prefix, by domain; routing matrix)."""
    for title, rows in result.tables.items():
        report.table(title, rows)
    fig, ax = new_figure()
    xs = result.by_prefix["prefix"]
    ax.plot(xs, result.by_prefix["mixture"], marker="o", label="mixture (all tokens)")
    ax.plot(xs, result.by_prefix["after_prefix"], marker="s", label="mixture (after prefix)")
    if "ppl_dense" in result.metrics:
        ax.axhline(result.metrics["ppl_dense"], color="black", ls="--", label="dense baseline")
    ax.axhline(
        result.metrics["ppl_oracle_routing"], color="tab:green", ls=":", label="oracle routing"
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("routing prefix (tokens)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("perplexity by routing prefix length")
    ax.legend()
    report.plot(f"{prefix}ppl_by_prefix", fig)
    fig, ax = new_figure(width=7.0)
    names = list(result.by_domain)
    xs = list(range(len(names)))
    if "ppl_dense" in result.metrics:
        ax.bar([x - 0.2 for x in xs], [result.by_domain[n]["dense"] for n in names], 0.4,
               label="dense", color="tab:gray")  # fmt: skip
    ax.bar([x + 0.2 for x in xs], [result.by_domain[n]["mixture"] for n in names], 0.4,
           label="mixture", color="tab:blue")  # fmt: skip
    ax.set_xticks(xs, names)
    ax.set_ylabel("validation perplexity")
    ax.set_title("perplexity by domain")
    ax.legend()
    report.plot(f"{prefix}ppl_by_domain", fig)
    fig, ax = new_figure(width=5.0, height=4.0)
    matrix = torch.tensor(result.confusion, dtype=torch.float64)
    shares = matrix / matrix.sum(dim=0, keepdim=True).clamp_min(1)
    ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(result.domain_names)), result.domain_names, rotation=30)
    ax.set_yticks(range(matrix.shape[0]), [f"expert {e}" for e in range(matrix.shape[0])])
    ax.set_title("share of each domain routed to each expert")
    report.plot(f"{prefix}routing_by_domain", fig)
