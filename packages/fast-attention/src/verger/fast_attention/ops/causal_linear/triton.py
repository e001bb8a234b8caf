"""Chunk-parallel Triton kernels for causal linear attention, forward and fused backward.

With chunks of ``T`` positions, ``S_c`` the sum of ``k vᵀ`` over the chunks before chunk ``c``
and ``z_c`` the sum of ``k`` over them, causal linear attention is, per chunk,

    num = tril(Q Kᵀ) V + Q S_c,   den = rowsum(tril(Q Kᵀ)) + Q z_c,   out = num / (den + eps).

Forward: ``_chunk_states_kernel`` computes every chunk's local ``[Kᵀ V, Σ k]`` in parallel,
``_exclusive_scan_kernel`` turns them into ``[S_c, z_c]`` in place (a running sum over tiles of
chunks, parallel over the state's elements), and ``_forward_kernel`` produces each chunk's
output and normalizer in one pass: every launch is parallel over (batch·head, chunk), so even
batch 1 fills the GPU, and nothing N×N or per-position (D×D) is ever stored.

Backward, with ``d = den + eps`` and ``w_i = do_i · out_i``: ``g = do / d`` and
``r = −w / d`` are the gradients of the numerator and denominator, and

    dq_i = (Σ_{j≤i} (do_i·v_j − w_i) k_j) / d_i                (intra-chunk + S_c, z_c)
    dk_j = Σ_{i≥j} (g_i·v_j + r_i) q_i,   dv_j = Σ_{i≥j} (q_i·k_j) g_i   (intra + later chunks)

so the backward is the same state/scan pair run forward (``S_c, z_c`` recomputed, not saved)
and in reverse (``Σ q gᵀ``, ``Σ r q`` over later chunks), then ``_dq_kernel``, ``_dk_kernel``
and ``_dv_kernel``. The inter-chunk terms of dq and dk are two sums growing with N that cancel
to ~√N, so they run on fp32 states with 3xTF32 dots; the intra-chunk terms are formed after
the cancellation (``do·v − w``), so 16-bit operands are safe there.

Fused feature map (``feature_map="elu"``): q and k are raw inputs; every tile of them is mapped
by φ = elu + 1 as it is loaded (in fp32, rounded to the input dtype, zero outside the tensor),
and the dq/dk kernels multiply their result by φ'(q) / φ'(k). ``linear_attention`` uses it, so
no feature tensor, no feature-map backward and no dtype copy runs around the kernels.

Precision: 16-bit inputs use the tensor cores with fp32 accumulation; fp32 inputs use
``precision`` (default ``tf32x3``: tensor cores at ~fp32 accuracy; ``ieee`` runs the dots on
FMA units, which spills registers at these tile sizes and is many times slower).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from verger.core.kernels import next_power_of_2

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional at import
    HAS_TRITON = False

MAX_HEAD_DIM = 256
MAX_GRID_Z = 65535  # batch*heads rides on a grid axis limited to this
PRECISIONS = ("tf32x3", "tf32", "ieee")
FUSED_FEATURE_MAPS = ("elu",)  # feature maps the kernels can apply to raw q, k on load
DEFAULT_CHUNK = 64

if HAS_TRITON:

    @triton.jit
    def _rows_mask(n, width, rows, cols):
        """Which entries of a (rows, cols) tile lie inside an (n, width) tensor."""
        return (rows < n)[:, None] & (cols < width)[None, :]

    @triton.jit
    def _rows_tile(ptr, bh, n, width, rows, cols):
        """The (rows, cols) tile of a (batch·head, n, width) tensor, zero outside it."""
        return tl.load(
            ptr + bh * n * width + rows[:, None] * width + cols[None, :],
            mask=_rows_mask(n, width, rows, cols),
            other=0.0,
        )

    @triton.jit
    def _rows_store(ptr, bh, n, width, rows, cols, value):
        """Store a (rows, cols) tile into a (batch·head, n, width) tensor, inside it only."""
        tl.store(
            ptr + bh * n * width + rows[:, None] * width + cols[None, :],
            value,
            mask=_rows_mask(n, width, rows, cols),
        )

    @triton.jit
    def _elu_plus_one(x):
        """φ(x) = elu(x) + 1 (fp32): the default feature map, fused into the loads."""
        return tl.where(x > 0, x + 1.0, tl.exp(x))

    @triton.jit
    def _elu_slope(x):
        """φ'(x) for φ = elu + 1 (fp32): what the fused backward multiplies dq and dk by."""
        return tl.where(x > 0, 1.0, tl.exp(x))

    @triton.jit
    def _feature_tile(ptr, bh, n, width, rows, cols, FEATURE: tl.constexpr):
        """A (rows, cols) tile of features: as stored, or φ = elu + 1 of the raw input when
        ``FEATURE`` (formed in fp32, rounded to the input's dtype); zero outside the tensor."""
        x = _rows_tile(ptr, bh, n, width, rows, cols)
        if FEATURE:
            inside = _rows_mask(n, width, rows, cols)
            x = tl.where(inside, _elu_plus_one(x.to(tl.float32)), 0.0).to(x.dtype)
        return x

    @triton.jit
    def _state_tile(base, dk, dv, offs_k, offs_v):
        """The (key block, value block) tile of one chunk's fp32 state ``S``."""
        mask = (offs_k < dk)[:, None] & (offs_v < dv)[None, :]
        return tl.load(base + offs_k[:, None] * dv + offs_v[None, :], mask=mask, other=0.0)

    @triton.jit
    def _chunk_program(states_ptr, n, n_chunks, e_size, BT: tl.constexpr):
        """This program's chunk, head-dim block, batch·head, rows and chunk-state base."""
        chunk = tl.program_id(0)  # axis 0: up to 2**31 - 1 programs (long sequences)
        block = tl.program_id(1)
        bh = tl.program_id(2).to(tl.int64)
        offs_t = tl.arange(0, BT)
        rows = chunk * BT + offs_t
        base = states_ptr + (bh * n_chunks + chunk) * e_size
        return block, bh, offs_t, rows, rows < n, base

    @triton.jit
    def _over_keys(
        x_ptr, y_ptr, base, bh, n, dk, dv, rows, offs_v,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, K_BLOCKS: tl.constexpr,
        WITH_Z: tl.constexpr, PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr,
        FEATURE: tl.constexpr,
    ):  # fmt: skip
        """Reduced over key-dim blocks (unrolled: a runtime loop spills): ``X Yᵀ`` (BT, BT),
        ``X S[:, value block]`` (BT, BV) and, with ``WITH_Z``, ``X z`` (BT); X, Y are (n, dk)
        features (or raw inputs mapped on load, ``FEATURE``)."""
        pairs = tl.zeros([BT, BT], dtype=tl.float32)
        inter = tl.zeros([BT, BV], dtype=tl.float32)
        xz = tl.zeros([BT], dtype=tl.float32)
        for kb in tl.static_range(K_BLOCKS):
            offs_k = kb * BK + tl.arange(0, BK)
            x = _feature_tile(x_ptr, bh, n, dk, rows, offs_k, FEATURE)
            y = _feature_tile(y_ptr, bh, n, dk, rows, offs_k, FEATURE)
            s = _state_tile(base, dk, dv, offs_k, offs_v)
            pairs = tl.dot(x, tl.trans(y), pairs, input_precision=PRECISION)
            x32 = x.to(tl.float32)
            inter = tl.dot(x32, s, inter, input_precision=STATE_PRECISION)
            if WITH_Z:
                z = tl.load(base + dk * dv + offs_k, mask=offs_k < dk, other=0.0)
                xz += tl.sum(x32 * z[None, :], axis=1)
        return pairs, inter, xz

    @triton.jit
    def _over_values(
        x_ptr, y_ptr, base, bh, n, dk, dv, rows, offs_k,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, V_BLOCKS: tl.constexpr,
        PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Reduced over value-dim blocks (unrolled): ``X Yᵀ`` (BT, BT) and
        ``X S[key block, :]ᵀ`` (BT, BK); X, Y are (n, dv)."""
        pairs = tl.zeros([BT, BT], dtype=tl.float32)
        inter = tl.zeros([BT, BK], dtype=tl.float32)
        for vb in tl.static_range(V_BLOCKS):
            offs_v = vb * BV + tl.arange(0, BV)
            x = _rows_tile(x_ptr, bh, n, dv, rows, offs_v)
            y = _rows_tile(y_ptr, bh, n, dv, rows, offs_v)
            s = _state_tile(base, dk, dv, offs_k, offs_v)
            pairs = tl.dot(x, tl.trans(y), pairs, input_precision=PRECISION)
            inter = tl.dot(x.to(tl.float32), tl.trans(s), inter, input_precision=STATE_PRECISION)
        return pairs, inter

    @triton.jit
    def _chunk_states_kernel(
        b_ptr,
        c_ptr,
        d_ptr,
        w_ptr,
        states_ptr,
        n,
        dk,
        dv,
        n_chunks,
        e_size,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        WITH_Z: tl.constexpr,
        GRAD: tl.constexpr,
        PRECISION: tl.constexpr,
        FEATURE: tl.constexpr,
    ):
        """states[c] = [B_cᵀ C_c, Σ_t B_t] (forward) or [B_cᵀ (C_c / d), −Σ_t (w_t / d_t) B_t]
        (backward, ``GRAD``), for one (key block, value block) of one chunk; B is mapped by
        φ = elu + 1 on load when ``FEATURE``."""
        pid_kv, bh, _, rows, mask_t, base = _chunk_program(states_ptr, n, n_chunks, e_size, BT)
        n_vblocks = tl.cdiv(dv, BV)
        kb = pid_kv // n_vblocks
        vb = pid_kv % n_vblocks
        offs_k = kb * BK + tl.arange(0, BK)
        offs_v = vb * BV + tl.arange(0, BV)
        mask_k = offs_k < dk
        mask_v = offs_v < dv
        mask_b = mask_k[:, None] & mask_t[None, :]
        bt = tl.load(  # B_cᵀ as a (BK, BT) tile
            b_ptr + bh * n * dk + rows[None, :] * dk + offs_k[:, None], mask=mask_b, other=0.0
        )
        if FEATURE:
            bt = tl.where(mask_b, _elu_plus_one(bt.to(tl.float32)), 0.0).to(bt.dtype)
        c = tl.load(
            c_ptr + bh * n * dv + rows[:, None] * dv + offs_v[None, :],
            mask=mask_t[:, None] & mask_v[None, :],
            other=0.0,
        )
        if GRAD:
            d = tl.load(d_ptr + bh * n + rows, mask=mask_t, other=1.0)
            bt = bt.to(tl.float32)
            h = tl.dot(bt, c.to(tl.float32) / d[:, None], input_precision=PRECISION)
        else:
            h = tl.dot(bt, c, input_precision=PRECISION)
        tl.store(
            base + offs_k[:, None] * dv + offs_v[None, :], h, mask=mask_k[:, None] & mask_v[None, :]
        )
        if WITH_Z:
            if GRAD:
                r = -tl.load(w_ptr + bh * n + rows, mask=mask_t, other=0.0) / d
                z = tl.sum(bt * r[None, :], axis=1)
            else:
                z = tl.sum(bt.to(tl.float32), axis=1)
            tl.store(base + dk * dv + offs_k, z, mask=mask_k & (vb == 0))

    @triton.jit
    def _exclusive_scan_kernel(
        states_ptr,
        n_chunks,
        e_size,
        BC: tl.constexpr,
        BE: tl.constexpr,
        REVERSE: tl.constexpr,
    ):
        """In place: states[c] ← Σ of the states strictly before c (after c if ``REVERSE``).

        Tiles of ``BC`` chunks are loaded at once and scanned with ``tl.cumsum``, so the serial
        chain is N / (T·BC) dependent steps, not one per chunk.
        """
        offs_e = tl.program_id(0) * BE + tl.arange(0, BE)
        bh = tl.program_id(1).to(tl.int64)
        mask_e = offs_e < e_size
        base = states_ptr + bh * n_chunks * e_size
        running = tl.zeros([BE], dtype=tl.float32)
        n_tiles = tl.cdiv(n_chunks, BC)
        for t in range(0, n_tiles):
            tile = n_tiles - 1 - t if REVERSE else t
            chunks = tile * BC + tl.arange(0, BC)
            mask = (chunks < n_chunks)[:, None] & mask_e[None, :]
            ptrs = base + chunks[:, None].to(tl.int64) * e_size + offs_e[None, :]
            x = tl.load(ptrs, mask=mask, other=0.0)
            inclusive = tl.cumsum(x, axis=0, reverse=REVERSE)
            tl.store(ptrs, running[None, :] + (inclusive - x), mask=mask)
            running += tl.sum(x, axis=0)

    @triton.jit
    def _forward_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        states_ptr,
        out_ptr,
        d_ptr,
        n,
        dk,
        dv,
        n_chunks,
        e_size,
        eps,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        K_BLOCKS: tl.constexpr,
        NORMALIZE: tl.constexpr,
        PRECISION: tl.constexpr,
        STATE_PRECISION: tl.constexpr,
        FEATURE: tl.constexpr,
    ):
        """One chunk, one value block: out = (tril(Q Kᵀ) V + Q S_c) / d, d = den + eps; out is
        stored in out_ptr's dtype."""
        pid_v, bh, offs_t, rows, mask_t, base = _chunk_program(states_ptr, n, n_chunks, e_size, BT)
        offs_v = pid_v * BV + tl.arange(0, BV)
        mv = mask_t[:, None] & (offs_v < dv)[None, :]
        scores, inter, qz = _over_keys(
            q_ptr, k_ptr, base, bh, n, dk, dv, rows, offs_v,
            BT, BK, BV, K_BLOCKS, NORMALIZE, PRECISION, STATE_PRECISION, FEATURE,
        )  # fmt: skip
        scores = tl.where(offs_t[:, None] >= offs_t[None, :], scores, 0.0)
        v = _rows_tile(v_ptr, bh, n, dv, rows, offs_v)
        if NORMALIZE:
            d = tl.sum(scores, axis=1) + qz + eps
            inv = 1.0 / d
            # Normalized weights are in [0, 1] for non-negative features: safe in fp16.
            p = (scores * inv[:, None]).to(v.dtype)
            out = tl.dot(p, v, input_precision=PRECISION) + inter * inv[:, None]
            tl.store(d_ptr + bh * n + rows, d, mask=mask_t & (pid_v == 0))
        else:
            out = tl.dot(scores.to(v.dtype), v, input_precision=PRECISION) + inter
        tl.store(out_ptr + bh * n * dv + rows[:, None] * dv + offs_v[None, :], out, mask=mv)

    @triton.jit
    def _dq_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        do_ptr,
        d_ptr,
        w_ptr,
        states_ptr,
        dq_ptr,
        n,
        dk,
        dv,
        n_chunks,
        e_size,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        V_BLOCKS: tl.constexpr,
        NORMALIZE: tl.constexpr,
        PRECISION: tl.constexpr,
        STATE_PRECISION: tl.constexpr,
        FEATURE: tl.constexpr,
    ):
        """dq_i = (Σ_{j≤i, same chunk} (do_i·v_j − w_i) k_j + S_c do_i − w_i z_c) / d_i for one
        key block; the value dimension is reduced in blocks of ``BV``. With ``FEATURE``, k is
        mapped on load and dq is taken back through φ to the raw q (read only then)."""
        pid_k, bh, offs_t, rows, mask_t, base = _chunk_program(states_ptr, n, n_chunks, e_size, BT)
        offs_k = pid_k * BK + tl.arange(0, BK)
        mask_k = offs_k < dk
        mk = mask_t[:, None] & mask_k[None, :]
        dov, inter = _over_values(
            do_ptr, v_ptr, base, bh, n, dk, dv, rows, offs_k,
            BT, BK, BV, V_BLOCKS, PRECISION, STATE_PRECISION,
        )  # fmt: skip
        k = _feature_tile(k_ptr, bh, n, dk, rows, offs_k, FEATURE)
        keep = offs_t[:, None] >= offs_t[None, :]
        if NORMALIZE:
            w = tl.load(w_ptr + bh * n + rows, mask=mask_t, other=0.0)
            d = tl.load(d_ptr + bh * n + rows, mask=mask_t, other=1.0)
            z = tl.load(base + dk * dv + offs_k, mask=mask_k, other=0.0)
            u = tl.where(keep, dov - w[:, None], 0.0)
            dq = tl.dot(u.to(k.dtype), k, inter, input_precision=PRECISION)
            dq = (dq - w[:, None] * z[None, :]) / d[:, None]
        else:
            u = tl.where(keep, dov, 0.0)
            dq = tl.dot(u.to(k.dtype), k, inter, input_precision=PRECISION)
        if FEATURE:
            dq *= _elu_slope(_rows_tile(q_ptr, bh, n, dk, rows, offs_k).to(tl.float32))
        tl.store(dq_ptr + bh * n * dk + rows[:, None] * dk + offs_k[None, :], dq, mask=mk)

    @triton.jit
    def _dk_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        do_ptr,
        d_ptr,
        w_ptr,
        states_ptr,
        dk_ptr,
        n,
        dk,
        dv,
        n_chunks,
        e_size,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        V_BLOCKS: tl.constexpr,
        NORMALIZE: tl.constexpr,
        PRECISION: tl.constexpr,
        INTRA_PRECISION: tl.constexpr,
        STATE_PRECISION: tl.constexpr,
        FEATURE: tl.constexpr,
    ):
        """dk_j = Σ_{i≥j} (g_i·v_j + r_i) q_i for one key block: the intra-chunk part plus the
        reversed states ``[Σ q gᵀ, Σ r q]`` of the later chunks. With ``FEATURE``, q is mapped
        on load and dk is taken back through φ to the raw k (read only then)."""
        pid_k, bh, offs_t, rows, mask_t, base = _chunk_program(states_ptr, n, n_chunks, e_size, BT)
        offs_k = pid_k * BK + tl.arange(0, BK)
        mask_k = offs_k < dk
        mk = mask_t[:, None] & mask_k[None, :]
        vdo, grad = _over_values(
            v_ptr, do_ptr, base, bh, n, dk, dv, rows, offs_k,
            BT, BK, BV, V_BLOCKS, PRECISION, STATE_PRECISION,
        )  # fmt: skip
        q = _feature_tile(q_ptr, bh, n, dk, rows, offs_k, FEATURE)
        keep = offs_t[None, :] >= offs_t[:, None]  # row j (key), column i (query): i ≥ j
        if NORMALIZE:
            # Columns scaled by 1/d_i (tiny at long lengths): fp32 operands keep the range.
            d = tl.load(d_ptr + bh * n + rows, mask=mask_t, other=1.0)
            w = tl.load(w_ptr + bh * n + rows, mask=mask_t, other=0.0)
            dz = tl.load(base + dk * dv + offs_k, mask=mask_k, other=0.0)
            dscores_t = tl.where(keep, (vdo - w[None, :]) / d[None, :], 0.0)
            grad = tl.dot(dscores_t, q.to(tl.float32), grad, input_precision=INTRA_PRECISION)
            grad += dz[None, :]
        else:
            dscores_t = tl.where(keep, vdo, 0.0)
            grad = tl.dot(dscores_t.to(q.dtype), q, grad, input_precision=PRECISION)
        if FEATURE:
            grad *= _elu_slope(_rows_tile(k_ptr, bh, n, dk, rows, offs_k).to(tl.float32))
        tl.store(dk_ptr + bh * n * dk + rows[:, None] * dk + offs_k[None, :], grad, mask=mk)

    @triton.jit
    def _dv_kernel(
        q_ptr,
        k_ptr,
        do_ptr,
        d_ptr,
        states_ptr,
        dv_ptr,
        n,
        dk,
        dv,
        n_chunks,
        e_size,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        K_BLOCKS: tl.constexpr,
        NORMALIZE: tl.constexpr,
        PRECISION: tl.constexpr,
        INTRA_PRECISION: tl.constexpr,
        STATE_PRECISION: tl.constexpr,
        FEATURE: tl.constexpr,
    ):
        """dv_j = Σ_{i≥j} (q_i·k_j) g_i for one value block: intra-chunk + later chunks."""
        pid_v, bh, offs_t, rows, mask_t, base = _chunk_program(states_ptr, n, n_chunks, e_size, BT)
        offs_v = pid_v * BV + tl.arange(0, BV)
        mv = mask_t[:, None] & (offs_v < dv)[None, :]
        scores_t, grad, _ = _over_keys(
            k_ptr, q_ptr, base, bh, n, dk, dv, rows, offs_v,
            BT, BK, BV, K_BLOCKS, False, PRECISION, STATE_PRECISION, FEATURE,
        )  # fmt: skip
        scores_t = tl.where(offs_t[None, :] >= offs_t[:, None], scores_t, 0.0)
        do = _rows_tile(do_ptr, bh, n, dv, rows, offs_v)
        if NORMALIZE:
            d = tl.load(d_ptr + bh * n + rows, mask=mask_t, other=1.0)
            g = do.to(tl.float32) / d[:, None]
            grad = tl.dot(scores_t, g, grad, input_precision=INTRA_PRECISION)
        else:
            grad = tl.dot(scores_t.to(do.dtype), do, grad, input_precision=PRECISION)
        tl.store(dv_ptr + bh * n * dv + rows[:, None] * dv + offs_v[None, :], grad, mask=mv)

    @triton.jit
    def _row_dot_kernel(x_ptr, y_ptr, out_ptr, n_rows, dv, BR: tl.constexpr, BV: tl.constexpr):
        """out[r] = x[r] · y[r] in fp32 (the ``do · out`` of the normalizer gradient)."""
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        cols = tl.arange(0, BV)
        mask = (rows < n_rows)[:, None] & (cols < dv)[None, :]
        x = tl.load(x_ptr + rows[:, None] * dv + cols[None, :], mask=mask, other=0.0)
        y = tl.load(y_ptr + rows[:, None] * dv + cols[None, :], mask=mask, other=0.0)
        tl.store(
            out_ptr + rows, tl.sum(x.to(tl.float32) * y.to(tl.float32), axis=1), mask=rows < n_rows
        )


