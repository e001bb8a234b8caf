"""``bench``: DiLoCo vs 1/4-MLP partial updates on the same tiny LM, tokens and outer steps.

Measured in one run: one worker's inner step (FLOPs by the FLOP counter and the analytic
model, peak tensor memory, interleaved wall time) and full simulated trainings of DiLoCo,
partial updates and their streaming variants (validation loss vs tokens and vs bytes sent).
"""

from __future__ import annotations

import copy
import os
import platform
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from verger.core.bench import Report, compare, count_flops, measure_peak_memory
from verger.core.runs import Run
from verger.sparse_diloco.bench_torchft import WORKERS, torchft_available, torchft_figures
from verger.sparse_diloco.config import DiLoCoConfig
from verger.sparse_diloco.engine import DiLoCo, Worker
from verger.sparse_diloco.flops import step_flops
from verger.sparse_diloco.runner import TrainSpec, get_task, train_run
from verger.sparse_diloco.settings import BenchSettings

VARIANTS = {  # name -> (plan, num_fragments)
    "diloco": ("full", 1),
    "partial": ("mlp", 1),
    "diloco-streaming": ("full", 2),
    "partial-streaming": ("mlp", 2),
}


def machine_description(device: torch.device) -> str:
    """What ran a command, for reports: the GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return (
        f"CPU ({cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} thread(s) "
        f"per process), torch {torch.__version__}"
    )


def inner_step_figures(
    task_options: dict[str, Any], config: DiLoCoConfig, *, repeats: int, device: torch.device
) -> dict[str, Any]:
    """FLOPs, peak memory and wall time of one worker's inner step, DiLoCo vs partial."""
    task = get_task("lm", 0, task_options)
    plans = {
        "diloco": TrainSpec(plan="full", config=config).make_plan(task.model),
        "partial": TrainSpec(plan="mlp", config=config).make_plan(task.model),
    }
    batch = task.data.batch(0, 0)
    seq_len = task_options["seq_len"]
    out: dict[str, Any] = {"plans": {k: p.summary() for k, p in plans.items()}}

    def engine(plan_name: str) -> DiLoCo:
        return DiLoCo(
            copy.deepcopy(task.model),
            plans[plan_name],
            config,
            loss_fn=task.loss_fn,
            data=task.data,
        )

    engines = {k: engine(k) for k in plans}
    for name, eng in engines.items():
        worker = eng.workers[0]

        def fwd_bwd(w: Worker = worker) -> None:
            task.loss_fn(w.model, batch).backward()

        out[f"{name}_flops"] = count_flops(fwd_bwd)
        worker.optimizer.zero_grad(set_to_none=True)
        out[f"{name}_flops_model"] = step_flops(
            task.model,
            plans[name],
            0,
            batch_size=batch[0].shape[0],
            seq_len=seq_len,
            attention_scores=False,
        ).total

        def train_a_worker(eng: DiLoCo = eng) -> None:
            # what one worker allocates: its model copy, gradients, AdamW state, activations
            fresh = eng.make_worker(1)
            for _ in range(2):
                eng.inner_step(fresh)

        out[f"{name}_peak_bytes"] = measure_peak_memory(train_a_worker, device=device)

    def step_of(e: DiLoCo) -> Callable[[], float]:
        return lambda: e.inner_step(e.workers[0])

    timings = compare(
        {k: step_of(e) for k, e in engines.items()},
        warmup=3,
        repeats=repeats,
    )
    out["timings"] = timings
    return out


