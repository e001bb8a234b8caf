"""Chunked causal products in pure torch: the fast CPU path (and the GPU fallback).

The sequence is cut into chunks of ``chunk_size`` positions. Inside a chunk the masked product
``tril(a bᵀ) c`` is a small dense matmul; across chunks the contribution of everything earlier is
``a · S`` where ``S`` is the exclusive prefix sum of the per-chunk states ``bᵀ c``. All work is
batched matmuls with fp32 accumulation (on CPU, the masked scores of long sequences a block of
chunks at a time), memory is O(N·(C + Dk·Dv/C)) per head, and no Python loop runs over
positions. The backward recomputes the chunk states instead of saving them, so training
memory is O(N) as well.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from verger.fast_attention.feature_maps import compute_dtype

DEFAULT_CHUNK_SIZE = 128
# Bytes of masked (C, C) score matrices formed at once: the intra-chunk products run over
# blocks of chunks this small, so their temporaries are reused from the heap rather than
# mapped afresh (over 32 MB, glibc maps each allocation anew and its page faults cost more
# than the matmul that fills it) and peak memory does not grow with them.
SCORES_BLOCK_BYTES = 8 << 20


def _exclusive_cumsum(states: torch.Tensor, *, reverse: bool) -> torch.Tensor:
    """Sum of the states of the strictly earlier (or, reversed, later) chunks; dim -3 is chunks.

    In-place adds on (·, Dk, Dv) slices: ``torch.cumsum`` along a strided middle dim is
    ~7x slower on CPU for these shapes. Each add costs ~15 µs of dispatch and threading
    whatever its size, so the scan runs in two levels when the chunks split into groups of
    about √chunks: a running sum inside every group at once, one over the groups' totals, and
    one add of those offsets (~3√chunks adds instead of chunks; 2x faster at 128 chunks).
    """
    chunks = states.shape[-3]
    group = _group_size(chunks)
    if group == 1:
        return _running_sum(states, reverse=reverse)
    lead, tail = states.shape[:-3], states.shape[-2:]
    grouped = states.reshape(*lead, chunks // group, group, *tail)
    out = _running_sum(grouped, reverse=reverse)  # within each group
    first = 0 if reverse else group - 1  # the group's last chunk in scan order
    totals = out[..., first, :, :] + grouped[..., first, :, :]  # (·, groups, Dk, Dv)
    offsets = _running_sum(totals, reverse=reverse)  # over the groups
    return out.add_(offsets.unsqueeze(-3)).view_as(states)


def _group_size(chunks: int) -> int:
    """The divisor of ``chunks`` closest to √chunks (1 below 16 chunks or for a prime)."""
    if chunks < 16:
        return 1
    pairs = [(d, chunks // d) for d in range(2, math.isqrt(chunks) + 1) if chunks % d == 0]
    divisors = [d for pair in pairs for d in pair]
    return min(divisors, key=lambda d: abs(d * d - chunks), default=1)


def _running_sum(x: torch.Tensor, *, reverse: bool) -> torch.Tensor:
    """Exclusive running sum along dim -3 of ``x`` (·, L, Dk, Dv), by L - 1 in-place adds."""
    out = torch.empty_like(x)
    src, dst = x.unbind(-3), out.unbind(-3)
    order = range(len(dst) - 1, -1, -1) if reverse else range(len(dst))
    prev = None
    for i in order:
        if prev is None:
            dst[i].zero_()
        else:
            torch.add(dst[prev], src[prev], out=dst[i])
        prev = i
    return out


class _Chunker:
    """Pads the sequence to whole chunks and views (..., N, D) tensors as (batch·chunks, C, D)."""

    def __init__(self, shape: torch.Size, chunk_size: int) -> None:
        *self.batch, self.n, _ = shape
        self.size = max(1, min(chunk_size, self.n))
        self.pad = (-self.n) % self.size
        self.chunks = (self.n + self.pad) // self.size

    def split(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = t.to(dtype)
        if self.pad:  # zero rows add nothing to any product; padded outputs are cut in merge
            t = F.pad(t, (0, 0, 0, self.pad))
        return t.reshape(-1, self.size, t.shape[-1])

    def merge(self, t: torch.Tensor) -> torch.Tensor:
        t = t.view(*self.batch, self.n + self.pad, t.shape[-1])
        return t[..., : self.n, :] if self.pad else t

    def blocks(self, t: torch.Tensor) -> list[slice]:
        """Slices of the (batch·chunks) chunks of ``t`` whose masked scores fit
        ``SCORES_BLOCK_BYTES`` together on CPU (one slice for short sequences, and on GPUs,
        whose caching allocator has no such cost)."""
        rows = len(t)
        if t.device.type != "cpu":
            return [slice(0, rows)]
        step = max(1, SCORES_BLOCK_BYTES // (self.size * self.size * t.element_size()))
        return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]

    def prefix(self, left: torch.Tensor, right: torch.Tensor, *, reverse: bool) -> torch.Tensor:
        """Per chunk, Σ over strictly earlier (later) chunks of ``leftᵀ right``."""
        states = torch.matmul(left.mT, right)
        states = states.view(-1, self.chunks, *states.shape[-2:])
        return _exclusive_cumsum(states, reverse=reverse).view(-1, *states.shape[-2:])


def causal_product_chunked(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    reverse: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``out_i = Σ_{j ≤ i} (a_i · b_j) c_j`` (``j ≥ i`` when ``reverse``).

    ``a``, ``b``: (..., N, Dk); ``c``: (..., N, Dv). Returns (..., N, Dv) in float32 (float64
    for float64 inputs).
    """
    dtype = compute_dtype(a.dtype)
    ch = _Chunker(a.shape, chunk_size)
    a3, b3, c3 = ch.split(a, dtype), ch.split(b, dtype), ch.split(c, dtype)
    prefix = ch.prefix(b3, c3, reverse=reverse)
    out = torch.bmm(a3, prefix)
    for r in ch.blocks(a3):
        scores = torch.bmm(a3[r], b3[r].mT)
        scores = scores.triu_() if reverse else scores.tril_()
        out[r].baddbmm_(scores, c3[r])
    return ch.merge(out)


