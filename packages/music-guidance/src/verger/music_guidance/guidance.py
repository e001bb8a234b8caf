"""Guidance terms: differentiable losses d(y, A(x0_hat)) on audio, and linear observations.

A :class:`Guidance` is a loss of the decoded clean estimate (audio ``[B, C, T]`` -> per-example
losses ``[B]``) with a weight; a list of them is their weighted sum. Terms whose operator A is
linear carry a :class:`LinearObservation`, which the sampler can project onto
(``x <- x + A^T (A A^T)^-1 (y - A x)``).

Ready-made losses:

- :class:`MaskedL1` (continuation, infilling, regeneration, transitions): ``sum |m * (x - y)|``
  over the observed samples; its observation is the mask.
- :class:`EmbeddingL2` (style from an embedding model): ``|| e(x) - e_target ||^2``.
- :class:`ClassifierLoss` (style from a classifier): cross-entropy of the classifier's class
  distribution toward target class probabilities, or binary cross-entropy for multi-label
  classifiers (the paper's AudioSet case).

Losses are summed over samples, not averaged, so a step size xi means the same thing for
clips of any length and batches of any size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from verger.music_guidance.validation import finite_number, one_of

__all__ = [
    "AudioEmbedder",
    "ClassifierLoss",
    "DenseObservation",
    "EmbeddingL2",
    "Guidance",
    "LinearObservation",
    "MaskObservation",
    "MaskedL1",
    "total_guidance_loss",
]


@runtime_checkable
class LinearObservation(Protocol):
    """A linear operator A on audio with observed values y (audio-shaped or A-shaped)."""

    def apply(self, x: Tensor) -> Tensor:
        """``A x``."""
        ...

    def project(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``x + A^T (A A^T)^-1 (y - A x)``: the closest x with ``A x = y`` (default: own y)."""
        ...

    @property
    def observed(self) -> Tensor:
        """The observed values y, in the same layout as ``apply``'s output's source."""
        ...


@runtime_checkable
class AudioEmbedder(Protocol):
    """Anything that maps audio ``[B, C, T]`` at ``sample_rate`` to embeddings ``[B, D]``."""

    @property
    def sample_rate(self) -> int: ...

    def embed(self, audio: Tensor) -> Tensor: ...