def run_bench(settings: BenchSettings, run: Run) -> Report | dict[str, Any]:
    """Measure everything in one run on ``run.device``; return the report (rank 0 alone
    under torchrun: the other ranks end at once)."""
    if not run.leader:
        return {}
    if run.rebuild_corpus:
        from verger.sparse_diloco.lm import rebuild_corpus

        rebuild_corpus()
    from verger.core.progress import progress

    config = settings.diloco_config()
    task_options = settings.task_options(run.device)
    report = run.report("verger-sparse-diloco bench: DiLoCo vs partial updates")
    step = inner_step_figures(
        task_options, config, repeats=settings.step_repeats, device=run.device
    )
    histories: dict[str, list[dict[str, float]]] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in progress(list(VARIANTS), desc="trainings"):
        plan, fragments = VARIANTS[name]
        spec = TrainSpec(
            task="lm",
            task_options=task_options,
            plan=plan,
            config=replace(config, num_fragments=fragments),
            rounds=settings.rounds,
            seed=run.seed,
        )
        results[name] = train_run(spec)
        histories[name] = results[name]["history"]

    final = {k: h[-1]["val_loss"] for k, h in histories.items()}
    bytes_sent = {k: r["bytes_sent"] for k, r in results.items()}
    t = step["timings"]
    metrics = {
        "flops_ratio_vs_diloco": step["partial_flops"] / step["diloco_flops"],
        "peak_memory_ratio_vs_diloco": step["partial_peak_bytes"] / step["diloco_peak_bytes"],
        "step_time_ratio_vs_diloco": t["partial"].median_s / t["diloco"].median_s,
        "val_loss_ratio_vs_diloco": final["partial"] / final["diloco"],
        "comm_bytes_ratio_vs_diloco": bytes_sent["partial"] / bytes_sent["diloco"],
        "flops_model_ratio_vs_diloco": step["partial_flops_model"] / step["diloco_flops_model"],
        "flops_model_error": abs(step["partial_flops_model"] / step["partial_flops"] - 1),
        "val_loss_diloco": final["diloco"],
        "val_loss_partial": final["partial"],
        "val_loss_diloco_streaming": final["diloco-streaming"],
        "val_loss_partial_streaming": final["partial-streaming"],
        "comm_bytes_diloco": bytes_sent["diloco"],
        "comm_bytes_partial": bytes_sent["partial"],
        "peak_bytes_diloco": step["diloco_peak_bytes"],
        "peak_bytes_partial": step["partial_peak_bytes"],
        "step_ms_diloco": t["diloco"].median_s * 1e3,
        "step_ms_partial": t["partial"].median_s * 1e3,
        "trained_fraction_partial": step["plans"]["partial"]["trained_fraction_mean"],
        "tokens": histories["diloco"][-1]["tokens"],
        "outer_steps": settings.rounds,
        "quick": run.quick,
        "device": str(run.device),
    }
    ft_note = "torchft figures: not measured (pip install verger-sparse-diloco[torchft])."
    if not settings.torchft:
        ft_note = "torchft figures: not measured (--no-torchft)."
    elif torchft_available():
        ft_rounds = settings.torchft_rounds
        ft = torchft_figures(task_options, config, rounds=ft_rounds, seed=run.seed)
        metrics.update(ft)
        ft_note = (
            f"torchft ({WORKERS} workers, 1/{WORKERS} MLP, same LM and H): median round "
            f"{ft['round_ms_torchft']:.0f} ms on torchft vs {ft['round_ms_process_group']:.0f} "
            f"ms on a gloo process group; worker 2 SIGKILLed half-way through round "
            f"{ft_rounds // 2} of {ft_rounds} and restarted: rejoined in "
            f"{ft['rejoin_seconds']:.1f} s, {ft['fault_run_syncs']} syncs instead of "
            f"{ft['clean_run_syncs']}, every data block applied once: "
            f"{ft['fault_run_blocks_applied_once']}."
        )
    for key, value in metrics.items():
        report.metric(key, value)
    report.text(ft_note)
    report.text(
        f"Byte-level LM ({task_options}), {config.num_workers} workers, "
        f"H={config.inner_steps}, {settings.rounds} outer steps, same tokens for every "
        "variant. Partial = each worker trains 1/4 of every MLP's hidden units; attention, "
        "embeddings and norms are shared-trainable; its per-method defaults: inner lr / "
        "sqrt(trained fraction) and outer step scaled by sqrt(m[i] / W) per coordinate "
        "(DiLoCo is unaffected by both rules: f = 1, m = W). Peak memory: tensor storage a worker "
        "allocates for its model copy, gradients, AdamW state and activations (the anchor and "
        "outer momentum are host state between syncs, as in DiLoCo). Ran on "
        f"{machine_description(run.device)}."
    )
    report.timings("Inner step wall time", t, baseline="diloco")
    report.table(
        "Final validation loss and bytes sent",
        [{"variant": k, "val loss": final[k], "MB sent": bytes_sent[k] / 1e6} for k in VARIANTS],
    )
    report.plot("val_loss", plot_curves(histories))
    return report


def plot_curves(histories: dict[str, list[dict[str, float]]]) -> Any:
    """Validation loss vs tokens and vs bytes communicated, one line per variant."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in histories.items():
        style = "--" if "streaming" in name else "-"
        tokens = [h["tokens"] / 1e6 for h in hist]
        sent = [h["bytes_sent"] / 1e6 for h in hist]
        loss = [h["val_loss"] for h in hist]
        ax1.plot(tokens, loss, style, marker="o", ms=3, label=name)
        ax2.plot(sent, loss, style, marker="o", ms=3, label=name)
    ax1.set(xlabel="tokens (M, all workers)", ylabel="validation loss (nats/byte)")
    ax2.set(xlabel="bytes communicated (MB, all workers)", ylabel="validation loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig
