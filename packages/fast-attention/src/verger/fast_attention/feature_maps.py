"""Feature maps φ for linear attention, and a registry for custom ones.

``sim(q, k) = φ(q) · φ(k)`` replaces ``exp(q · k / √d)``. Every map returns float32 features
(or float64 for float64 inputs, so gradcheck stays exact) whatever the input dtype.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "EluFeatureMap",
    "FavorFeatureMap",
    "FeatureMap",
    "available_feature_maps",
    "get_feature_map",
    "register_feature_map",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for 16-bit and fp32 inputs; fp64 stays fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class FeatureMap(nn.Module):
    """Base class: ``forward(x, is_query=...)`` maps (..., head_dim) to (..., feature_dim) ≥ 0.

    ``is_random``: the map draws its features at construction, so two instances differ and a
    recurrent state is only valid with the instance that built it.
    """

    is_random: ClassVar[bool] = False

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim={head_dim!r} must be a positive int")
        self.head_dim = head_dim

    @property
    def feature_dim(self) -> int:
        """Size of the last dimension of the features."""
        return self.head_dim

    def redraw(self) -> None:
        """Draw new random features (no-op for deterministic maps)."""

    def forward(self, x: torch.Tensor, *, is_query: bool) -> torch.Tensor:
        raise NotImplementedError


_REGISTRY: dict[str, Callable[..., FeatureMap]] = {}


def register_feature_map(
    name: str,
) -> Callable[[Callable[..., FeatureMap]], Callable[..., FeatureMap]]:
    """Decorator registering a factory ``(head_dim, **options) -> FeatureMap`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"feature map name={name!r} must be a non-empty str")

    def wrap(factory: Callable[..., FeatureMap]) -> Callable[..., FeatureMap]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"feature map {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_feature_maps() -> list[str]:
    """Names accepted by ``get_feature_map`` and ``linear_attention(feature_map=...)``."""
    return sorted(_REGISTRY)


def get_feature_map(spec: str | FeatureMap, head_dim: int, **options: Any) -> FeatureMap:
    """A FeatureMap from a registered name (built for ``head_dim`` with ``options``) or an
    existing instance (then ``options`` must be empty: they would be ignored)."""
    if isinstance(spec, FeatureMap):
        if options:
            raise TypeError(
                f"options {sorted(options)} build a feature map from its name; feature_map is "
                f"already a {type(spec).__name__} instance"
            )
        if spec.head_dim != head_dim:
            raise ValueError(
                f"feature_map was built for head_dim={spec.head_dim}, inputs have {head_dim}"
            )
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"feature_map must be a name or a FeatureMap, got {type(spec).__name__}; "
            f"names: {available_feature_maps()}"
        )
    if spec not in _REGISTRY:
        raise ValueError(f"feature_map={spec!r} is unknown; choose from {available_feature_maps()}")
    factory = _REGISTRY[spec]
    try:  # check the options against the factory's signature, not its body's own TypeErrors
        inspect.signature(factory).bind(head_dim, **options)
    except TypeError as err:
        raise TypeError(
            f"feature_map={spec!r} does not take the option(s) {sorted(options)} ({err})"
        ) from None
    return factory(head_dim, **options)


# Elements per slice of the elementwise passes below on CPU: the temporaries stay small (2 MB).
_CPU_SLICE = 1 << 19


def elu_plus_one(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """φ(x) = elu(x) + 1 = exp(min(x, 0)) + max(x, 0) in ``dtype`` (x's by default), outside
    autograd. This form keeps its relative precision for very negative x, where
    ``elu(x) + 1`` rounds to 0.

    On CPU it is formed slice by slice into one output: at 16k tokens a full-size temporary
    for max(x, 0) is a fresh allocation over glibc's 32 MB mmap threshold, whose page faults
    cost more than the pass that fills it (this halved the map's CPU time there). GPUs take it
    in one pass (the caching allocator has no such cost; each slice would be four launches).
    """
    x = x.contiguous()
    phi = torch.empty_like(x, dtype=dtype or x.dtype)
    size = _CPU_SLICE if x.device.type == "cpu" else max(x.numel(), 1)
    for src, out in zip(x.view(-1).split(size), phi.view(-1).split(size)):
        if out.dtype == src.dtype:
            torch.clamp(src, max=0.0, out=out)
        else:  # clamp's out= takes no other dtype
            out.copy_(src).clamp_(max=0.0)
        out.exp_().add_(src.clamp(min=0.0))
    return phi


class _EluPlusOne(torch.autograd.Function):
    """``elu_plus_one`` with its derivative min(φ, 1), so only φ is saved."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        phi = elu_plus_one(x)
        ctx.save_for_backward(phi)
        return phi

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (phi,) = ctx.saved_tensors
        return phi.clamp(max=1.0).mul_(grad)


@register_feature_map("elu")
class EluFeatureMap(FeatureMap):
    """φ(x) = elu(x) + 1, the map of "Transformers are RNNs" (positive, deterministic)."""

    def forward(self, x: torch.Tensor, *, is_query: bool) -> torch.Tensor:
        return _EluPlusOne.apply(x.to(compute_dtype(x.dtype)))


def _orthogonal_gaussian(n_features: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of blocks of orthogonal directions, scaled by χ(dim) norms (FAVOR+ ORF)."""
    blocks = []
    for _ in range(math.ceil(n_features / dim)):
        g = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r))  # sign fix: makes Q Haar-uniform (else biased)
        blocks.append(q.T)
    w = torch.cat(blocks)[:n_features]
    norms = torch.randn(n_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return w * norms[:, None]


@register_feature_map("favor")
class FavorFeatureMap(FeatureMap):
    """FAVOR+ positive orthogonal random features (Performer): an unbiased softmax kernel.

    ``φ(x) = exp(W x' − |x'|²/2) / √m`` with ``x' = x / d^¼``, so ``E[φ(q)·φ(k)] = exp(q·k/√d)``.
    Queries are stabilized by their own row maximum, which cancels in the attention ratio.
    ``redraw_interval=n`` draws new features every ``n`` training-mode query calls;
    ``redraw()`` does it on demand. ``seed`` makes the draws reproducible.
    """

    is_random = True

    def __init__(
        self,
        head_dim: int,
        n_features: int | None = None,
        *,
        orthogonal: bool = True,
        redraw_interval: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(head_dim)
        n_features = head_dim * 2 if n_features is None else n_features
        if not isinstance(n_features, int) or n_features < 1:
            raise ValueError(f"n_features={n_features!r} must be a positive int")
        if redraw_interval is not None and (
            not isinstance(redraw_interval, int) or redraw_interval < 1
        ):
            raise ValueError(f"redraw_interval={redraw_interval!r} must be None or an int >= 1")
        self.n_features = n_features
        self.orthogonal = orthogonal
        self.redraw_interval = redraw_interval
        self._generator = torch.Generator()
        self._generator.manual_seed(
            seed if seed is not None else int(torch.randint(2**62, ()).item())
        )
        self._calls = 0
        self.projection: torch.Tensor
        self.register_buffer("projection", torch.empty(n_features, head_dim), persistent=True)
        self.redraw()

    @property
    def feature_dim(self) -> int:
        return self.n_features

    def redraw(self) -> None:
        if self.orthogonal:
            w = _orthogonal_gaussian(self.n_features, self.head_dim, self._generator)
        else:
            w = torch.randn(
                self.n_features, self.head_dim, generator=self._generator, dtype=torch.float64
            )
        self.projection.copy_(w.to(self.projection.dtype))

    def forward(self, x: torch.Tensor, *, is_query: bool) -> torch.Tensor:
        if is_query and self.training and self.redraw_interval is not None:
            if self._calls > 0 and self._calls % self.redraw_interval == 0:
                self.redraw()
            self._calls += 1
        dtype = compute_dtype(x.dtype)
        x = x.to(dtype) * self.head_dim**-0.25
        proj = x @ self.projection.to(device=x.device, dtype=dtype).T
        logits = proj - 0.5 * (x * x).sum(-1, keepdim=True)
        if is_query:
            logits = logits - logits.amax(-1, keepdim=True).detach()
        return torch.exp(logits) / math.sqrt(self.n_features)
