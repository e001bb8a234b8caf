"""``demo``: 4 real gloo worker processes on the embedded corpus, DiLoCo vs partial updates."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from verger.core.bench import Report
from verger.core.distributed import run_multiprocess
from verger.sparse_diloco.bench import bench_settings, plot_curves
from verger.sparse_diloco.runner import TrainSpec, distributed_runs


def run_demo(out_dir: str | Path, *, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Train both methods with one process per worker; write the report; return the metrics."""
    settings = bench_settings(quick)
    config = settings["config"]
    specs = {
        name: TrainSpec(
            task="lm",
            task_options=settings["task_options"],
            plan=plan,
            config=replace(config),
            rounds=settings["rounds"],
            seed=seed,
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
        "outer_steps": settings["rounds"],
        "tokens": histories["diloco"][-1]["tokens"],
        "wall_s": wall,
    }
    report = Report(out_dir, title="verger-sparse-diloco demo: 4 gloo workers")
    for key, value in metrics.items():
        report.metric(key, value)
    report.text(
        "Four worker processes (torch.distributed, gloo) train a tiny byte-level LM on the "
        "embedded corpus (CPython code and docs). DiLoCo: every worker trains every parameter. "
        "Partial updates: worker k trains only hidden units [k/4, (k+1)/4) of every MLP (plus "
        "shared attention, embeddings, norms) and sends only those pseudo-gradients; the outer "
        "step averages each coordinate over the workers that trained it."
    )
    report.table(
        "Results",
        [{"method": k, "final val loss": final[k], "MB sent": sent[k] / 1e6} for k in specs],
    )
    report.plot("val_loss", plot_curves(histories))
    report.write()
    return metrics
