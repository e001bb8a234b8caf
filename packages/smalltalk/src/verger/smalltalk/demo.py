"""``demo``: the whole SmallTalk pipeline in one command, the experts as separate processes.

Routers by EM, sharding, E experts and the dense baseline each trained by its own
``train-expert`` process, then perplexity by domain and by routing prefix length against the
dense baseline (plots). ``--quick`` keeps it under about two minutes on 2 CPU cores: too
little training for the mixture to beat the dense model (see ``bench`` for that); it shows
the pipeline, the routing and the bookkeeping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from verger.core.bench import Report
from verger.core.runs import Run
from verger.core.settings import option
from verger.smalltalk.config import SmallTalkConfig
from verger.smalltalk.evaluation import add_to_report, evaluate
from verger.smalltalk.pipeline import build_mixture


@dataclass(kw_only=True)
class DemoSettings(SmallTalkConfig):
    """``demo``: the mixture recipe (:class:`SmallTalkConfig`) plus how to run the jobs."""

    parallel: int = option(5, at_least=1, identity=False, help="expert processes at once")
    prefix_lens: tuple[int, ...] = option(
        (8, 16, 32, 0), at_least=0, help="routing prefixes to evaluate (0: the full sequence)"
    )
    eval_sequences: int | None = option(
        None, quick=256, at_least=1, help="validation sequences (none: all)"
    )


def run_demo(settings: DemoSettings, run: Run) -> Report:
    """Build a mixture in ``<out>/model`` and evaluate it against its dense baseline."""
    start = time.perf_counter()
    config = settings.as_model_config()
    folder = run.path("model")
    built = build_mixture(
        config,
        folder,
        device=run.device,
        seed=run.seed,
        parallel=settings.parallel,
        threads=1,
        rebuild_corpus=run.rebuild_corpus,
    )
    t0 = time.perf_counter()
    result = evaluate(
        folder,
        prefix_lens=settings.prefix_lens,
        max_sequences=settings.eval_sequences,
        device=run.device,
        seed=run.seed,
    )
    built.seconds["eval"] = time.perf_counter() - t0
    report = run.report("verger-smalltalk demo: an asynchronous mixture of LMs in miniature")
    report.metrics_from(result.metrics)
    assert built.routers is not None and built.shards is not None
    report.metric("em_routing_purity", built.routers.history[-1].purity or 0.0)
    report.metric(
        "score_exchange_payload_bytes",
        int(built.routers.exchange["total_payload_bytes"])
        + int(built.shards.manifest["exchange"]["total_payload_bytes"]),
    )
    report.metric("expert_processes", len(built.jobs))
    for stage, seconds in built.seconds.items():
        report.metric(f"{stage}_seconds", seconds)
    report.metric("total_seconds", time.perf_counter() - start)
    report.text(
        f"{config.num_experts} experts of {result.metrics['expert_parameters']} parameters "
        f"({result.metrics['expert_tokens_per_parameter']:.0f} tokens per parameter each) and "
        f"a dense baseline of the same size on the same total tokens "
        f"({result.metrics.get('dense_tokens_per_parameter', float('nan')):.0f} tokens per "
        f"parameter); routers of {result.metrics['router_parameters']} parameters, prefix "
        f"{config.prefix_len} of {config.seq_len} tokens, device {run.device}. Each expert and "
        "the dense model trained in its own process (`train-expert` jobs; logs in "
        "`model/job-logs/`). Perplexity counts every token of each validation sequence; the "
        "`after prefix` curve counts only the tokens the routers did not see."
    )
    add_to_report(report, result)
    return report
