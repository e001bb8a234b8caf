"""The settings of each command: one validated dataclass each (verger.core.settings).

Every field is declared once: its default, its ``--quick`` value, its bounds and its help.
The CLI derives ``--<field>`` flags from them; library code receives the dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from verger.core.settings import Settings, SettingsError, option
from verger.qat_scaling.config import QuantConfig
from verger.qat_scaling.data import DEFAULT_DOMAINS, DataConfig
from verger.qat_scaling.models import SIZES
from verger.qat_scaling.sweep import SweepConfig
from verger.qat_scaling.training import TrainConfig

BIT_NAMES = ("1", "ternary", "2", "3", "4", "6", "8")
CORPUS_DOMAINS = ("code", "docstrings", "docs", "music", "drama", "poetry")


def parse_bits(names: tuple[str, ...]) -> tuple[int | str, ...]:
    """``("ternary", "4")`` -> ``("ternary", 4)``."""
    return tuple(n if n == "ternary" else int(n) for n in names)


@dataclass(kw_only=True)
class GridSettings(Settings):
    """A sweep: the grid, the quantizer, the data and the training of every run."""

    sizes: tuple[str, ...] = option(("xs", "s"), quick=("xxs",), choices=tuple(SIZES), help="model sizes")  # fmt: skip
    bits: tuple[str, ...] = option(("2", "4"), quick=("4",), choices=BIT_NAMES, help="bit widths")
    fractions: tuple[float, ...] = option(
        (0.1, 0.25, 0.5, 0.75), quick=(0.25, 0.5), above=0.0, at_most=1.0, help="QAT fractions f"
    )
    tokens: tuple[int, ...] = option(
        (131_072, 262_144), quick=(32_768,), at_least=1, help="training tokens per run"
    )
    schedule: Literal["unfused", "fused", "both"] = option(
        "unfused", help="FP cooldown then QAT (unfused), cooldown & QAT fusion, or both"
    )
    seeds: int = option(1, at_least=1, help="seeds per run (--seed, --seed + 1, ...)")
    fp_baselines: bool = option(True, help="a full-precision run per size, budget and seed")
    group_size: int | None = option(None, at_least=2, help="weights per scale (none: per channel)")
    scale_init: Literal["paretoq", "lsq", "torchao"] = option("paretoq", help="scale init rule")
    embedding_bits: int | None = option(None, choices=(4, 6, 8), help="embedding/head bits (none: FP)")  # fmt: skip
    domains: tuple[str, ...] = option(DEFAULT_DOMAINS, choices=CORPUS_DOMAINS, help="corpus domains")  # fmt: skip
    max_bytes_per_domain: int = option(1_000_000, quick=300_000, at_least=10_000, help="corpus bytes per domain")  # fmt: skip
    seq_len: int = option(32, at_least=8, help="tokens per sequence")
    batch_size: int = option(16, at_least=1, help="sequences per step")
    val_batches: int = option(16, quick=4, at_least=1, help="validation batches per domain")
    lr: float = option(3e-3, above=0.0, help="peak learning rate (AdamW)")
    weight_decay: float = option(
        0.1, at_least=0.0, help="AdamW weight decay (not on norms, scales)"
    )
    warmup_steps: int = option(10, quick=4, at_least=0, help="warmup steps of the FP trunk")
    cooldown_fraction: float = option(0.2, at_least=0.0, at_most=0.9, help="WSD cooldown share")  # fmt: skip
    qat_warmup_steps: int = option(10, quick=4, at_least=0, help="re-warmup of unfused QAT")
    checkpoint_every: int = option(100, at_least=1, identity=False, help="steps between checkpoints")  # fmt: skip
    workers: int = option(1, at_least=1, identity=False, help="local processes (one per GPU on CUDA)")  # fmt: skip

    def validate(self) -> None:
        if len(set(self.sizes)) != len(self.sizes) or len(set(self.bits)) != len(self.bits):
            raise SettingsError("sizes and bits must not repeat")
        try:
            self.sweep_config(0)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    def sweep_config(self, seed: int) -> SweepConfig:
        """The :class:`SweepConfig` these settings describe, with seeds from ``seed``."""
        fused = {"unfused": (False,), "fused": (True,), "both": (False, True)}[self.schedule]
        return SweepConfig(
            sizes=self.sizes,
            bits=parse_bits(self.bits),
            fractions=self.fractions,
            tokens=self.tokens,
            fused=fused,
            seeds=tuple(range(seed, seed + self.seeds)),
            fp_baselines=self.fp_baselines,
            quant=QuantConfig(
                group_size=self.group_size,
                scale_init=self.scale_init,
                embedding_bits=self.embedding_bits,
            ),
            data=DataConfig(
                domains=self.domains,
                max_bytes_per_domain=self.max_bytes_per_domain,
                seq_len=self.seq_len,
                batch_size=self.batch_size,
                val_batches=self.val_batches,
            ),
            train=TrainConfig(
                lr=self.lr,
                weight_decay=self.weight_decay,
                warmup_steps=self.warmup_steps,
                cooldown_fraction=self.cooldown_fraction,
                qat_warmup_steps=self.qat_warmup_steps,
                checkpoint_every=self.checkpoint_every,
            ),
        )


@dataclass(kw_only=True)
class SweepSettings(GridSettings):
    """``sweep``: train a grid of runs into the run folder's ``runs.jsonl``."""


@dataclass(kw_only=True)
class FitSettings(Settings):
    """``fit``: the loss law and f*(S) from run records."""

    records: Path | None = option(None, help="runs.jsonl to fit (a sweep's output); required")
    starts: int = option(12, quick=4, at_least=1, help="optimizer starts (best of 20x screened)")
    bootstrap: int = option(100, quick=10, at_least=0, help="bootstrap refits for intervals")
    heldout_tokens: tuple[int, ...] = option((), at_least=1, help="token budgets to hold out")
    leave_one_out: bool = option(True, quick=False, help="leave-one-out refits (slow)")


@dataclass(kw_only=True)
class PlanSettings(Settings):
    """``plan``: the best bit width and QAT fraction for a budget, from a fitted law."""

    law: Path | None = option(None, help="law.json written by `fit`")
    records: Path | None = option(None, help="or: runs.jsonl, fitted first")
    size_by: Literal["memory", "params"] = option("memory", help="size the model by")
    memory_bytes: float = option(65_536.0, above=0.0, help="bytes of quantized weights")
    n_params: float = option(1e5, above=0.0, help="quantized parameters (size_by=params)")
    train_by: Literal["tokens", "flops"] = option("tokens", help="training budget in")
    tokens: float = option(2e6, above=0.0, help="training tokens (train_by=tokens)")
    flops: float = option(1e13, above=0.0, help="training FLOPs, D = C / 6N (train_by=flops)")
    bits: tuple[str, ...] = option(BIT_NAMES, choices=BIT_NAMES, help="candidate bit widths")
    min_params: float | None = option(None, above=0.0, help="smallest model considered")
    max_params: float | None = option(None, above=0.0, help="largest model considered")
    confidence: float = option(0.95, above=0.0, at_most=0.999, help="interval coverage")
    bootstrap: int = option(50, quick=10, at_least=0, help="bootstrap refits when fitting records")
