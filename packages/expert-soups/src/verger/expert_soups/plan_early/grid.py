"""The experiment grid of "Plan Early": in-domain sample size x target domains x method.

Each cell is one method specialized to one target with one sample size (and seed); its
record (a JSON line in ``records.jsonl``) holds the validation loss before and after the
fine-tune and the method's cost account. The number of domains to serve enters through the
accounts (C(N) = shared + N x per-domain), so the planner can answer for any N. The grid is
resumable: cells already recorded are skipped, pretrained models are cached under
``models/``, and a torn last line (a killed write) is cut off before appending. Records
hold no wall times, so the same seed gives the same records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from verger.core.files import atomic_write_text
from verger.core.progress import progress
from verger.core.validation import integer
from verger.expert_soups.evaluation import build_tasks, domain_losses
from verger.expert_soups.plan_early.methods import (
    METHODS,
    MethodContext,
    MethodSettings,
    Target,
    get_method,
)
from verger.expert_soups.workbench import Workbench

RECORDS_NAME = "records.jsonl"


@dataclass(kw_only=True)
class GridSpec:
    """Which cells to run: ``methods`` x ``sample_tokens`` (in-domain tokens per target) x
    ``targets`` (corpus domains; None = all) x ``seeds``."""

    methods: tuple[str, ...] = METHODS
    sample_tokens: tuple[int, ...] = (4096, 16384)
    targets: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"GridSpec.methods={self.methods!r}: choose from {METHODS}")
        self.sample_tokens = tuple(self.sample_tokens)
        if not self.sample_tokens:
            raise ValueError("GridSpec.sample_tokens must list at least one sample size")
        for n in self.sample_tokens:
            if isinstance(n, int) and not isinstance(n, bool) and n == 0:
                raise ValueError(
                    "GridSpec.sample_tokens holds 0: every method needs in-domain tokens"
                )
            integer("GridSpec.sample_tokens", n, at_least=2)
        if self.targets is not None:
            self.targets = tuple(self.targets)
            if not self.targets:
                raise ValueError("GridSpec.targets must name at least one domain (or be None)")
        self.seeds = tuple(self.seeds)
        if not self.seeds:
            raise ValueError("GridSpec.seeds must list at least one seed")
        for s in self.seeds:
            integer("GridSpec.seeds", s, at_least=0)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``records.jsonl`` (a torn last line is skipped)."""
    p = Path(path)
    if not p.is_file():
        return []
    records = []
    lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break  # a write killed midway
            raise ValueError(f"{p}: line {i + 1} is not JSON") from None
    return records


def _cut_torn_tail(path: Path) -> None:
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            atomic_write_text(path, text[: text.rfind("\n") + 1])


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _key(record: dict[str, Any]) -> tuple[Any, ...]:
    return record["method"], record["target"], record["sample_tokens"], record["seed"]


def make_targets(
    bench: Workbench, names: Sequence[str], sample_tokens: int, *, seed: int
) -> list[tuple[Target, dict[str, float]]]:
    """The targets (corpus domains) with in-domain samples of ``sample_tokens`` tokens."""
    tasks = build_tasks(
        bench.corpus, bench.clusters, bench.tokenizer,
        domains=names, n_mixtures=0, sample_tokens=sample_tokens, seed=seed,
    )  # fmt: skip
    return [(Target(t.name, t.h, t.sample_tokens), t.mixture) for t in tasks]


def run_grid(
    spec: GridSpec,
    bench: Workbench,
    settings: MethodSettings,
    out_dir: str | Path,
    *,
    device: Any = "cpu",
    show_progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Run every missing cell of ``spec``; returns all the records of ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RECORDS_NAME
    _cut_torn_tail(path)
    done = {_key(r) for r in read_records(path)}
    names = list(spec.targets) if spec.targets is not None else bench.domains
    cells = [
        (seed, n, name, method)
        for seed in spec.seeds
        for n in spec.sample_tokens
        for name in names
        for method in spec.methods
        if (method, name, n, seed) not in done
    ]
    contexts: dict[int, MethodContext] = {}
    targets: dict[tuple[int, int], dict[str, tuple[Target, dict[str, float]]]] = {}
    for seed, n, name, method in progress(cells, desc="plan-early grid", enabled=show_progress):
        if seed not in contexts:
            contexts[seed] = MethodContext(
                bench, replace(settings, seed=seed), device=device,
                cache_dir=out / "models" / f"seed-{seed}", show_progress=False,
            )  # fmt: skip
        ctx = contexts[seed]
        if (seed, n) not in targets:
            made = make_targets(bench, names, n, seed=seed)
            targets[(seed, n)] = {t.name: (t, mix) for t, mix in made}
        target, mixture = targets[(seed, n)][name]
        outcome = get_method(method).specialize(ctx, target)
        domains = list(mixture)

        def loss(model: Any, domains: list[str] = domains, mixture: dict = mixture) -> float:
            losses = domain_losses(model, bench.val, domains, device=device)
            return sum(w * losses[d] for d, w in mixture.items())

        record = {
            "method": method,
            "target": name,
            "sample_tokens": n,
            "seed": seed,
            "loss_pretrained": loss(outcome.base),
            "loss_specialized": loss(outcome.tuned.model),
            "finetune_best_step": outcome.tuned.best_step,
            **outcome.account.to_dict(),
        }
        _append(path, record)
    return read_records(path)
