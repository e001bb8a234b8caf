"""Exclusive prefix over chunks of softmax sums kept with a running max: the specification.

Chunk b carries ``(m_b, s_b, z_b)``: its largest logit and Σ e^(ℓ − m_b) v, Σ e^(ℓ − m_b)
over its keys. The prefix at b is the same triple for the union of the chunks before b,
relative to their largest logit P_b (−inf and zeros at b = 0, or while no earlier key is
valid), so nothing under- or overflows and no shift looks ahead. A loop over chunks.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def safe_shift(m: torch.Tensor) -> torch.Tensor:
    """A max of logits usable as a shift: −inf (no valid key yet) becomes 0.

    One kernel (``isinf`` + ``zeros_like`` + ``where`` were three): on a GPU these scans are
    bound by launches.
    """
    return torch.nan_to_num(m, nan=float("nan"), posinf=0.0, neginf=0.0)


def rescaled_sum(a: Triple, b: Triple) -> Triple:
    """(max, Σ e^(ℓ−max) v, Σ e^(ℓ−max)) of the union of two disjoint sets of logits."""
    new_m = torch.maximum(a[0], b[0])
    shift = safe_shift(new_m)
    fa = torch.exp(a[0] - shift)  # exp(−inf) = 0: an empty side adds nothing
    fb = torch.exp(b[0] - shift)
    sums = torch.addcmul(a[1] * fa[..., None], b[1], fb[..., None])
    return new_m, sums, torch.addcmul(a[2] * fa, b[2], fb)


def rescaled_prefix_reference(m: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> Triple:
    """Exclusive prefixes of ``m`` (G, nb, C), ``s`` (G, nb, C, Dv), ``z`` (G, nb, C): the
    prefix maxima (−inf at b = 0) and the sums relative to them, in the same shapes."""
    g, nb, c = z.shape
    run: Triple = (m.new_full((g, c), NEG_INF), s.new_zeros(g, c, s.shape[-1]), z.new_zeros(g, c))
    shifts, sums, norms = [], [], []
    for b in range(nb):  # nb = N / chunk_size steps of O(C·Dv): a sequential scan is cheapest
        shifts.append(run[0])
        sums.append(run[1])
        norms.append(run[2])
        run = rescaled_sum(run, (m[:, b], s[:, b], z[:, b]))
    return torch.stack(shifts, 1), torch.stack(sums, 1), torch.stack(norms, 1)
