"""The step commands: ``train-routers``, ``shard``, ``train-expert``, ``eval``, ``generate``.

Each is ``fn(settings, run)`` on the verger-core package contract. A model folder ``--out M``
is the ``train-routers`` run (``config.json``, ``data/``, ``routers/``); the later steps are
runs of their own inside it: ``M/shards``, ``M/experts/expert-XX`` (one per expert, and
``M/experts/dense``), ``M/eval``, ``M/generate``. Each reads what the earlier steps wrote and
says which command to run when something is missing.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from verger.core.bench import Report, new_figure
from verger.core.runs import Run
from verger.smalltalk.config import (
    EvalSettings,
    GenerateSettings,
    ShardSettings,
    SmallTalkConfig,
    TrainExpertSettings,
    expert_name,
)
from verger.smalltalk.data import DATA_DIR, SequenceSet, data_manifest, prepare_data
from verger.smalltalk.evaluation import add_to_report, evaluate
from verger.smalltalk.experts import ExpertResult, read_expert_info, train_expert
from verger.smalltalk.routers import (
    ROUTERS_DIR,
    load_routers,
    routers_fingerprint,
    train_routers,
)
from verger.smalltalk.sharding import INDEX, MANIFEST, SHARDS_DIR, shard_corpus


def model_folder_of(run: Run, depth: int = 1) -> Path:
    """The model folder a step's run folder sits in (``depth`` levels up)."""
    folder = run.folder
    for _ in range(depth):
        folder = folder.parent
    return folder


# --- train-routers --------------------------------------------------------------------------


def run_train_routers(settings: SmallTalkConfig, run: Run) -> Report:
    """Prepare the data and train the routers by EM into the model folder ``--out``."""
    config = settings.as_model_config()
    folder = run.folder
    run.path("config.json")
    config.save(folder)
    run.path(DATA_DIR)
    tokenizer, sets = prepare_data(config, folder, rebuild_corpus=run.rebuild_corpus)
    run.path(ROUTERS_DIR)
    result = train_routers(
        config,
        sets["train"],
        folder,
        vocab_size=tokenizer.vocab_size,
        device=run.device,
        seed=run.seed,
        resume=True,
    )
    report = run.report("verger-smalltalk train-routers")
    last = result.history[-1]
    report.metric("em_rounds", len(result.history))
    report.metric("em_sequences", len(result.pool))
    report.metric("em_moved_fraction_last_round", last.moved_fraction)
    if last.purity is not None:
        report.metric("em_routing_purity", last.purity)
    report.metric("router_parameters", result.routers[0].num_parameters())
    report.metric("train_sequences", len(sets["train"]))
    report.metric("validation_sequences", len(sets["validation"]))
    report.metric("score_exchange_payload_bytes", int(result.exchange["total_payload_bytes"]))
    report.metric("score_exchange_wire_bytes", float(result.exchange["total_wire_bytes"]))
    report.metric("em_seconds", sum(h.seconds for h in result.history))
    report.table("EM rounds", [_round_row(h) for h in result.history])
    _plot_em(report, result.history)
    return report


def _round_row(h: Any) -> dict[str, Any]:
    row = dataclasses.asdict(h)
    row["router_loss"] = sum(h.router_loss.values()) / max(1, len(h.router_loss))
    row["shard_sizes"] = "/".join(str(s) for s in h.shard_sizes)
    return row


def _plot_em(report: Report, history: list[Any]) -> None:
    fig, ax = new_figure()
    rounds = [h.round for h in history]
    ax.plot(rounds, [h.moved_fraction for h in history], marker="o", label="moved fraction")
    if all(h.purity is not None for h in history):
        ax.plot(rounds, [h.purity for h in history], marker="s", label="routing purity")
    ax.set_xlabel("EM round")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("EM: reassignments and purity against the corpus domains")
    report.plot("em_rounds", fig)


# --- shard ----------------------------------------------------------------------------------


def run_shard(settings: ShardSettings, run: Run) -> Report:
    """Score and split the training set with the trained routers (``M/shards``)."""
    folder = model_folder_of(run)
    config = SmallTalkConfig.load(folder)
    train = SequenceSet.load(folder / DATA_DIR / "train.safetensors")
    for name in ("scores", INDEX, MANIFEST, *(f"expert-{e:02d}.safetensors" for e in range(config.num_experts))):  # fmt: skip
        run.path(name)
    index = shard_corpus(
        config,
        folder,
        routers=load_routers(folder, config.num_experts, device=run.device),
        train=train,
        routers_fingerprint=routers_fingerprint(folder, config.num_experts),
        device=run.device,
        chunk_size=settings.chunk_size,
    )
    manifest = index.manifest
    report = run.report("verger-smalltalk shard")
    report.metric("sequences", manifest["sequences"])
    for e, count in enumerate(manifest["counts"]):
        report.metric(f"shard_sequences_expert{e}", count)
    if manifest["purity"] is not None:
        report.metric("shard_purity", manifest["purity"])
        for name, value in manifest["purity_by_domain"].items():
            report.metric(f"shard_purity_{name}", value)
    report.metric("score_exchange_payload_bytes", int(manifest["exchange"]["total_payload_bytes"]))
    report.metric("prefix_tokens_scored", manifest["prefix_tokens_scored"])
    if manifest["assign_relative_gap"] is not None:
        report.metric("assign_relative_gap", manifest["assign_relative_gap"])
    report.metric("shard_seconds", manifest["seconds"])
    if manifest["confusion"] is not None:
        rows = [
            {"expert": e, **dict(zip(manifest["domain_names"], counts))}
            for e, counts in enumerate(manifest["confusion"])
        ]
        report.table("Training sequences by expert and domain", rows)
    return report


