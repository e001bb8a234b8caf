"""Metrics: Frechet audio distance, mel distances (observed regions, seams), classifier KL.

- :func:`frechet_distance` between two Gaussians (float64, symmetric square root);
  :func:`embedding_stats` and :func:`fad` with any :class:`~verger.music_guidance.guidance.AudioEmbedder`.
- :func:`mel_distance`: mean |log-mel(a) - log-mel(b)| over the frames centred on observed
  samples (the paper's mel reconstruction distance on the observed regions).
- :func:`seam_mel_distance`: |mean log-mel of the frames after a seam - of the frames
  before it|: how abruptly the spectrum changes where a continuation starts
  (:func:`seam_mel_windows` gives the two windows).
- :func:`classifier_kl`: mean KL(target || classifier(sample)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from verger.music_guidance.audio import log_mel
from verger.music_guidance.guidance import AudioEmbedder
from verger.music_guidance.validation import integer

__all__ = [
    "classifier_kl",
    "embedding_stats",
    "fad",
    "frechet_distance",
    "mel_distance",
    "seam_mel_distance",
    "seam_mel_windows",
]


def _psd_sqrt(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)`` (float64)."""
    mu1, mu2, cov1, cov2 = (t.to(torch.float64) for t in (mu1, mu2, cov1, cov2))
    if (
        mu1.shape != mu2.shape
        or cov1.shape != cov2.shape
        or cov1.shape != (mu1.numel(), mu1.numel())
    ):
        raise ValueError(
            f"shapes do not match: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, cov {tuple(cov1.shape)}/{tuple(cov2.shape)}"
        )
    s1 = _psd_sqrt(cov1)
    middle = s1 @ cov2 @ s1
    middle = (middle + middle.T) / 2
    cross = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross
    return float(value.clamp_min(0))


def embedding_stats(
    embedder: AudioEmbedder, audio: Tensor, *, batch_size: int = 64
) -> tuple[Tensor, Tensor]:
    """Mean and covariance (float64) of the embeddings of clips ``[N, C, T]`` (N >= 2)."""
    if audio.ndim != 3 or audio.shape[0] < 2:
        raise ValueError(f"need at least two clips [N, C, T], got {tuple(audio.shape)}")
    with torch.no_grad():
        emb = torch.cat(
            [
                embedder.embed(audio[i : i + batch_size])
                for i in range(0, audio.shape[0], batch_size)
            ]
        )
    emb = emb.to(torch.float64)
    return emb.mean(0), torch.cov(emb.T)


def fad(embedder: AudioEmbedder, real: Tensor, generated: Tensor, *, batch_size: int = 64) -> float:
    """Frechet audio distance between two sets of clips under ``embedder``."""
    mu_r, cov_r = embedding_stats(embedder, real, batch_size=batch_size)
    mu_g, cov_g = embedding_stats(embedder, generated, batch_size=batch_size)
    return frechet_distance(mu_r, cov_r, mu_g, cov_g)


def _frame_centres(num_samples: int, hop: int) -> Tensor:
    return torch.arange(0, num_samples // hop + 1) * hop


def mel_distance(
    a: Tensor,
    b: Tensor,
    sample_rate: int,
    observed: Tensor | None = None,
    *,
    n_fft: int = 256,
    hop: int = 64,
    n_mels: int = 48,
) -> float:
    """Mean |log-mel(a) - log-mel(b)| over frames whose centre sample is observed."""
    if a.shape != b.shape:
        raise ValueError(
            f"mel_distance needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    ma = log_mel(a.float(), sample_rate, n_fft=n_fft, hop=hop, n_mels=n_mels)
    mb = log_mel(b.float(), sample_rate, n_fft=n_fft, hop=hop, n_mels=n_mels)
    diff = (ma - mb).abs()  # [..., mels, frames]
    if observed is None:
        return float(diff.mean())
    if observed.ndim != 1 or observed.shape[0] != a.shape[-1]:
        raise ValueError(f"observed must be [T={a.shape[-1]}], got {tuple(observed.shape)}")
    centres = _frame_centres(a.shape[-1], hop)[: diff.shape[-1]].clamp_max(a.shape[-1] - 1)
    keep = observed.bool()[centres]
    if not bool(keep.any()):
        raise ValueError("no frame is centred on an observed sample")
    return float(diff[..., keep].mean())


def seam_mel_windows(
    audio: Tensor,
    seam: int,
    sample_rate: int,
    *,
    window: int = 4,
    n_fft: int = 256,
    hop: int = 64,
    n_mels: int = 48,
) -> tuple[Tensor, Tensor]:
    """``(before, after)`` ``[B, n_mels]``: the mean log-mel of the ``window`` frames just
    before ``seam`` and just after it, frames whose FFT window straddles the seam excluded
    (the after-window starts ``n_fft // 2`` samples past the seam). ``audio`` is [B, C, T]."""
    integer("window", window, at_least=1)
    mel = log_mel(audio.float().mean(1), sample_rate, n_fft=n_fft, hop=hop, n_mels=n_mels)
    reach = n_fft // (2 * hop)  # frames whose window touches the seam
    centre = seam // hop
    before = mel[..., max(0, centre - reach - window) : centre - reach]
    after = mel[..., centre + reach + 1 : centre + reach + 1 + window]
    if before.shape[-1] == 0 or after.shape[-1] == 0:
        raise ValueError(f"seam={seam} is too close to an end for window={window}")
    return before.mean(-1), after.mean(-1)


def seam_mel_distance(
    audio: Tensor,
    seam: int,
    sample_rate: int,
    *,
    window: int = 4,
    n_fft: int = 256,
    hop: int = 64,
    n_mels: int = 48,
) -> Tensor:
    """Per clip: mean over mel bands of |mean log-mel of ``window`` frames after ``seam`` -
    the same before it| (see :func:`seam_mel_windows`). ``audio`` is [B, C, T]."""
    before, after = seam_mel_windows(
        audio, seam, sample_rate, window=window, n_fft=n_fft, hop=hop, n_mels=n_mels
    )
    return (after - before).abs().mean(-1)


def classifier_kl(probabilities: Tensor, target: Tensor, *, eps: float = 1e-8) -> float:
    """Mean over samples of ``KL(target || p) = sum_k t_k log(t_k / p_k)``."""
    if probabilities.ndim != 2 or target.shape[-1] != probabilities.shape[-1]:
        raise ValueError(
            f"probabilities [N, K] and target [K] must agree, got {tuple(probabilities.shape)}, {tuple(target.shape)}"
        )
    t = target.to(torch.float64).expand_as(probabilities)
    p = probabilities.to(torch.float64).clamp_min(eps)
    terms = torch.where(t > 0, t * (t.clamp_min(eps).log() - p.log()), torch.zeros_like(t))
    return float(terms.sum(-1).mean())
