"""The whole SmallTalk pipeline into one model folder (what ``demo`` and ``bench`` run).

1. data: corpus, tokenizer, train/validation sequences (``data/``);
2. routers by EM (``routers/``), in this process;
3. sharding of the training set by the routers (``shards/``), in this process;
4. the E experts and the dense baseline as separate processes, each its own
   ``train-expert`` job (``experts/expert-XX``, ``experts/dense``).

Every step resumes: data and shards are written once, the EM loop and each job checkpoint,
and a finished job is not run again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from verger.smalltalk.config import SmallTalkConfig
from verger.smalltalk.data import prepare_data
from verger.smalltalk.jobs import JobOutcome, expert_command, job_state, run_jobs
from verger.smalltalk.routers import RouterResult, load_routers, routers_fingerprint, train_routers
from verger.smalltalk.sharding import ShardIndex, shard_corpus


@dataclass
class PipelineResult:
    """What each stage took and produced."""

    folder: Path
    seconds: dict[str, float] = field(default_factory=dict)
    routers: RouterResult | None = None
    shards: ShardIndex | None = None
    jobs: dict[str, JobOutcome] = field(default_factory=dict)


def prepare_routers_and_shards(
    config: SmallTalkConfig,
    folder: str | Path,
    *,
    device: torch.device,
    seed: int,
    rebuild_corpus: bool = False,
    show_progress: bool | None = None,
) -> PipelineResult:
    """Stages 1-3 in this process (see the module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    result = PipelineResult(folder)
    config.save(folder)
    t0 = time.perf_counter()
    tokenizer, sets = prepare_data(
        config, folder, rebuild_corpus=rebuild_corpus, progress=show_progress
    )
    result.seconds["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result.routers = train_routers(
        config,
        sets["train"],
        folder,
        vocab_size=tokenizer.vocab_size,
        device=device,
        seed=seed,
        show_progress=show_progress,
    )
    result.seconds["routers"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result.shards = shard_corpus(
        config,
        folder,
        routers=load_routers(folder, config.num_experts, device=device),
        train=sets["train"],
        routers_fingerprint=routers_fingerprint(folder, config.num_experts),
        device=device,
        show_progress=show_progress,
    )
    result.seconds["shard"] = time.perf_counter() - t0
    return result


def train_all_experts(
    config: SmallTalkConfig,
    folder: str | Path,
    *,
    device: torch.device,
    seed: int,
    parallel: int,
    threads: int | None = 1,
    dense: bool = True,
) -> dict[str, JobOutcome]:
    """Stage 4: every expert (and the dense baseline) as its own process.

    The dense job (``num_experts`` times an expert's steps) starts first, so that with
    ``parallel=2`` it runs beside the experts one after the other: the two lanes finish
    together.
    """
    names = (["dense"] if dense else []) + [str(e) for e in range(config.num_experts)]
    commands = {
        name: expert_command(folder, name, device=str(device), seed=seed, threads=threads)
        for name in names
        if job_state(folder, name) != "finished"
    }
    if not commands:
        return {}
    return run_jobs(commands, logs=Path(folder) / "job-logs", parallel=parallel)


def build_mixture(
    config: SmallTalkConfig,
    folder: str | Path,
    *,
    device: torch.device,
    seed: int,
    parallel: int,
    threads: int | None = 1,
    rebuild_corpus: bool = False,
    show_progress: bool | None = None,
) -> PipelineResult:
    """All four stages into ``folder``."""
    result = prepare_routers_and_shards(
        config,
        folder,
        device=device,
        seed=seed,
        rebuild_corpus=rebuild_corpus,
        show_progress=show_progress,
    )
    t0 = time.perf_counter()
    result.jobs = train_all_experts(
        config, folder, device=device, seed=seed, parallel=parallel, threads=threads
    )
    result.seconds["experts"] = time.perf_counter() - t0
    return result