def _device_arch(device: torch.device) -> int:
    """Compute capability as an int (90 for H100); 90 off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


class _Plan:
    """Tile sizes, launch settings and dot precisions for one (shape, dtype) call."""

    def __init__(
        self,
        q: torch.Tensor,
        v: torch.Tensor,
        chunk_size: int,
        precision: str | None,
        normalize: bool = True,
        arch: int | None = None,
        feature_map: str | None = None,
    ):
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
        if feature_map is not None and feature_map not in FUSED_FEATURE_MAPS:
            raise ValueError(
                f"feature_map={feature_map!r}: the kernels fuse only {FUSED_FEATURE_MAPS} "
                "(or None for precomputed features)"
            )
        self.feature = feature_map is not None
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(
                f"backend='triton' supports float32/float16/bfloat16 inputs, not {q.dtype}"
            )
        *self.batch, self.n, self.dk = q.shape
        self.dv = v.shape[-1]
        if self.dk > MAX_HEAD_DIM or self.dv > MAX_HEAD_DIM:
            raise ValueError(
                f"the triton kernel supports head dims <= {MAX_HEAD_DIM}, got {self.dk}/{self.dv}"
            )
        bh = math.prod(self.batch)
        if bh > MAX_GRID_Z:
            raise ValueError(
                f"the triton kernel runs batch*heads <= {MAX_GRID_Z} (a CUDA grid axis), got "
                f"{bh}; use backend='torch' or split the batch"
            )
        self.dtype = q.dtype
        low = q.dtype in (torch.float16, torch.bfloat16)
        # 16-bit dots use the tensor cores whatever the setting; fp32 dots follow `precision`.
        self.prec = "tf32" if low else (precision or "tf32x3")
        self.state_prec = "tf32x3" if low else self.prec
        self.intra_prec = "tf32" if low else self.prec
        # Blocks of at most 64 along the head dims (unrolled loops reduce over the rest), and
        # shorter chunks for wider heads, so registers stay bounded up to MAX_HEAD_DIM.
        self.bk = min(max(16, next_power_of_2(self.dk)), 64)
        self.bv = min(max(16, next_power_of_2(self.dv)), 64)
        # Chunk length: the register budget decides. On sm_90 64 positions fit at head dim 64;
        # Ampere's mma.sync lowering of the 3xTF32 dots needs 32 (at 64, ptxas falls back to
        # 32 registers and spills kilobytes). See tests/test_kernel_resources.py.
        self.arch = arch if arch is not None else _device_arch(q.device)
        widest = max(self.dk, self.dv)
        if self.arch >= 90:
            cap = 64 if widest <= 64 else (32 if widest <= 128 else 16)
        else:
            cap = 32 if widest <= 64 else 16
        self.bt = max(16, min(next_power_of_2(chunk_size), cap))
        self.k_blocks = triton.cdiv(self.dk, self.bk)
        self.v_blocks = triton.cdiv(self.dv, self.bv)
        self.n_chunks = triton.cdiv(self.n, self.bt) if self.n else 0
        # Per chunk: [S (dk x dv), z (dk)]; the unnormalized product has no z.
        self.e_size = self.dk * self.dv + (self.dk if normalize else 0)

    def meta(
        self, kernel: str, *, normalize: bool, grad: bool = False, reverse: bool = False
    ) -> dict[str, Any]:
        """Compile-time arguments and ``num_warps`` of one kernel: the launches use these, and
        the resource tests compile exactly them (8 warps: 4 spill at 64 x 64 tiles)."""
        tiles = {"BT": self.bt, "BK": self.bk, "BV": self.bv}
        dots = {"PRECISION": self.prec, "STATE_PRECISION": self.state_prec, "num_warps": 8}
        if kernel == "states":
            precision = self.state_prec if grad else self.prec
            return {**tiles, "WITH_Z": normalize, "GRAD": grad, "PRECISION": precision,
                    "FEATURE": self.feature, "num_warps": 8 if grad else 4}  # fmt: skip
        if kernel == "scan":
            return {"BC": 16, "BE": 128, "REVERSE": reverse}
        dots["FEATURE"] = self.feature
        if kernel == "forward":
            return {**tiles, "K_BLOCKS": self.k_blocks, "NORMALIZE": normalize, **dots}
        if kernel == "dq":
            return {**tiles, "V_BLOCKS": self.v_blocks, "NORMALIZE": normalize, **dots}
        intra = {"INTRA_PRECISION": self.intra_prec, "NORMALIZE": normalize, **dots}
        if kernel == "dk":
            return {**tiles, "V_BLOCKS": self.v_blocks, **intra}
        if kernel == "dv":
            return {**tiles, "K_BLOCKS": self.k_blocks, **intra}
        raise ValueError(f"unknown kernel {kernel!r}")

    def flat(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return t.to(dtype or self.dtype).reshape(-1, self.n, t.shape[-1]).contiguous()

    def backward_buffers(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        grad_out: torch.Tensor,
        grad_dtype: torch.dtype,
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The flat (batch·head, n, ·) inputs of a backward and its empty dq, dk, dv."""
        inputs = tuple(self.flat(t) for t in (q, k, v, grad_out))
        bh = inputs[0].shape[0]
        dq = torch.empty(bh, self.n, self.dk, device=q.device, dtype=grad_dtype)
        dv = torch.empty(bh, self.n, self.dv, device=q.device, dtype=grad_dtype)
        return inputs, (dq, torch.empty_like(dq), dv)

    def grid(self, kernel: str, bh: int) -> tuple[int, int, int]:
        blocks = {
            "states": self.k_blocks * self.v_blocks,
            "forward": self.v_blocks,
            "dv": self.v_blocks,
            "dq": self.k_blocks,
            "dk": self.k_blocks,
        }[kernel]
        return (self.n_chunks, blocks, bh)

    def states(
        self,
        b: torch.Tensor,
        c: torch.Tensor,
        *,
        normalize: bool,
        reverse: bool = False,
        d: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exclusive prefix (suffix if ``reverse``) sums of the chunk states: (BH, chunks, E).

        Forward: ``[Σ k vᵀ, Σ k]``; backward (``d`` given): ``[Σ q (do/d)ᵀ, −Σ (w/d) q]``.
        """
        bh = b.shape[0]
        states = torch.empty(bh, self.n_chunks, self.e_size, device=b.device, dtype=torch.float32)
        grad = d is not None
        _chunk_states_kernel[self.grid("states", bh)](
            b, c, d if grad else b, w if grad else b, states,
            self.n, self.dk, self.dv, self.n_chunks, self.e_size,
            **self.meta("states", normalize=normalize, grad=grad),
        )  # fmt: skip
        scan = self.meta("scan", normalize=normalize, reverse=reverse)
        _exclusive_scan_kernel[(triton.cdiv(self.e_size, scan["BE"]), bh)](
            states, self.n_chunks, self.e_size, **scan
        )
        return states


def causal_linear_forward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    eps: float = 1e-6,
    normalize: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
    precision: str | None = None,
    feature_map: str | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention on features (normalized) or the causal product (not).

    Returns ``(out, d)``: ``out`` (..., N, Dv) in ``out_dtype`` (fp32 accumulation whatever
    it is) and ``d = den + eps`` (..., N) float32 when ``normalize`` (``None`` otherwise),
    which the backward needs. ``feature_map="elu"``: q and k are raw inputs, mapped by
    φ = elu + 1 inside the kernels (no feature tensors are formed).
    """
    plan = _Plan(q, v, chunk_size, precision, normalize, feature_map=feature_map)
    q3, k3, v3 = plan.flat(q), plan.flat(k), plan.flat(v)
    bh = q3.shape[0]
    out = torch.empty(bh, plan.n, plan.dv, device=q.device, dtype=out_dtype)
    d = torch.empty(bh, plan.n, device=q.device, dtype=torch.float32) if normalize else None
    if plan.n and bh:
        states = plan.states(k3, v3, normalize=normalize)
        _forward_kernel[plan.grid("forward", bh)](
            q3, k3, v3, states, out, d if normalize else out,
            plan.n, plan.dk, plan.dv, plan.n_chunks, plan.e_size, float(eps),
            **plan.meta("forward", normalize=normalize),
        )  # fmt: skip
    out = out.view(*plan.batch, plan.n, plan.dv)
    return out, (d.view(*plan.batch, plan.n) if d is not None else None)


def causal_linear_backward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    d: torch.Tensor | None,
    grad_out: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    precision: str | None = None,
    feature_map: str | None = None,
    grad_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``causal_linear_forward_triton`` from its ``out`` and ``d``; both are
    ``None`` for the unnormalized product. Returns (dq, dk, dv) in ``grad_dtype``, with
    respect to the raw q, k when ``feature_map`` is fused (as in the forward)."""
    normalize = d is not None
    if normalize and out is None:
        raise ValueError("the normalized backward needs the forward's output")
    plan = _Plan(q, v, chunk_size, precision, normalize, feature_map=feature_map)
    (q3, k3, v3, do3), (dq, dk, dv) = plan.backward_buffers(q, k, v, grad_out, grad_dtype)
    bh = q3.shape[0]
    if plan.n and bh:
        d3 = w3 = do3  # placeholders when unnormalized (never read)
        if d is not None and out is not None:
            d3 = d.reshape(bh, plan.n).contiguous()
            w3 = torch.empty_like(d3)  # w = do · out, per position
            rows = bh * plan.n
            _row_dot_kernel[(triton.cdiv(rows, 16),)](
                do3, plan.flat(out, out.dtype), w3, rows, plan.dv,
                BR=16, BV=max(16, next_power_of_2(plan.dv)),
            )  # fmt: skip
        sizes = (plan.n, plan.dk, plan.dv, plan.n_chunks, plan.e_size)
        states = plan.states(k3, v3, normalize=normalize)
        _dq_kernel[plan.grid("dq", bh)](
            q3, k3, v3, do3, d3, w3, states, dq, *sizes, **plan.meta("dq", normalize=normalize)
        )
        states = plan.states(
            q3, do3, normalize=normalize, reverse=True,
            d=d3 if normalize else None, w=w3 if normalize else None,
        )  # fmt: skip
        _dk_kernel[plan.grid("dk", bh)](
            q3, k3, v3, do3, d3, w3, states, dk, *sizes, **plan.meta("dk", normalize=normalize)
        )
        _dv_kernel[plan.grid("dv", bh)](
            q3, k3, do3, d3, states, dv, *sizes, **plan.meta("dv", normalize=normalize)
        )
    shape = (*plan.batch, plan.n)
    return dq.view(*shape, plan.dk), dk.view(*shape, plan.dk), dv.view(*shape, plan.dv)


@torch.compiler.disable
def causal_product_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    precision: str | None = None,
) -> torch.Tensor:
    """Forward of the unnormalized causal product ``Σ_{j≤i} (a_i·b_j) c_j``: float32 output.

    ``precision`` sets the fp32 dots (ignored for 16-bit inputs, which use the tensor cores):
    ``tf32x3`` (default, ~fp32 accuracy on tensor cores), ``tf32`` (~1e-3) or ``ieee``.
    """
    return causal_linear_forward_triton(
        a, b, c, normalize=False, chunk_size=chunk_size, precision=precision
    )[0]
