"""``python -m verger.smalltalk`` (console script ``verger-smalltalk``).

- ``train-routers --out M``: prepare the data, train the E routers by EM (model folder M);
- ``shard --out M``: score and split the training set with the routers (``M/shards``);
- ``train-expert --out M --expert E``: one expert (or ``dense``) as an independent job
  (``M/experts/expert-0E``; ``--nproc N`` runs it on N ranks through torchrun);
- ``eval --out M``: routed perplexity by domain and prefix length vs the dense baseline;
- ``generate --out M --prompt TEXT``: route a prompt, continue it with the chosen expert;
- ``demo``: the whole pipeline, the experts as separate processes;
- ``bench``: the mixture vs the dense baseline over seeds, and the assignment solvers.

The command line follows the verger-core package contract (:mod:`verger.core.cli`).
"""

from __future__ import annotations

from collections.abc import Sequence

from verger.core.cli import PackageCLI
from verger.smalltalk.bench import BenchSettings, run_bench
from verger.smalltalk.commands import (
    run_eval,
    run_generate,
    run_shard,
    run_train_expert,
    run_train_routers,
    subfolder_of_expert,
)
from verger.smalltalk.config import (
    EvalSettings,
    GenerateSettings,
    ShardSettings,
    SmallTalkConfig,
    TrainExpertSettings,
)
from verger.smalltalk.demo import DemoSettings, run_demo

cli = PackageCLI(
    "verger.smalltalk",
    description="verger-smalltalk: SmallTalk LM, an asynchronous mixture of language models",
)
cli.command(
    "train-routers",
    run_train_routers,
    settings=SmallTalkConfig,
    help="prepare the data and train the routers by EM (creates the model folder --out)",
    corpus=True,
)
cli.command(
    "shard",
    run_shard,
    settings=ShardSettings,
    help="split the training set by the routers (runs in --out/shards)",
    subfolder=lambda s: "shards",
)
cli.command(
    "train-expert",
    run_train_expert,
    settings=TrainExpertSettings,
    help="train one expert (or 'dense') as an independent job (--out/experts/<name>)",
    subfolder=subfolder_of_expert,
)
cli.command(
    "eval",
    run_eval,
    settings=EvalSettings,
    help="routed perplexity by domain and prefix vs the dense baseline (--out/eval)",
    subfolder=lambda s: "eval",
)
cli.command(
    "generate",
    run_generate,
    settings=GenerateSettings,
    help="route a prompt and continue it with its expert (--out/generate)",
    subfolder=lambda s: "generate",
)
cli.command(
    "demo", run_demo, settings=DemoSettings, help="the whole pipeline in miniature", corpus=True
)
cli.command(
    "bench",
    run_bench,
    settings=BenchSettings,
    help="mixture vs dense over seeds, and the assignment solvers",
    corpus=True,
)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
