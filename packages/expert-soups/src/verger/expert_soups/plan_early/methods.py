"""The six ways to a small specialist of "Plan Early", each a pretrain and a specialize step.

All methods draw their generic data from the same clustered corpus and specialize with the
same :func:`~verger.expert_soups.finetune.fine_tune` on the same in-domain sample:

- ``slm``: a small generic model (natural mixture of the clusters), fine-tuned.
- ``llm``: a larger generic model (the same pretraining FLOPs, so fewer tokens), fine-tuned.
- ``slm_d``: the LLM fine-tuned on the sample is the teacher; the SLM is fine-tuned on the
  sample mixed with the teacher's next-token distributions.
- ``slm_is``: per target, a fresh SLM pretrained on generic windows resampled with
  w(c) = P(c | specific) / P(c | generic), then fine-tuned.
- ``slm_pn``: projected networks, a soup conditioned on clusters (experts on the MLPs,
  linear coefficients h E M^(l) per layer, one-hot h of each window's cluster during
  pretraining); instantiated at the target's dominant cluster (or histogram), fine-tuned.
- ``slm_mix``: a hard mixture of SLMs, each pretrained on a group of clusters; the target's
  histogram picks one, which is fine-tuned.

Pretrained models are cached under the context's folder (``save_pretrained`` / soup files),
and pretraining runs checkpoint there, so an interrupted grid resumes without redoing them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from verger.core.files import atomic_write_json
from verger.core.nn import TransformerConfig, TransformerLM
from verger.core.validation import finite_number, integer, one_of
from verger.expert_soups.config import (
    MetaDistributionConfig,
    SoupConfig,
)
from verger.expert_soups.finetune import FineTuneResult, FineTuneSettings, fine_tune
from verger.expert_soups.plan_early.costs import (
    CostAccount,
    lm_forward_flops,
    lm_parameters,
    lm_train_flops,
    mixing_flops,
    soup_train_flops,
)
from verger.expert_soups.plan_early.importance import importance_sampler
from verger.expert_soups.plan_early.routing import group_clusters, route
from verger.expert_soups.sizes import lm_config
from verger.expert_soups.soup import SoupOfExperts
from verger.expert_soups.training import (
    TrainSettings,
    rank_seed,
    soup_loss,
    soup_stream,
    train_model,
)
from verger.expert_soups.workbench import Workbench

METHODS = ("slm", "llm", "slm_d", "slm_is", "slm_pn", "slm_mix")


@dataclass(kw_only=True)
class MethodSettings:
    """Sizes and budgets of the methods (the same for every method where they meet).

    ``pretrain_steps`` x ``batch_size`` windows is the SLM's pretraining; the LLM gets the
    same FLOPs (fewer steps), SLM-is the same steps per target, SLM-pn the same steps (plus
    its weighted sums), SLM-mix the same steps split over its experts (``mix_split``
    ``"equal"`` or ``"proportional"`` to their clusters' tokens). ``pn_groups`` mixtures per
    step for SLM-pn (see :class:`~verger.expert_soups.MixtureStream`).
    """

    slm_size: str = "nano"
    llm_size: str = "tiny"
    pretrain_steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-2
    warmup_steps: int = 20
    pn_experts: int = 8
    pn_embedding: int = 16
    pn_groups: int = 4
    pn_instantiate: str = "argmax"
    mix_experts: int = 4
    mix_split: str = "equal"
    finetune: FineTuneSettings = field(default_factory=FineTuneSettings)
    seed: int = 0

    def __post_init__(self) -> None:
        integer("MethodSettings.pretrain_steps", self.pretrain_steps, at_least=1)
        integer("MethodSettings.batch_size", self.batch_size, at_least=1)
        finite_number("MethodSettings.lr", self.lr, above=0)
        integer("MethodSettings.warmup_steps", self.warmup_steps, at_least=0)
        integer("MethodSettings.pn_experts", self.pn_experts, at_least=1)
        integer("MethodSettings.pn_embedding", self.pn_embedding, at_least=1)
        integer("MethodSettings.pn_groups", self.pn_groups, at_least=1)
        if self.batch_size % self.pn_groups:
            raise ValueError(
                f"MethodSettings.batch_size={self.batch_size} must be a multiple of "
                f"pn_groups={self.pn_groups}"
            )
        one_of("MethodSettings.pn_instantiate", self.pn_instantiate, ("argmax", "histogram"))
        integer("MethodSettings.mix_experts", self.mix_experts, at_least=1)
        if self.mix_experts > self.pretrain_steps:
            raise ValueError(
                f"MethodSettings.mix_experts={self.mix_experts} needs at least as many "
                f"pretrain_steps (got {self.pretrain_steps})"
            )
        one_of("MethodSettings.mix_split", self.mix_split, ("equal", "proportional"))
        if not isinstance(self.finetune, FineTuneSettings):
            raise ValueError(f"MethodSettings.finetune={self.finetune!r} must be FineTuneSettings")
        integer("MethodSettings.seed", self.seed, at_least=0)


@dataclass
class Target:
    """A specialist domain: its in-domain sample (tokens) and cluster histogram h."""

    name: str
    h: torch.Tensor
    sample_tokens: torch.Tensor


@dataclass
class Outcome:
    """A method's specialist for one target: the model before fine-tuning, the fine-tune,
    and the cost account."""

    base: TransformerLM
    tuned: FineTuneResult
    account: CostAccount


class MethodContext:
    """What every method needs: the data, the settings, a device, a cache folder."""

    def __init__(
        self,
        bench: Workbench,
        settings: MethodSettings,
        *,
        device: torch.device | str = "cpu",
        cache_dir: str | Path | None = None,
        show_progress: bool | None = False,
    ) -> None:
        self.bench, self.settings = bench, settings
        self.device = torch.device(device)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.show_progress = show_progress
        seq, vocab = bench.clusters.seq_len, bench.tokenizer.vocab_size
        self.slm = lm_config(settings.slm_size, vocab_size=vocab, seq_len=seq)
        self.llm = lm_config(settings.llm_size, vocab_size=vocab, seq_len=seq)
        self._memo: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    def window_tokens(self) -> int:
        return self.settings.batch_size * self.bench.clusters.seq_len

    def train_settings(self, steps: int, *, seed_offset: int = 0) -> TrainSettings:
        s = self.settings
        return TrainSettings(
            steps=steps,
            batch_size=s.batch_size,
            lr=s.lr,
            warmup_steps=min(s.warmup_steps, steps - 1),
            seed=s.seed + seed_offset,
        )

    def llm_steps(self) -> int:
        """LLM steps with the SLM's pretraining FLOPs."""
        ratio = lm_train_flops(self.slm, 1) / lm_train_flops(self.llm, 1)
        return max(2, round(self.settings.pretrain_steps * ratio))

    def folder(self, *parts: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir.joinpath(*parts)

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def pretrained_lm(
        self, key: str, config: TransformerConfig, steps: int, sampler_weights: torch.Tensor
    ) -> TransformerLM:
        """A ``TransformerLM`` pretrained on the clusters mixed by ``sampler_weights``; cached
        (``<cache>/<key>/model``) and checkpointed (``<cache>/<key>/run``)."""

        def build() -> TransformerLM:
            folder = self.folder(key)
            if folder is not None and (folder / "model" / "config.json").is_file():
                return TransformerLM.from_pretrained(folder / "model", device=self.device)
            seed = self.settings.seed
            torch.manual_seed(seed)
            model = TransformerLM(config)
            settings = self.train_settings(steps)
            sampler = self.bench.clusters.sampler(
                sampler_weights, batch_size=settings.batch_size, seed=rank_seed(seed, 0)
            )
            train_model(
                model,
                sampler,
                settings,
                device=self.device,
                out_dir=None if folder is None else folder / "run",
                show_progress=self.show_progress,
                desc=key,
            )
            if folder is not None:
                model.save_pretrained(folder / "model")
            return model

        model: TransformerLM = self.memo(key, build)
        return model

    def finetune(self, model: TransformerLM, target: Target, **kw: Any) -> FineTuneResult:
        return fine_tune(
            model, target.sample_tokens, self.settings.finetune, device=self.device, **kw
        )


def finetune_flops(config: TransformerConfig, tuned: FineTuneResult) -> float:
    """FLOPs of a fine-tune: training steps plus the early-stopping evaluations."""
    return lm_train_flops(config, tuned.train_tokens) + lm_forward_flops(config, tuned.eval_tokens)


def _account(
    method: str,
    ctx: MethodContext,
    target: Target,
    *,
    shared: float,
    per_domain: float,
    specialize: float,
    serving: TransformerConfig,
) -> CostAccount:
    return CostAccount(
        method=method,
        pretrain_flops_shared=shared,
        pretrain_flops_per_domain=per_domain,
        specialize_flops_per_domain=specialize,
        inference_params=lm_parameters(serving),
        inference_flops_per_token=lm_forward_flops(serving, 1),
        in_domain_tokens=int(target.sample_tokens.numel()),
    )


class Method(Protocol):
    """A pretrain step (shared, run once) and a specialize step (per target)."""

    name: str

    def pretrain(self, ctx: MethodContext) -> None: ...

    def specialize(self, ctx: MethodContext, target: Target) -> Outcome: ...


class _GenericLM:
    """A generic model on the natural mixture of the clusters, fine-tuned (SLM and LLM)."""

    name = ""

    def config(self, ctx: MethodContext) -> TransformerConfig:
        raise NotImplementedError

    def steps(self, ctx: MethodContext) -> int:
        raise NotImplementedError

    def model(self, ctx: MethodContext) -> TransformerLM:
        weights = ctx.bench.clusters.natural_weights()
        return ctx.pretrained_lm(self.name, self.config(ctx), self.steps(ctx), weights)

    def pretrain(self, ctx: MethodContext) -> None:
        self.model(ctx)

    def shared_flops(self, ctx: MethodContext) -> float:
        return lm_train_flops(self.config(ctx), self.steps(ctx) * ctx.window_tokens())

    def specialize(self, ctx: MethodContext, target: Target) -> Outcome:
        base = self.model(ctx)
        tuned = ctx.finetune(base, target)
        config = self.config(ctx)
        account = _account(
            self.name, ctx, target, shared=self.shared_flops(ctx), per_domain=0.0,
            specialize=finetune_flops(config, tuned), serving=config,
        )  # fmt: skip
        return Outcome(base, tuned, account)


class SLM(_GenericLM):
    """A small generic model on the natural mixture, fine-tuned."""

    name = "slm"

    def config(self, ctx: MethodContext) -> TransformerConfig:
        return ctx.slm

    def steps(self, ctx: MethodContext) -> int:
        return ctx.settings.pretrain_steps


class LLM(_GenericLM):
    """A larger generic model with the SLM's pretraining FLOPs, fine-tuned."""

    name = "llm"

    def config(self, ctx: MethodContext) -> TransformerConfig:
        return ctx.llm

    def steps(self, ctx: MethodContext) -> int:
        return ctx.llm_steps()


class SLMDistilled:
    """SLM-d: the fine-tuned LLM teaches the SLM during the SLM's fine-tune."""

    name = "slm_d"

    def pretrain(self, ctx: MethodContext) -> None:
        SLM().pretrain(ctx)
        LLM().pretrain(ctx)

    def specialize(self, ctx: MethodContext, target: Target) -> Outcome:
        student, teacher = SLM().model(ctx), LLM().model(ctx)
        teacher_tuned = ctx.finetune(teacher, target)
        tuned = ctx.finetune(student, target, teacher=teacher_tuned.model)
        specialize = finetune_flops(ctx.slm, tuned) + lm_forward_flops(
            ctx.llm, tuned.teacher_tokens
        )
        account = _account(
            self.name, ctx, target,
            shared=SLM().shared_flops(ctx) + LLM().shared_flops(ctx),
            per_domain=finetune_flops(ctx.llm, teacher_tuned),
            specialize=specialize, serving=ctx.slm,
        )  # fmt: skip
        return Outcome(student, tuned, account)


class SLMImportance:
    """SLM-is: per target, an SLM pretrained on importance-resampled generic data."""

    name = "slm_is"

    def pretrain(self, ctx: MethodContext) -> None:
        """Nothing is shared: the pretraining depends on the target."""

    def model(self, ctx: MethodContext, target: Target) -> TransformerLM:
        key = f"slm_is/{target.name}-{target.sample_tokens.numel()}"

        def build() -> TransformerLM:
            folder = ctx.folder(*key.split("/"))
            if folder is not None and (folder / "model" / "config.json").is_file():
                return TransformerLM.from_pretrained(folder / "model", device=ctx.device)
            torch.manual_seed(ctx.settings.seed)
            model = TransformerLM(ctx.slm)
            settings = ctx.train_settings(ctx.settings.pretrain_steps)
            sampler = importance_sampler(
                ctx.bench.clusters, target.h, batch_size=settings.batch_size,
                seed=rank_seed(ctx.settings.seed, 0),
            )  # fmt: skip
            train_model(
                model, sampler, settings, device=ctx.device,
                out_dir=None if folder is None else folder / "run",
                show_progress=ctx.show_progress, desc=key,
            )  # fmt: skip
            if folder is not None:
                model.save_pretrained(folder / "model")
            return model

        model: TransformerLM = ctx.memo(key, build)
        return model

    def specialize(self, ctx: MethodContext, target: Target) -> Outcome:
        base = self.model(ctx, target)
        tuned = ctx.finetune(base, target)
        per_domain = lm_train_flops(ctx.slm, ctx.settings.pretrain_steps * ctx.window_tokens())
        account = _account(
            self.name, ctx, target, shared=0.0, per_domain=per_domain,
            specialize=finetune_flops(ctx.slm, tuned), serving=ctx.slm,
        )  # fmt: skip
        return Outcome(base, tuned, account)


class SLMProjected:
    """SLM-pn: a soup over the MLPs conditioned on one-hot clusters; instantiate, fine-tune."""

    name = "slm_pn"

    def config(self, ctx: MethodContext) -> SoupConfig:
        s = ctx.settings
        return SoupConfig(
            model=ctx.slm,
            n_domains=ctx.bench.clusters.n_clusters,
            n_experts=s.pn_experts,
            expert_scope="mlp",
            coefficients="linear",
            coefficient_hidden=s.pn_embedding,
            per_layer_coefficients=True,
        )

    def soup(self, ctx: MethodContext) -> SoupOfExperts:
        def build() -> SoupOfExperts:
            folder = ctx.folder("slm_pn")
            if folder is not None and (folder / "model" / "soup_config.json").is_file():
                return SoupOfExperts.load(folder / "model", device=ctx.device)
            s = ctx.settings
            torch.manual_seed(s.seed)
            soup = SoupOfExperts(self.config(ctx))
            # each window trains the expert of its cluster: one-hot h, clusters by size
            meta = MetaDistributionConfig(support_size=1, support="size")
            stream = soup_stream(
                ctx.bench.clusters, meta, batch_size=s.batch_size, seed=s.seed, groups=s.pn_groups
            )
            train_model(
                soup, stream, ctx.train_settings(s.pretrain_steps), loss_fn=soup_loss,
                device=ctx.device, out_dir=None if folder is None else folder / "run",
                show_progress=ctx.show_progress, desc="slm_pn",
            )  # fmt: skip
            if folder is not None:
                soup.save(folder / "model")
            return soup

        soup: SoupOfExperts = ctx.memo("slm_pn", build)
        return soup

    def pretrain(self, ctx: MethodContext) -> None:
        self.soup(ctx)

    def weights(self, ctx: MethodContext, target: Target) -> torch.Tensor:
        if ctx.settings.pn_instantiate == "histogram":
            return target.h
        return torch.nn.functional.one_hot(target.h.argmax(), len(target.h)).float()

    def specialize(self, ctx: MethodContext, target: Target) -> Outcome:
        soup = self.soup(ctx)
        base = soup.instantiate(self.weights(ctx, target))
        tuned = ctx.finetune(base, target)
        s = ctx.settings
        shared = soup_train_flops(
            self.config(ctx),
            tokens=s.pretrain_steps * ctx.window_tokens(),
            instantiations=s.pretrain_steps * s.pn_groups,
        )
        specialize = mixing_flops(self.config(ctx), training=False) + finetune_flops(ctx.slm, tuned)
        account = _account(
            self.name, ctx, target, shared=shared, per_domain=0.0, specialize=specialize,
            serving=ctx.slm,
        )  # fmt: skip
        return Outcome(base, tuned, account)


class SLMMixture:
    """SLM-mix: one SLM per group of clusters; the target's dominant group is fine-tuned."""

    name = "slm_mix"

    def groups(self, ctx: MethodContext) -> np.ndarray:
        def build() -> np.ndarray:
            clusters = ctx.bench.clusters
            assert clusters.clusterer.centroids is not None
            groups = group_clusters(
                clusters.clusterer.centroids, clusters.token_counts.numpy(),
                min(ctx.settings.mix_experts, clusters.n_clusters), seed=ctx.settings.seed,
            )  # fmt: skip
            folder = ctx.folder("slm_mix")
            if folder is not None:
                atomic_write_json(folder / "groups.json", {"groups": groups.tolist()})
            return groups

        groups: np.ndarray = ctx.memo("slm_mix/groups", build)
        return groups

    def expert_steps(self, ctx: MethodContext) -> list[int]:
        """Each expert's pretraining steps (they add up to the SLM's)."""
        groups = self.groups(ctx)
        m, total = int(groups.max()) + 1, ctx.settings.pretrain_steps
        if ctx.settings.mix_split == "equal":
            share = np.full(m, 1.0 / m)
        else:
            counts = ctx.bench.clusters.token_counts.numpy()
            share = np.array([counts[groups == e].sum() for e in range(m)]) / counts.sum()
        steps = np.maximum(1, np.floor(share * total)).astype(int)
        steps[-1] = total - int(steps[:-1].sum())
        if steps[-1] < 1:  # pragma: no cover - excluded by MethodSettings' check
            raise ValueError(f"{total} pretraining steps cannot feed {m} experts")
        return [int(s) for s in steps]

    def expert(self, ctx: MethodContext, e: int) -> TransformerLM:
        groups = self.groups(ctx)
        natural = ctx.bench.clusters.natural_weights()
        weights = torch.where(torch.as_tensor(groups == e), natural, torch.zeros_like(natural))
        return ctx.pretrained_lm(f"slm_mix/expert-{e}", ctx.slm, self.expert_steps(ctx)[e], weights)

    def pretrain(self, ctx: MethodContext) -> None:
        for e in range(len(self.expert_steps(ctx))):
            self.expert(ctx, e)

    def specialize(self, ctx: MethodContext, target: Target) -> Outcome:
        groups = self.groups(ctx)
        e = route(target.h, groups, int(groups.max()) + 1)
        base = self.expert(ctx, e)
        tuned = ctx.finetune(base, target)
        shared = lm_train_flops(ctx.slm, sum(self.expert_steps(ctx)) * ctx.window_tokens())
        account = _account(
            self.name, ctx, target, shared=shared, per_domain=0.0,
            specialize=finetune_flops(ctx.slm, tuned), serving=ctx.slm,
        )  # fmt: skip
        return Outcome(base, tuned, account)


def get_method(name: str) -> Method:
    """The method called ``name`` (one of :data:`METHODS`)."""
    table: dict[str, Callable[[], Method]] = {
        "slm": SLM, "llm": LLM, "slm_d": SLMDistilled, "slm_is": SLMImportance,
        "slm_pn": SLMProjected, "slm_mix": SLMMixture,
    }  # fmt: skip
    one_of("method", name, METHODS)
    return table[name]()


def describe(ctx: MethodContext) -> dict[str, Any]:
    """The sizes and steps every method used (for reports)."""
    mix = SLMMixture()
    return {
        "slm_parameters": lm_parameters(ctx.slm),
        "llm_parameters": lm_parameters(ctx.llm),
        "pretrain_steps_slm": ctx.settings.pretrain_steps,
        "pretrain_steps_llm": ctx.llm_steps(),
        "pn_parameters": SoupOfExperts(SLMProjected().config(ctx)).num_parameters(),
        "mix_expert_steps": json.dumps(mix.expert_steps(ctx)),
    }