# --- train-expert ---------------------------------------------------------------------------


def run_train_expert(settings: TrainExpertSettings, run: Run) -> dict[str, Any]:
    """Train one expert (or ``dense``) as an independent job (``M/experts/<name>``)."""
    folder = model_folder_of(run, depth=2)
    SmallTalkConfig.load(folder)  # a clear error when --out is not a model folder
    for name in ("checkpoints", "logs", "model", "expert.json"):
        run.path(name)
    if settings.nproc == 1 and settings.engine == "ddp":
        result = train_expert(
            folder,
            settings.expert,
            out=run.folder,
            device=run.device,
            seed=run.seed,
            resume=run.resumed,
        )
        info = dataclasses.asdict(result)
    else:
        info = _launch_ranks(settings, run, folder)
    return {
        "steps": info["steps"],
        "tokens_trained": info["tokens_trained"],
        "sequences": info["sequences"],
        "parameters": info["parameters"],
        "tokens_per_parameter": info["tokens_trained"] / info["parameters"],
        "final_loss": info["final_loss"] if info["final_loss"] is not None else -1.0,
        "world_size": info["world_size"],
        "train_seconds": info["seconds"],
    }


def _launch_ranks(settings: TrainExpertSettings, run: Run, folder: Path) -> dict[str, Any]:
    """Start this job's ``nproc`` ranks with torchrun (their world is this job only)."""
    if settings.engine == "deepspeed":
        run.path("ds_checkpoints")
    spec = {
        "model_folder": str(folder),
        "expert": settings.expert,
        "out": str(run.folder),
        "device": str(run.device),
        "seed": run.seed,
        "resume": run.resumed,
        "engine": settings.engine,
        "zero_stage": settings.zero_stage,
        "show_progress": False,
        "threads": None,
    }
    job = run.path("job.json")
    job.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={settings.nproc}",
        "-m",
        "verger.smalltalk.expert_rank",
        str(job),
    ]
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    if code != 0:
        raise RuntimeError(f"the {settings.nproc}-rank job of {settings.expert} exited with {code}")
    return read_expert_info(folder, settings.expert)


# --- eval and generate ----------------------------------------------------------------------


def run_eval(settings: EvalSettings, run: Run) -> Report:
    """Routed perplexity by domain and prefix length against the dense baseline (``M/eval``)."""
    folder = model_folder_of(run)
    result = evaluate(
        folder,
        prefix_lens=settings.prefix_lens,
        max_sequences=settings.max_sequences,
        batch_size=settings.batch_size,
        device=run.device,
        seed=run.seed,
    )
    report = run.report("verger-smalltalk eval")
    report.metrics_from(result.metrics)
    add_to_report(report, result)
    return report


def run_generate(settings: GenerateSettings, run: Run) -> dict[str, Any]:
    """Route a prompt and continue it with the chosen expert (``M/generate/samples.txt``)."""
    import torch

    from verger.smalltalk.model import SmallTalkLM

    folder = model_folder_of(run)
    model = SmallTalkLM.from_pretrained(folder, device=run.device)
    gen = torch.Generator(device=run.device).manual_seed(run.seed)
    text, expert = model.generate(
        settings.prompt,
        settings.max_new_tokens,
        prefix_len=settings.prefix_len,
        temperature=settings.temperature,
        top_k=settings.top_k,
        generator=gen,
    )
    sample = run.path("samples.txt")
    sample.write_text(f"[expert {expert}]\n{settings.prompt}{text}\n", encoding="utf-8")
    print(f"[expert {expert}] {settings.prompt}{text}")
    return {"expert": expert, "new_tokens": settings.max_new_tokens}


def subfolder_of_expert(settings: TrainExpertSettings) -> str:
    return f"experts/{expert_name(settings.expert)}"


__all__ = [
    "ExpertResult",
    "data_manifest",
    "run_eval",
    "run_generate",
    "run_shard",
    "run_train_expert",
    "run_train_routers",
    "subfolder_of_expert",
]

_ = SHARDS_DIR  # the folder `shard` runs in (see the module docstring)
