"""``train``: one run on the package contract (settings, run folder, device).

Simulated workers in this process; one worker per rank (or islands of ranks) under torchrun,
where every rank runs the command and verger-core's run folder lets rank 0 own it (the other
ranks follow its decision: fresh, resumed, finished or refused); or torchft replica groups
(``engine="torchft"``): this process is worker ``worker`` of a run spread over hosts, or,
without a worker index, every group of the run on this host with a local lighthouse.
Worker checkpoints go to ``<out>/checkpoints`` (or ``checkpoint_dir``) and are resumed only
with ``--resume``; a torchft run recovers from its live peers instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from verger.core.distributed import destroy_distributed, init_distributed
from verger.core.runs import Run, launch_id
from verger.sparse_diloco.checkpoint import RunCheckpointer
from verger.sparse_diloco.settings import TrainSettings


def _rank_device(device: torch.device) -> torch.device:
    """Under torchrun each rank takes its own GPU (``cuda:LOCAL_RANK``)."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def _round_line(r: int, figures: dict[str, float]) -> None:
    shown = ", ".join(
        f"{k} {v:.4g}" for k, v in figures.items() if k in ("inner_loss", "val_loss", "tokens")
    )
    print(f"round {r}: {shown}", file=sys.stderr, flush=True)


def train_process(
    settings: TrainSettings,
    device: torch.device,
    *,
    seed: int,
    checkpoint_dir: Path | None,
) -> dict[str, Any]:
    """Train on this process (every rank of a torchrun job calls it); returns the result."""
    from verger.sparse_diloco.runner import distributed_main, train_run

    spec = settings.train_spec(_rank_device(device), checkpoint_dir, seed)
    if settings.engine == "torchft":
        return _torchft(settings, spec)
    if dist.is_initialized():  # torchrun: one worker per rank, or islands of ranks
        return distributed_main(spec)
    return train_run(spec, progress=_round_line)


def _torchft(settings: TrainSettings, spec: Any) -> dict[str, Any]:
    from verger.sparse_diloco.runner import torchft_main
    from verger.sparse_diloco.torchft_engine import TorchFTOptions

    worker = settings.worker
    if worker is None and "REPLICA_GROUP_ID" in os.environ:
        worker = int(os.environ["REPLICA_GROUP_ID"])
    shared: dict[str, Any] = dict(
        min_workers=settings.min_workers, quorum_timeout_s=settings.quorum_timeout
    )
    if worker is None:  # one host: a lighthouse and W local replica groups (gloo)
        from verger.sparse_diloco.torchft_launch import run_local

        return run_local(spec, options=shared, restart_delay_s=None).results[0]
    if str(spec.task_options["device"]).startswith("cuda"):
        shared["backend"] = "nccl"  # one GPU per rank of each group
    island = dist.group.WORLD if dist.is_initialized() else None  # torchrun: an island
    options = TorchFTOptions(lighthouse=settings.lighthouse, worker=worker, **shared)
    return torchft_main(spec, options, island_group=island)


def run_train(settings: TrainSettings, run: Run) -> dict[str, Any]:
    """The ``train`` command on every rank; rank 0 reports the metrics of the run."""
    checkpoint_dir = None
    if settings.engine != "torchft":
        checkpoint_dir = settings.checkpoint_dir or run.path("checkpoints")
        # checked on every rank before the process group forms, so no rank has saved yet
        saved = RunCheckpointer(checkpoint_dir).complete_rounds(settings.workers)
        if saved and not run.resumed:
            raise ValueError(
                f"checkpoint_dir {checkpoint_dir} holds round {saved[-1]} of an earlier run: "
                "pass --resume to continue it, or give an empty --checkpoint-dir"
            )
    if run.rebuild_corpus and run.leader:
        from verger.sparse_diloco.lm import rebuild_corpus

        rebuild_corpus()  # before the ranks meet: they load the corpus once rank 0 is done
    torchrun = launch_id()[1] is not None
    if torchrun:  # every rank is a worker (or one rank of an island)
        init_distributed("nccl" if run.device.type == "cuda" else "gloo", device=None)
    try:
        result = train_process(settings, run.device, seed=run.seed, checkpoint_dir=checkpoint_dir)
    finally:
        if torchrun:
            destroy_distributed()
    if not run.leader:
        return {}  # rank 0 writes the report
    history = result["history"]
    last = history[-1] if history else {}
    metrics: dict[str, Any] = {
        "rounds": settings.rounds,
        "workers": settings.workers,
        "bytes_sent": int(result["bytes_sent"]),
        "resumed_from_round": int(result.get("resumed_from") or 0),
        "device": str(_rank_device(run.device)),
        "engine": settings.engine,
    }
    metrics["final_val_loss"] = float(result["val_loss"])
    if "tokens" in last:
        metrics["tokens"] = float(last["tokens"])
    if settings.engine == "torchft":
        metrics["syncs"] = int(result["syncs"])
    return metrics