def causal_product_backward_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``out = causal_product(q, k, v)`` (the paper's cumulative-sum form, chunked).

    ``dq_i = Σ_{j≤i} (do_i·v_j) k_j``, ``dk_j = Σ_{i≥j} (do_i·v_j) q_i``,
    ``dv_j = Σ_{i≥j} (q_i·k_j) do_i``; the two masked score matrices are shared between them,
    and the chunk states are recomputed rather than stored by the forward.
    """
    dtype = compute_dtype(q.dtype)
    ch = _Chunker(q.shape, chunk_size)
    q3, k3, v3, do3 = (ch.split(t, dtype) for t in (q, k, v, grad_out))
    kv_prefix = ch.prefix(k3, v3, reverse=False)  # Σ_{earlier chunks} k vᵀ
    qdo_suffix = ch.prefix(q3, do3, reverse=True)  # Σ_{later chunks} q doᵀ
    dq = torch.bmm(do3, kv_prefix.mT)
    dk = torch.bmm(v3, qdo_suffix.mT)
    dv = torch.bmm(k3, qdo_suffix)
    _add_intra_chunk_grads(ch, q3, k3, v3, do3, dq, dk, dv)
    return ch.merge(dq), ch.merge(dk), ch.merge(dv)


def _add_intra_chunk_grads(
    ch: _Chunker,
    q3: torch.Tensor,
    k3: torch.Tensor,
    v3: torch.Tensor,
    g3: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    row_shift: torch.Tensor | None = None,
) -> None:
    """Adds the intra-chunk terms in place: the masked score gradients
    ``tril(g vᵀ + row_shift 1ᵀ)`` into dq (times k) and dk (times q), then the masked scores
    ``tril(q kᵀ)``, formed in the same buffer, into dv (times g); a block of chunks at a time."""
    for r in ch.blocks(q3):
        d_scores = torch.bmm(g3[r], v3[r].mT)
        if row_shift is not None:
            d_scores += row_shift[r]
        d_scores.tril_()
        dq[r].baddbmm_(d_scores, k3[r])
        dk[r].baddbmm_(d_scores.mT, q3[r])
        scores = torch.bmm(q3[r], k3[r].mT, out=d_scores).tril_()
        dv[r].baddbmm_(scores.mT, g3[r])


def causal_linear_forward_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized causal linear attention on features: ``(out, den)``.

    ``out_i = Σ_{j≤i} (q_i·k_j) v_j / (den_i + eps)`` with ``den_i = Σ_{j≤i} q_i·k_j``; the
    normalizer comes from the same masked score matrix (its row sums) and a prefix of per-chunk
    key sums, so it costs no extra pass over the sequence.
    """
    dtype = compute_dtype(q.dtype)
    ch = _Chunker(q.shape, chunk_size)
    q3, k3, v3 = ch.split(q, dtype), ch.split(k, dtype), ch.split(v, dtype)
    kv_prefix = ch.prefix(k3, v3, reverse=False)
    k_prefix = ch.prefix(k3, torch.ones_like(k3[..., :1]), reverse=False)  # (·, F, 1)
    num = torch.bmm(q3, kv_prefix)
    den = torch.bmm(q3, k_prefix)
    for r in ch.blocks(q3):
        scores = torch.bmm(q3[r], k3[r].mT).tril_()
        num[r].baddbmm_(scores, v3[r])  # in place: no copy of the first term
        den[r].add_(scores.sum(-1, keepdim=True))
    num.div_(den + eps)
    return ch.merge(num), ch.merge(den)


def causal_linear_backward_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    den: torch.Tensor,
    grad_out: torch.Tensor,
    eps: float,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``causal_linear_forward_chunked`` through the normalizer.

    With ``g = dout / (den + eps)`` and ``dden = −(dout · out) / (den + eps)``, every term is a
    product with the masked score matrix ``tril(g vᵀ + dden 1ᵀ)`` or with prefix / suffix sums
    of chunk states, which are recomputed here rather than saved by the forward. Dead
    buffers are written again rather than allocated anew: at 16k tokens each (N, ·) tensor is
    over glibc's 32 MB mmap threshold, and the page faults of a fresh one cost more than the
    arithmetic that fills it (the masked scores, likewise, go block by block).
    """
    dtype = compute_dtype(q.dtype)
    ch = _Chunker(q.shape, chunk_size)
    q3, k3, v3 = (ch.split(t, dtype) for t in (q, k, v))
    out3, den3, go3 = (ch.split(t, dtype) for t in (out, den, grad_out))
    inv = (den3 + eps).reciprocal_()
    g3 = torch.mul(go3, out3)  # do·out per position, summed below; then the buffer of g
    dden = g3.sum(-1, keepdim=True).mul_(inv).neg_()  # (·, C, 1)
    g3 = torch.mul(go3, inv, out=g3)
    ones = torch.ones_like(k3[..., :1])
    kv_prefix = ch.prefix(k3, v3, reverse=False)
    k_prefix = ch.prefix(k3, ones, reverse=False)  # (·, F, 1)
    qg_suffix = ch.prefix(q3, g3, reverse=True)  # Σ_{later chunks} q gᵀ: (·, F, Dv)
    qd_suffix = ch.prefix(q3, dden, reverse=True)  # Σ_{later chunks} q dden: (·, F, 1)
    dq = torch.bmm(g3, kv_prefix.mT).baddbmm_(dden, k_prefix.mT)
    dk = torch.bmm(v3, qg_suffix.mT).add_(qd_suffix.mT)
    dv = torch.bmm(k3, qg_suffix)
    _add_intra_chunk_grads(ch, q3, k3, v3, g3, dq, dk, dv, row_shift=dden)  # g_i·v_j + dden_i
    return ch.merge(dq), ch.merge(dk), ch.merge(dv)
