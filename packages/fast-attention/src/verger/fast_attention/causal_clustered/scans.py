"""Scans over chunks for causal clustered attention: softmax sums with a running max, the
prefix top-k keys of each centroid, and softmax parts over disjoint key sets.

Every sum is kept as (max, Σ e^(ℓ−max) v, Σ e^(ℓ−max)), so sets combine without under- or
overflow and without a stabilizer that looks ahead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from verger.fast_attention.ops.rescaled_scan import (
    NEG_INF,
    rescaled_prefix,
    rescaled_prefix_reference,
    rescaled_sum,
    safe_shift,
)


def use_log_depth(logits: torch.Tensor, log_depth: bool | None) -> bool:
    """Scans over chunks: sequential on CPU (the least work), log-depth on GPUs, where a
    sequential scan's N / chunk_size steps of small launches would dominate."""
    return logits.is_cuda if log_depth is None else log_depth


def chunk_prefix(
    logits: torch.Tensor,
    v: torch.Tensor,
    log_depth: bool | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exclusive prefix over chunks of each centroid's weighted sums, with a running max.

    ``logits`` (G, C, nb, L), ``v`` (G, nb, L, Dv). Returns ``shift`` (G, nb, C): max logit
    over the chunks before b (−inf for b = 0), and ``sums`` (G, nb, C, Dv), ``norms``
    (G, nb, C): Σ over those chunks of exp(ℓ − shift) v and exp(ℓ − shift). The scan:
    ``backend="triton"`` one Triton launch (``ops.rescaled_scan``); else log-depth on GPUs,
    a loop over chunks on CPU (``log_depth`` forces either).
    """
    m = logits.detach().amax(-1)  # (G, C, nb): per-chunk max
    e = torch.exp(logits - safe_shift(m)[..., None])
    chunk_sums = torch.einsum("gcbl,gbld->gbcd", e, v)
    chunk_norms = e.sum(-1).transpose(1, 2)  # (G, nb, C)
    m = m.transpose(1, 2)
    nb = chunk_norms.shape[1]
    if backend == "triton":
        return rescaled_prefix(m, chunk_sums, chunk_norms, backend="triton")
    if use_log_depth(logits, log_depth):
        # Hillis-Steele: after the step with offset o, entry b holds chunks (b − 2o, b]
        run_m, run_s, run_z, o = m, chunk_sums, chunk_norms, 1
        while o < nb:
            new_m, new_s, new_z = rescaled_sum(
                (run_m[:, :-o], run_s[:, :-o], run_z[:, :-o]),
                (run_m[:, o:], run_s[:, o:], run_z[:, o:]),
            )
            run_m = torch.cat((run_m[:, :o], new_m), 1)
            run_s = torch.cat((run_s[:, :o], new_s), 1)
            run_z = torch.cat((run_z[:, :o], new_z), 1)
            o *= 2
        return (  # exclusive: shift by one chunk, nothing before chunk 0
            F.pad(run_m[:, :-1], (0, 0, 1, 0), value=NEG_INF),
            F.pad(run_s[:, :-1], (0, 0, 0, 0, 1, 0)),
            F.pad(run_z[:, :-1], (0, 0, 1, 0)),
        )
    return rescaled_prefix_reference(m, chunk_sums, chunk_norms)


@torch.no_grad()
def prefix_topk(
    logits: torch.Tensor, topk: int, log_depth: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each centroid's top-k keys among the chunks before b: (values, positions) (G, C, nb, K).

    Per-chunk top-k, then a running merge ("top-k of the union") chunk by chunk: 5-7x faster
    on CPU than a log-depth scan, which does log2(nb) times the work (GPUs take that one).
    Missing entries have value −inf.
    """
    g, c, nb, L = logits.shape
    vals, idx = logits.topk(min(topk, L), -1)
    idx = idx + torch.arange(nb, device=idx.device)[:, None] * L
    run_v = logits.new_full((g, c, topk), NEG_INF)
    run_i = torch.zeros(g, c, topk, dtype=torch.long, device=idx.device)
    if use_log_depth(logits, log_depth):
        vals = torch.cat((vals, run_v[:, :, None].expand(-1, -1, nb, -1)), -1)[..., :topk]
        idx = torch.cat((idx, run_i[:, :, None].expand(-1, -1, nb, -1)), -1)[..., :topk]
        o = 1
        while o < nb:  # after offset o, entry b holds the top-k of chunks (b − 2o, b]
            both_v = torch.cat((vals[:, :, :-o], vals[:, :, o:]), -1)
            both_i = torch.cat((idx[:, :, :-o], idx[:, :, o:]), -1)
            top_v, pick = both_v.topk(topk, -1)
            vals = torch.cat((vals[:, :, :o], top_v), 2)
            idx = torch.cat((idx[:, :, :o], both_i.gather(-1, pick)), 2)
            o *= 2
        return (torch.cat((run_v[:, :, None], vals[:, :, :-1]), 2),
                torch.cat((run_i[:, :, None], idx[:, :, :-1]), 2))  # fmt: skip
    out_v, out_i = [], []
    for b in range(nb):
        out_v.append(run_v)
        out_i.append(run_i)
        run_v, pick = torch.cat((run_v, vals[:, :, b]), -1).topk(topk, -1)
        run_i = torch.cat((run_i, idx[:, :, b]), -1).gather(-1, pick)
    return torch.stack(out_v, 2), torch.stack(out_i, 2)


def softmax_parts(
    scores: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalized softmax of masked scores (..., K) (−inf = masked) over v (..., K, Dv).

    Returns (shift (...), Σ exp(s − shift) (...), Σ exp(s − shift) v (..., Dv)); the shift
    is −inf where no key is allowed (the sums are then 0).
    """
    shift = scores.detach().amax(-1)
    e = (scores - safe_shift(shift)[..., None]).exp_()
    return shift, e.sum(-1), torch.matmul(e, v)


def merge_softmax(
    a: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The softmax over the union of two disjoint key sets from their ``softmax_parts``."""
    shift = safe_shift(torch.maximum(a[0], b[0]))
    fa, fb = torch.exp(a[0] - shift), torch.exp(b[0] - shift)
    inv = (fa * a[1] + fb * b[1]).clamp_min(1e-30).reciprocal()
    # one new (..., Dv) tensor: the second term is added in place
    return (a[2] * (fa * inv)[..., None]).addcmul_(b[2], (fb * inv)[..., None])
