"""``demo``: W gloo worker processes on the embedded corpus, DiLoCo vs partial updates."""

from __future__ import annotations

import time
from typing import Any

from verger.core.bench import Report
from verger.core.distributed import run_multiprocess
from verger.core.runs import Run
from verger.sparse_diloco.bench import machine_description, plot_curves
from verger.sparse_diloco.runner import TrainSpec, distributed_runs
from verger.sparse_diloco.settings import DemoSettings


def run_demo(settings: DemoSettings, run: Run) -> Report | dict[str, Any]:
    """Train both methods with one process per worker on ``run.device``; report them.

    The worker processes belong to this command: SIGTERM or Ctrl-C tears them down, and
    they end themselves if this process is killed (verger-core's ``run_multiprocess``).
    Under torchrun only rank 0 runs it (it starts its own workers); the others end at once.
    """
    if not run.leader:
        return {}
    if run.rebuild_corpus:
        from verger.sparse_diloco.lm import rebuild_corpus

        rebuild_corpus()
    config = settings.diloco_config()
    options = settings.task_options(run.device)
    specs = {
        name: TrainSpec(
            task="lm",
            task_options=options,
            plan=plan,
            config=config,
            rounds=settings.rounds,
            seed=run.seed,
        )
        for name, plan in (("diloco", "full"), ("partial", "mlp"))
    }
    start = time.perf_counter()
    ranks = run_multiprocess(
        distributed_runs, config.num_workers, list(specs.values()), timeout=1800.0
    )
    wall = time.perf_counter() - start
    results = dict(zip(specs, ranks[0]))
    histories = {k: r["history"] for k, r in results.items()}
    final = {k: h[-1]["val_loss"] for k, h in histories.items()}
    sent = {k: r["bytes_sent"] for k, r in results.items()}
    consistent = all(
        all((r[i]["params"][n] == ranks[0][i]["params"][n]).all() for n in ranks[0][i]["params"])
        for r in ranks
        for i in range(len(specs))
    )
    metrics: dict[str, Any] = {
        "val_loss_diloco": final["diloco"],
        "val_loss_partial": final["partial"],
        "val_loss_ratio_vs_diloco": final["partial"] / final["diloco"],
        "comm_bytes_ratio_vs_diloco": sent["partial"] / sent["diloco"],
        "trained_fraction_partial": results["partial"]["plan"]["trained_fraction_mean"],
        "global_state_identical_on_all_workers": bool(consistent),
        "workers": config.num_workers,
        "outer_steps": settings.rounds,
        "tokens": histories["diloco"][-1]["tokens"],
        "wall_s": wall,
        "device": str(run.device),
    }
    report = run.report(f"verger-sparse-diloco demo: {config.num_workers} gloo workers")
    for key, value in metrics.items():
        report.metric(key, value)
    report.text(
        f"{config.num_workers} worker processes (torch.distributed, gloo) train a byte-level LM "
        "on the embedded corpus (CPython code and docs). DiLoCo: every worker trains every "
        f"parameter. Partial updates: worker k trains only hidden units [k/{config.num_workers},"
        f" (k+1)/{config.num_workers}) of every MLP (plus shared attention, embeddings, norms) "
        "and sends only those pseudo-gradients; the outer step averages each coordinate over "
        f"the workers that trained it. Ran on {machine_description(run.device)}."
    )
    report.table(
        "Results",
        [{"method": k, "final val loss": final[k], "MB sent": sent[k] / 1e6} for k in specs],
    )
    report.plot("val_loss", plot_curves(histories))
    return report
