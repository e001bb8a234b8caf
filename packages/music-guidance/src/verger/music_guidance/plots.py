"""Spectrogram figures with the observed regions marked (matplotlib, Agg; no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from verger.music_guidance.audio import log_mel

__all__ = ["spectrogram_figure"]


def _spans(mask: Tensor) -> list[tuple[int, int]]:
    """[start, end) runs of True in a 1-D bool mask."""
    m = mask.to(torch.int8).tolist()
    spans, start = [], None
    for i, v in enumerate([*m, 0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            spans.append((start, i))
            start = None
    return spans


def spectrogram_figure(
    clips: Sequence[Tensor],
    titles: Sequence[str],
    sample_rate: int,
    *,
    observed: Tensor | None = None,
) -> Any:
    """One log-mel panel per clip ``[C, T]`` (stacked), observed spans outlined in white."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(clips), 1, figsize=(8, 1.9 * len(clips)), squeeze=False)
    for ax, clip, title in zip(axes[:, 0], clips, titles):
        mel = log_mel(
            clip.detach().float().cpu().mean(0), sample_rate, n_fft=256, hop=64, n_mels=48
        )
        seconds = clip.shape[-1] / sample_rate
        ax.imshow(
            mel.numpy(),
            origin="lower",
            aspect="auto",
            extent=(0, seconds, 0, mel.shape[0]),
            cmap="magma",
        )
        if observed is not None:
            for start, end in _spans(observed):
                ax.axvspan(
                    start / sample_rate,
                    end / sample_rate,
                    fill=False,
                    edgecolor="white",
                    linewidth=1.5,
                    linestyle="--",
                )
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("mel bin")
    axes[-1, 0].set_xlabel(
        "seconds (dashed boxes: observed samples)" if observed is not None else "seconds"
    )
    fig.tight_layout()
    return fig
