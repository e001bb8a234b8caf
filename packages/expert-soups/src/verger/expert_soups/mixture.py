"""The training stream of a soup: h from the meta-distribution, then a batch of mix(h).

:class:`MetaDistribution` draws h (a random support of s domains, Dirichlet weights on it)
from its own NumPy generator, so its position is a small state dict. :class:`MixtureStream`
draws one h per optimizer step and a batch from the mixture through verger-core's
``DomainSampler`` (each row: a domain with probability h_i, then a window of it). Under DDP
every rank builds the meta-distribution with the same seed (one h per step, shared by the
ranks) and its sampler with its own seed (different windows).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from verger.core.data import DomainSampler
from verger.core.validation import integer
from verger.expert_soups.config import MetaDistributionConfig


class MetaDistribution:
    """pi(h) over the simplex of ``n_domains``: support, then Dirichlet weights (see
    :class:`~verger.expert_soups.MetaDistributionConfig`). ``sizes`` (e.g. tokens per
    domain) are needed for ``support="size"``."""

    def __init__(
        self,
        config: MetaDistributionConfig,
        n_domains: int,
        *,
        sizes: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(config, MetaDistributionConfig):
            raise TypeError(f"config must be a MetaDistributionConfig, got {config!r}")
        integer("n_domains", n_domains, at_least=1)
        self.largest = config.max_support_size or config.support_size
        if self.largest > n_domains:
            raise ValueError(f"support sizes up to {self.largest} exceed the {n_domains} domains")
        self.config, self.n_domains = config, n_domains
        self.probs: np.ndarray | None = None
        if config.support == "size":
            if sizes is None or len(sizes) != n_domains:
                raise ValueError(f"support='size' needs sizes for the {n_domains} domains")
            p = np.asarray(sizes, dtype=np.float64)
            if not np.isfinite(p).all() or (p < 0).any() or (p > 0).sum() < self.largest:
                raise ValueError(
                    f"sizes must be finite, >= 0 and positive for at least {self.largest} domains"
                )
            self.probs = p / p.sum()
        self.rng = np.random.default_rng(seed)
        self.draws = 0

    def sample(self) -> torch.Tensor:
        """One h: float32 ``[n_domains]``, non-negative, summing to 1."""
        cfg = self.config
        size = cfg.support_size
        if cfg.max_support_size is not None:
            size = int(self.rng.integers(cfg.support_size, cfg.max_support_size + 1))
        support = self.rng.choice(self.n_domains, size, replace=False, p=self.probs)
        weights = self.rng.dirichlet(np.full(size, cfg.concentration))
        h = np.zeros(self.n_domains)
        h[support] = weights
        self.draws += 1
        return torch.from_numpy(h / h.sum()).float()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.draws = int(state["draws"])


class MixtureStream:
    """Endless ``(inputs, targets, h, domains)`` batches from mixtures drawn from pi.

    Each optimizer step draws ``groups`` domain weights (``h`` is ``[groups, k]``) and, for
    each, ``sampler.batch_size`` windows of mix(h_g) (the rows of group g are contiguous);
    the same h serve the ``micro_batches`` batches of one step (gradient accumulation).
    ``groups=1`` is the paper's algorithm (one h per step); more groups average the step's
    gradient over several independent mixtures, which lowers the variance of the shared
    parameters' updates at the same tokens (see the package README).
    """

    def __init__(
        self,
        meta: MetaDistribution,
        sampler: DomainSampler,
        *,
        groups: int = 1,
        micro_batches: int = 1,
    ) -> None:
        if len(sampler.domains) != meta.n_domains:
            raise ValueError(
                f"the sampler has {len(sampler.domains)} domains, the meta-distribution "
                f"{meta.n_domains}"
            )
        self.meta, self.sampler = meta, sampler
        self.groups = integer("groups", groups, at_least=1)
        self.micro_batches = integer("micro_batches", micro_batches, at_least=1)
        self.h: torch.Tensor | None = None
        self._left = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._left == 0:
            self.h = torch.stack([self.meta.sample() for _ in range(self.groups)])
            self._left = self.micro_batches
        self._left -= 1
        assert self.h is not None
        parts = []
        for h in self.h:
            self.sampler.set_weights(h)
            parts.append(self.sampler.sample())
        inputs, targets, domains = (torch.cat(p) for p in zip(*parts))
        return inputs, targets, self.h, domains

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta.state_dict(),
            "sampler": self.sampler.state_dict(),
            "h": None if self.h is None else self.h.clone(),
            "left": self._left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.meta.load_state_dict(state["meta"])
        self.sampler.load_state_dict(state["sampler"])
        self.h = None if state["h"] is None else state["h"].clone()
        self._left = int(state["left"])
