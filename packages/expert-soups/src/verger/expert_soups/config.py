"""Validated settings of a soup and of its meta-distribution, and the check of a domain weight h.

Every field is checked in ``__post_init__``: a bad value raises ``ValueError`` naming the
field, the value and what is allowed, before any tensor is built.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from verger.core.nn import TransformerConfig
from verger.core.validation import finite_number, integer, one_of

EXPERT_SCOPES = ("all", "blocks", "mlp")
COEFFICIENT_KINDS = ("mlp", "linear")
SIMPLEX_ATOL = 1e-4

DomainWeights = torch.Tensor | Sequence[float] | Mapping[str, float]


def domain_names(k: int, prefix: str = "c") -> tuple[str, ...]:
    """Default names of k domains: ``c00, c01, ...`` (zero-padded to sort in order)."""
    width = max(2, len(str(k - 1)))
    return tuple(f"{prefix}{i:0{width}d}" for i in range(k))


def check_domain_weights(
    h: object, n_domains: int, names: Sequence[str] | None = None, *, what: str = "h"
) -> torch.Tensor:
    """Validate a domain weight vector and return it as a float32 tensor ``[n_domains]``.

    ``h`` is a tensor or sequence of ``n_domains`` numbers, or a mapping from domain names
    (``names``) to weights (missing names weigh 0). It must be finite, non-negative and sum
    to 1 (within 1e-4): a point of the simplex. Anything else raises a ``ValueError`` (a
    ``TypeError`` for a wrong type) saying what is wrong.
    """
    if isinstance(h, Mapping):
        if names is None:
            raise ValueError(f"{what}: weights given by name need the domain names")
        unknown = [key for key in h if key not in names]
        if unknown:
            shown = list(names) if len(names) <= 20 else [*names[:20], "..."]
            raise ValueError(f"{what}: unknown domain name(s) {unknown}; known: {shown}")
        index = {name: i for i, name in enumerate(names)}
        values = torch.zeros(n_domains, dtype=torch.float64)
        for key, value in h.items():
            values[index[key]] = finite_number(f"{what}[{key!r}]", value)
    elif isinstance(h, torch.Tensor):
        if h.is_complex() or not (h.is_floating_point() or h.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{what}: dtype {h.dtype} is not a real number type")
        values = h.detach().to("cpu", torch.float64)
    elif isinstance(h, Sequence) and not isinstance(h, str):
        try:
            values = torch.tensor([float(x) for x in h], dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{what}: {h!r} is not a sequence of numbers ({exc})") from None
    else:
        raise TypeError(
            f"{what}: expected a tensor, a sequence of {n_domains} numbers or a mapping "
            f"from domain names to weights, got {type(h).__name__}"
        )
    if values.ndim != 1 or values.numel() != n_domains:
        raise ValueError(
            f"{what}: expected {n_domains} domain weights, got shape {tuple(values.shape)}"
        )
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{what}: weights must be finite, got {values.tolist()}")
    low, total = float(values.min()), float(values.sum())
    if low < 0 or not math.isclose(total, 1.0, abs_tol=SIMPLEX_ATOL):
        raise ValueError(
            f"{what}: weights must lie on the simplex (each >= 0, sum 1); got min {low:.4g}, "
            f"sum {total:.6g}"
        )
    return values.float()


@dataclass(kw_only=True)
class SoupConfig:
    """A Soup-of-Experts: theta(h) = S + sum_j alpha_j(h) E_j over a ``TransformerLM``.

    - ``model``: the instantiated model (and the shape of S and of every expert).
    - ``n_domains``: k, the length of the domain weights h.
    - ``n_experts``: n, the number of expert parameter sets.
    - ``expert_rank``: ``None`` stores each expert tensor in full; an int r stores the
      experts of every matrix as a rank-r product ``U_j V_j^T`` (vectors stay full).
    - ``expert_scope``: which tensors have experts: ``"all"`` (the paper), ``"blocks"``
      (not the embedding and final norm) or ``"mlp"`` (the SwiGLU weights only, as the
      projected networks of "Plan Early"); the others are shared (S only).
    - ``coefficients``: ``"mlp"`` (alpha = MLP(h), Soup-of-Experts) or ``"linear"``
      (alpha = h E M, projected networks); ``coefficient_hidden`` is the MLP width / the
      cluster-embedding size m.
    - ``per_layer_coefficients``: one alpha per block (plus one for the embedding and final
      norm) instead of one for the whole model (the per-layer M of projected networks).
    - ``expert_init_scale``: experts start as N(0, (scale * std)^2), std being the init std of
      the matching tensor of S (0 makes the soup start as a plain model).
    - ``domain_names``: names of the k domains (default ``c00, c01, ...``), so h can be given
      as ``{"c03": 0.5, "c11": 0.5}``.
    """

    model: TransformerConfig
    n_domains: int
    n_experts: int = 8
    expert_rank: int | None = None
    expert_scope: str = "all"
    coefficients: str = "mlp"
    coefficient_hidden: int = 64
    per_layer_coefficients: bool = False
    expert_init_scale: float = 1.0
    domain_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, TransformerConfig):
            raise ValueError(f"SoupConfig.model={self.model!r} must be a TransformerConfig")
        integer("SoupConfig.n_domains", self.n_domains, at_least=1)
        integer("SoupConfig.n_experts", self.n_experts, at_least=1)
        if self.expert_rank is not None:
            integer("SoupConfig.expert_rank", self.expert_rank, at_least=1)
        one_of("SoupConfig.expert_scope", self.expert_scope, EXPERT_SCOPES)
        one_of("SoupConfig.coefficients", self.coefficients, COEFFICIENT_KINDS)
        integer("SoupConfig.coefficient_hidden", self.coefficient_hidden, at_least=1)
        if not isinstance(self.per_layer_coefficients, bool):
            raise ValueError(
                f"SoupConfig.per_layer_coefficients={self.per_layer_coefficients!r} must be a bool"
            )
        finite_number("SoupConfig.expert_init_scale", self.expert_init_scale, at_least=0)
        if self.domain_names is None:
            self.domain_names = domain_names(self.n_domains)
        names = tuple(self.domain_names)
        if len(names) != self.n_domains or len(set(names)) != len(names):
            raise ValueError(
                f"SoupConfig.domain_names must be {self.n_domains} distinct names, got {names!r}"
            )
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"SoupConfig.domain_names={names!r} must be non-empty strings")
        self.domain_names = names

    @property
    def names(self) -> tuple[str, ...]:
        """The domain names (never None after validation)."""
        assert self.domain_names is not None
        return self.domain_names

    @property
    def n_groups(self) -> int:
        """Coefficient groups: 1, or one per block plus one for the model-level tensors."""
        return self.model.n_layers + 1 if self.per_layer_coefficients else 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the model config nested)."""
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()
        data["domain_names"] = list(self.names)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SoupConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SoupConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        fields = dict(data)
        fields["model"] = TransformerConfig.from_dict(dict(fields["model"]))
        if fields.get("domain_names") is not None:
            fields["domain_names"] = tuple(fields["domain_names"])
        return cls(**fields)


@dataclass(kw_only=True)
class MetaDistributionConfig:
    """The distribution of h during training: a random support, Dirichlet weights on it.

    Each draw picks s distinct domains (uniformly, or in proportion to the domains' sizes
    with ``support="size"``), then weights them with a symmetric Dirichlet of
    ``concentration`` (small: one domain dominates; large: near-uniform over the support).
    s is ``support_size``, or uniform on ``[support_size, max_support_size]`` when the
    latter is given (specialists' h often spread over several clusters: training should
    cover such supports). ``support_size=1`` alone gives one-hot h (one domain per step).
    """

    support_size: int = 2
    max_support_size: int | None = None
    concentration: float = 1.0
    support: str = "uniform"

    def __post_init__(self) -> None:
        integer("MetaDistributionConfig.support_size", self.support_size, at_least=1)
        if self.max_support_size is not None:
            integer(
                "MetaDistributionConfig.max_support_size",
                self.max_support_size,
                at_least=self.support_size,
            )
        finite_number("MetaDistributionConfig.concentration", self.concentration, above=0)
        one_of("MetaDistributionConfig.support", self.support, ("uniform", "size"))