def _as_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    """A {0, 1} float mask broadcastable to ``like`` ``[B, C, T]``; [T] and [C, T] accepted."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape[-1] != like.shape[-1]:
        raise ValueError(
            f"{name} has length {mask.shape[-1]} but the audio has {like.shape[-1]} samples"
        )
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must be boolean (or 0/1)")
    m = mask.to(like.dtype)
    while m.ndim < like.ndim:
        m = m.unsqueeze(0)
    return m


class MaskObservation:
    """A = keep the samples where ``mask`` is 1; y = ``reference`` there.

    For a selection A, ``A A^T = I`` and ``A^T A = diag(mask)``, so the projection copies the
    observed samples in: ``mask * y + (1 - mask) * x``.
    """

    def __init__(self, reference: Tensor, mask: Tensor) -> None:
        if reference.ndim != 3:
            raise ValueError(f"reference must be [B, C, T], got {tuple(reference.shape)}")
        self.reference = reference
        self.mask = _as_mask(mask, reference)

    @property
    def observed(self) -> Tensor:
        return self.reference

    def apply(self, x: Tensor) -> Tensor:
        return self.mask.to(x.dtype) * x

    def project(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        y = self.reference if y is None else y
        m = self.mask.to(device=x.device, dtype=x.dtype)
        return m * y.to(x.dtype) + (1 - m) * x


class DenseObservation:
    """A general linear A [M, T] acting on the time axis of every channel; y = ``A x_ref``."""

    def __init__(self, matrix: Tensor, observed: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] > matrix.shape[1]:
            raise ValueError(f"matrix must be [M, T] with M <= T, got {tuple(matrix.shape)}")
        self.matrix = matrix
        self._observed = observed  # [B, C, M]
        self._gram = matrix @ matrix.T

    @property
    def observed(self) -> Tensor:
        return self._observed

    def apply(self, x: Tensor) -> Tensor:
        return x @ self.matrix.T.to(x.dtype)

    def project(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        y = self._observed if y is None else y
        A = self.matrix.to(x.dtype)
        residual = y.to(x.dtype) - x @ A.T  # [B, C, M]
        solved = torch.linalg.solve(self._gram.to(x.dtype), residual.unsqueeze(-1)).squeeze(-1)
        return x + solved @ A


@dataclass
class Guidance:
    """One weighted term: ``weight * loss(audio)`` with ``loss`` returning ``[B]`` (or a scalar).

    ``observation`` (optional) is the linear A of the term, used for projection.
    """

    loss: Callable[[Tensor], Tensor]
    weight: float = 1.0
    observation: LinearObservation | None = None
    name: str = field(default="")

    def __post_init__(self) -> None:
        if not callable(self.loss):
            raise TypeError(f"loss must be callable, got {type(self.loss).__name__}")
        self.weight = finite_number("weight", self.weight, at_least=0)
        if not self.name:
            self.name = getattr(self.loss, "name", type(self.loss).__name__)

    def scaled(self, weight: float) -> Guidance:
        """The same term with another weight."""
        return Guidance(self.loss, weight, self.observation, self.name)


def total_guidance_loss(guidance: Sequence[Guidance], audio: Tensor) -> Tensor:
    """The weighted sum of all terms, summed over the batch (a scalar to differentiate)."""
    total = audio.new_zeros(())
    for term in guidance:
        value = term.loss(audio)
        if value.ndim > 1 or (value.ndim == 1 and value.shape[0] != audio.shape[0]):
            raise ValueError(
                f"guidance {term.name!r} returned shape {tuple(value.shape)}; expected [B] or []"
            )
        total = total + term.weight * value.sum()
    return total


class MaskedL1:
    """``d = sum_{observed} |x - y|`` per example (A = the observed mask, d = L1)."""

    name = "masked_l1"

    def __init__(self, reference: Tensor, mask: Tensor) -> None:
        self.observation = MaskObservation(reference, mask)

    def __call__(self, audio: Tensor) -> Tensor:
        obs = self.observation
        diff = obs.apply(audio - obs.reference.to(audio.dtype))
        return diff.abs().flatten(1).sum(-1)

    def guidance(self, weight: float = 1.0) -> Guidance:
        return Guidance(self, weight, self.observation, self.name)


class EmbeddingL2:
    """``d = || e(x) - target ||^2`` per example, for any :class:`AudioEmbedder`."""

    name = "embedding_l2"

    def __init__(self, embedder: AudioEmbedder, target: Tensor) -> None:
        if target.ndim not in (1, 2):
            raise ValueError(f"target embedding must be [D] or [B, D], got {tuple(target.shape)}")
        self.embedder, self.target = embedder, target

    def __call__(self, audio: Tensor) -> Tensor:
        emb = self.embedder.embed(audio)
        return (emb - self.target.to(emb)).pow(2).sum(-1)

    def guidance(self, weight: float = 1.0) -> Guidance:
        return Guidance(self, weight, None, self.name)


class ClassifierLoss:
    """Cross-entropy from a classifier's output toward ``target`` class probabilities.

    ``classifier(audio) -> logits [B, K]``. ``kind="ce"``: ``-sum_k p_k log softmax(logits)_k``
    (one class per clip). ``kind="bce"``: binary cross-entropy of ``sigmoid(logits)`` against
    ``target`` (multi-label, as the paper's AudioSet classes).
    """

    name = "classifier"

    def __init__(
        self, classifier: Callable[[Tensor], Tensor], target: Tensor, *, kind: str = "ce"
    ) -> None:
        one_of("kind", kind, ("ce", "bce"))
        if target.ndim not in (1, 2):
            raise ValueError(
                f"target must be [K] or [B, K] probabilities, got {tuple(target.shape)}"
            )
        if bool((target < 0).any()) or bool((target > 1).any()):
            raise ValueError("target probabilities must lie in [0, 1]")
        if kind == "ce" and not torch.allclose(target.sum(-1), torch.ones(()), atol=1e-4):
            raise ValueError("target class probabilities must sum to 1 for kind='ce'")
        self.classifier, self.target, self.kind = classifier, target, kind

    def __call__(self, audio: Tensor) -> Tensor:
        logits = self.classifier(audio)
        target = self.target.to(logits).expand_as(logits)
        if self.kind == "ce":
            return -(target * F.log_softmax(logits, dim=-1)).sum(-1)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)

    def guidance(self, weight: float = 1.0) -> Guidance:
        return Guidance(self, weight, None, self.name)
