"""``bench``'s torchft figures: the same 3-worker LM run on torchft and on a process group,
and a torchft run in which a worker is SIGKILLed mid-run and restarted.

- ``torchft_step_time_ratio_vs_process_group``: median round time (H inner steps and the
  sync, seen by worker 0) of the torchft run over that of `ProcessGroupTransport` with one
  gloo process per worker; same spec, no faults, both measured after their processes
  started (start-up excluded).
- ``fault_run_val_loss_ratio_vs_clean``: final validation loss of the run in which worker 2
  SIGKILLs itself half-way through round R/2 and is restarted, over the clean torchft run.
  Every data block is applied once in both (the faulted run takes more syncs).
- ``rejoin_seconds``: from the restart of the killed worker's process to the moment it has
  recovered the global state from a live peer.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any

from verger.core.distributed import run_multiprocess
from verger.sparse_diloco.config import DiLoCoConfig
from verger.sparse_diloco.runner import TrainSpec, distributed_main

WORKERS = 3


def torchft_available() -> bool:
    try:
        import torchft  # noqa: F401
    except ImportError:
        return False
    return True


def _median_round_s(history: list[dict[str, float]]) -> float:
    rounds = [h["round_s"] for h in history[1:]] or [h["round_s"] for h in history]
    return statistics.median(rounds)


def torchft_figures(
    task_options: dict[str, Any], config: DiLoCoConfig, *, rounds: int, seed: int
) -> dict[str, Any]:
    """Run the three trainings; return the metrics named in the module docstring."""
    from verger.sparse_diloco.torchft_engine import RunLedger, SyncRecord
    from verger.sparse_diloco.torchft_launch import LocalLighthouse, run_local

    spec = TrainSpec(
        task="lm",
        task_options=task_options,
        plan="mlp",
        config=replace(config, num_workers=WORKERS, num_fragments=1),
        rounds=rounds,
        seed=seed,
    )
    options = dict(timeout_s=60, quorum_timeout_s=300, linger_s=60)

    def lighthouse() -> LocalLighthouse:
        # a majority quorum, dead groups noticed within 2 s, stragglers waited for (no
        # timing-induced exclusions in a benchmark)
        return LocalLighthouse(min_replicas=2, heartbeat_timeout_ms=2000, join_timeout_ms=60_000)

    with lighthouse() as house:
        clean = run_local(spec, lighthouse=house, options=options, restart_delay_s=None)
    process_group = run_multiprocess(distributed_main, WORKERS, spec, timeout=1800.0)
    kill = (2, rounds // 2, config.inner_steps // 2)
    with lighthouse() as house:
        faulted = run_local(
            replace(spec, kill_at=kill), lighthouse=house, options=options, restart_delay_s=1.0
        )
    if not faulted.rejoin_seconds:
        raise RuntimeError(f"the worker killed at {kill} did not rejoin the torchft run")
    ours, theirs = clean.results[0], process_group[0]
    hurt = faulted.results[0]
    log = [SyncRecord(s, tuple(map(tuple, c)), tuple(p)) for s, c, p in hurt["log"]]
    return {
        "torchft_step_time_ratio_vs_process_group": _median_round_s(ours["history"])
        / _median_round_s(theirs["history"]),
        "fault_run_val_loss_ratio_vs_clean": hurt["val_loss"] / ours["val_loss"],
        "rejoin_seconds": faulted.rejoin_seconds[0],
        "round_ms_torchft": _median_round_s(ours["history"]) * 1e3,
        "round_ms_process_group": _median_round_s(theirs["history"]) * 1e3,
        "val_loss_torchft_clean": ours["val_loss"],
        "val_loss_torchft_fault": hurt["val_loss"],
        "val_loss_process_group": theirs["history"][-1]["val_loss"],
        "fault_run_syncs": hurt["syncs"],
        "clean_run_syncs": ours["syncs"],
        "fault_run_blocks_applied_once": RunLedger.of(log, WORKERS, rounds).consistent,
    }
