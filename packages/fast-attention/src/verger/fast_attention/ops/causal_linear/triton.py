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

so the backward is three launches: ``_backward_states_kernel`` forms every chunk's local
forward state (recomputed, not saved) and local reversed state ``[Q_cᵀ G_c, Σ r q]`` (with
``G = do / d``) plus ``w``, side by side; one ``_exclusive_scan_kernel`` launch turns them into
prefix and suffix sums; ``_grads_kernel`` forms dq, dk and dv, a key or value block per program.
A training step is 6 launches: at a few thousand tokens the host's launch time, not the GPU,
bounds it. The inter-chunk terms of dq and dk are two sums growing with N that cancel
to ~√N, so they run on fp32 states with 3xTF32 dots; the intra-chunk terms are formed after
the cancellation (``do·v − w``), so 16-bit operands are safe there.

Fused feature map (``feature_map="elu"``): q and k are raw inputs; every tile of them is mapped
by φ = elu + 1 as it is loaded (in fp32, rounded to the input dtype, zero outside the tensor),
and the dq/dk blocks of the gradient kernel multiply their result by φ'(q) / φ'(k).
``linear_attention`` uses it, so no feature tensor, no feature-map backward and no dtype copy
runs around the kernels.

Precision: 16-bit inputs use the tensor cores with fp32 accumulation; fp32 inputs use
``precision`` (default ``tf32x3``: tensor cores at ~fp32 accuracy; ``ieee`` runs the dots on
FMA units, which spills registers at these tile sizes and is many times slower).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from verger.core.kernels import next_power_of_2
from verger.fast_attention.ops._launch import Launcher

try:
    import triton
    import triton.language as tl

    from verger.core.kernels.lang import lane_flag

    HAS_TRITON = True
    TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
except ImportError:  # pragma: no cover - triton is optional at import
    HAS_TRITON = False
    TRITON_VERSION = (0, 0)

# Triton 3.9's compiler allocates registers differently: some of the 3.8 configurations spill
# with it (issue 19), so those few take narrower tiles from 3.9 on; 3.8 keeps its own.
NARROW_TILES = TRITON_VERSION >= (3, 9)

MAX_HEAD_DIM = 256
MAX_GRID_Z = 65535  # batch*heads rides on a grid axis limited to this
PRECISIONS = ("tf32x3", "tf32", "ieee")
FUSED_FEATURE_MAPS = ("elu",)  # feature maps the kernels can apply to raw q, k on load
DEFAULT_CHUNK = 64
LOW_PRECISION = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32, *LOW_PRECISION)  # what the kernels take
# The chunk scan's tiles: 16 chunks per tl.cumsum step, 128 state elements per program.
SCAN_META = {"BC": 16, "BE": 128}

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
    def _store_with_residual(out_ptr, res_ptr, bh, n, width, rows, cols, value,
                             RESIDUAL: tl.constexpr):  # fmt: skip
        """Store an fp32 (rows, cols) tile in out_ptr's dtype and, with ``RESIDUAL``, what that
        rounding lost (in the same dtype) in res_ptr: together ~2x the mantissa bits."""
        if RESIDUAL:  # first, so the rounded tile need not live beside the fp32 one
            rounded = value.to(out_ptr.dtype.element_ty).to(tl.float32)
            _rows_store(res_ptr, bh, n, width, rows, cols, value - rounded)
        _rows_store(out_ptr, bh, n, width, rows, cols, value.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _saved_output(out_ptr, res_ptr, bh, n, dv, rows, cols, RESIDUAL: tl.constexpr):
        """A (rows, cols) fp32 tile of the forward's output, its residual added back."""
        out = _rows_tile(out_ptr, bh, n, dv, rows, cols).to(tl.float32)
        if RESIDUAL:
            out += _rows_tile(res_ptr, bh, n, dv, rows, cols).to(tl.float32)
        return out

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
    def _state_store(base, dk, dv, offs_k, offs_v, value):
        """Store the (key block, value block) tile of one chunk's fp32 state ``S``."""
        mask = (offs_k < dk)[:, None] & (offs_v < dv)[None, :]
        tl.store(base + offs_k[:, None] * dv + offs_v[None, :], value, mask=mask)

    @triton.jit
    def _feature_tile_t(ptr, bh, n, width, rows, cols, FEATURE: tl.constexpr):
        """``_feature_tile`` loaded transposed: a (cols, rows) tile, e.g. K_cᵀ for ``Kᵀ V``."""
        mask = (cols < width)[:, None] & (rows < n)[None, :]
        x = tl.load(
            ptr + bh * n * width + rows[None, :] * width + cols[:, None], mask=mask, other=0.0
        )
        if FEATURE:
            x = tl.where(mask, _elu_plus_one(x.to(tl.float32)), 0.0).to(x.dtype)
        return x

    @triton.jit
    def _chunk_base(states_ptr, bh, n_chunks, e_size):
        """Where this program's chunk state starts in a (batch·head, chunks, E) buffer."""
        return states_ptr + (bh * n_chunks + tl.program_id(0)) * e_size

    @triton.jit
    def _chunk_program(states_ptr, n, n_chunks, e_size, BT: tl.constexpr):
        """This program's chunk, head-dim block, batch·head, rows and chunk-state base."""
        chunk = tl.program_id(0)  # axis 0: up to 2**31 - 1 programs (long sequences)
        block = tl.program_id(1)
        bh = tl.program_id(2).to(tl.int64)
        offs_t = tl.arange(0, BT)
        rows = chunk * BT + offs_t
        return block, bh, offs_t, rows, rows < n, _chunk_base(states_ptr, bh, n_chunks, e_size)

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
    def _forward_state_tile(
        k_ptr, v_ptr, base, bh, n, dk, dv, rows, kb, vb,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, WITH_Z: tl.constexpr,
        PRECISION: tl.constexpr, FEATURE: tl.constexpr,
    ):  # fmt: skip
        """One (key block, value block) tile of a chunk's local state ``[K_cᵀ V_c, Σ_t k_t]``
        (z by the first value block); k mapped by φ = elu + 1 on load when ``FEATURE``."""
        offs_k = kb * BK + tl.arange(0, BK)
        offs_v = vb * BV + tl.arange(0, BV)
        kt = _feature_tile_t(k_ptr, bh, n, dk, rows, offs_k, FEATURE)
        v = _rows_tile(v_ptr, bh, n, dv, rows, offs_v)
        _state_store(base, dk, dv, offs_k, offs_v, tl.dot(kt, v, input_precision=PRECISION))
        if WITH_Z:
            z = tl.sum(kt.to(tl.float32), axis=1)
            tl.store(base + dk * dv + offs_k, z, mask=(offs_k < dk) & lane_flag(vb == 0, offs_k))

    @triton.jit
    def _reverse_state_tile(
        q_ptr, do_ptr, out_ptr, res_ptr, d_ptr, w_ptr, base, bh, n, dk, dv, rows, mask_t, kb, vb,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, V_BLOCKS: tl.constexpr,
        NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr,
        FEATURE: tl.constexpr, RESIDUAL: tl.constexpr,
    ):  # fmt: skip
        """One tile of a chunk's local reversed state ``[Q_cᵀ G_c, Σ_t r_t q_t]`` with
        ``G = dO / d`` and ``r = −w / d`` (unnormalized: ``[Q_cᵀ dO_c]``). The first value
        block also forms ``w = do · out`` for the chunk's rows (stored by the first key block
        for the gradient kernels) and the ``Σ r q`` part."""
        offs_k = kb * BK + tl.arange(0, BK)
        offs_v = vb * BV + tl.arange(0, BV)
        qt = _feature_tile_t(q_ptr, bh, n, dk, rows, offs_k, FEATURE)
        do = _rows_tile(do_ptr, bh, n, dv, rows, offs_v)
        if NORMALIZE:
            # fp32 operands: G = dO / d is tiny at long lengths, and these sums cancel later
            d = tl.load(d_ptr + bh * n + rows, mask=mask_t, other=1.0)
            qt = qt.to(tl.float32)
            h = tl.dot(qt, do.to(tl.float32) / d[:, None], input_precision=STATE_PRECISION)
            _state_store(base, dk, dv, offs_k, offs_v, h)
            if vb == 0:
                w = tl.zeros([BT], dtype=tl.float32)
                for b in tl.static_range(V_BLOCKS):
                    offs = b * BV + tl.arange(0, BV)
                    do_b = _rows_tile(do_ptr, bh, n, dv, rows, offs).to(tl.float32)
                    out_b = _saved_output(out_ptr, res_ptr, bh, n, dv, rows, offs, RESIDUAL)
                    w += tl.sum(do_b * out_b, axis=1)
                tl.store(w_ptr + bh * n + rows, w, mask=mask_t & lane_flag(kb == 0, rows))
                rz = tl.sum(qt * (-w / d)[None, :], axis=1)
                tl.store(base + dk * dv + offs_k, rz, mask=offs_k < dk)
        else:
            _state_store(base, dk, dv, offs_k, offs_v, tl.dot(qt, do, input_precision=PRECISION))

    @triton.jit
    def _chunk_states_kernel(
        k_ptr,
        v_ptr,
        states_ptr,
        n,
        dk,
        dv,
        n_chunks,
        e_size,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        V_BLOCKS: tl.constexpr,
        WITH_Z: tl.constexpr,
        PRECISION: tl.constexpr,
        FEATURE: tl.constexpr,
    ):
        """states[c] = [K_cᵀ V_c, Σ_t k_t]: one program per (key block, value block, chunk)."""
        pid, bh, _, rows, _, base = _chunk_program(states_ptr, n, n_chunks, e_size, BT)
        _forward_state_tile(
            k_ptr, v_ptr, base, bh, n, dk, dv, rows, pid // V_BLOCKS, pid % V_BLOCKS,
            BT, BK, BV, WITH_Z, PRECISION, FEATURE,
        )  # fmt: skip

    @triton.jit
    def _backward_states_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, out_ptr, res_ptr, d_ptr, w_ptr, states_ptr, rev_ptr,
        n, dk, dv, n_chunks, e_size,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, K_BLOCKS: tl.constexpr,
        V_BLOCKS: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
        STATE_PRECISION: tl.constexpr, FEATURE: tl.constexpr, RESIDUAL: tl.constexpr,
    ):  # fmt: skip
        """Both local states of the backward in one launch: the first ``K_BLOCKS·V_BLOCKS``
        programs of a chunk recompute the forward's ``[K_cᵀ V_c, Σ k]`` (``states``), as
        many more form the reversed ``[Q_cᵀ G_c, Σ r q]`` (``rev``) and ``w``."""
        pid, bh, _, rows, mask_t, base = _chunk_program(states_ptr, n, n_chunks, e_size, BT)
        if pid < K_BLOCKS * V_BLOCKS:
            _forward_state_tile(
                k_ptr, v_ptr, base, bh, n, dk, dv, rows, pid // V_BLOCKS, pid % V_BLOCKS,
                BT, BK, BV, NORMALIZE, PRECISION, FEATURE,
            )  # fmt: skip
        else:
            tile = pid - K_BLOCKS * V_BLOCKS
            _reverse_state_tile(
                q_ptr, do_ptr, out_ptr, res_ptr, d_ptr, w_ptr,
                _chunk_base(rev_ptr, bh, n_chunks, e_size),
                bh, n, dk, dv, rows, mask_t, tile // V_BLOCKS, tile % V_BLOCKS,
                BT, BK, BV, V_BLOCKS, NORMALIZE, PRECISION, STATE_PRECISION, FEATURE, RESIDUAL,
            )  # fmt: skip

    @triton.jit
    def _scan_chunks(base, n_chunks, e_size, offs_e, BC: tl.constexpr, REVERSE: tl.constexpr):
        """In place over one (batch·head, state slice): each chunk ← Σ of the chunks strictly
        before it (after it if ``REVERSE``), ``BC`` chunks per ``tl.cumsum`` step."""
        mask_e = offs_e < e_size
        running = tl.zeros(offs_e.shape, dtype=tl.float32)
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
    def _exclusive_scan_kernel(
        states_ptr, rev_ptr, n_chunks, e_size, BC: tl.constexpr, BE: tl.constexpr
    ):
        """Exclusive sums over the chunks, in place: grid axis 2 picks the prefix sums of
        ``states`` (0) or the suffix sums of ``rev`` (1), so both scans of the backward share
        a launch. The serial chain is N / (T·BC) dependent steps, not one per chunk."""
        offs_e = tl.program_id(0) * BE + tl.arange(0, BE)
        offset = tl.program_id(1).to(tl.int64) * n_chunks * e_size
        if tl.program_id(2) == 0:
            _scan_chunks(states_ptr + offset, n_chunks, e_size, offs_e, BC, False)
        else:
            _scan_chunks(rev_ptr + offset, n_chunks, e_size, offs_e, BC, True)

    @triton.jit
    def _forward_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        states_ptr,
        out_ptr,
        res_ptr,
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
        RESIDUAL: tl.constexpr,
    ):
        """One chunk, one value block: out = (tril(Q Kᵀ) V + Q S_c) / d, d = den + eps; out is
        stored in out_ptr's dtype and, with ``RESIDUAL``, its rounding error in res_ptr."""
        pid_v, bh, offs_t, rows, mask_t, base = _chunk_program(states_ptr, n, n_chunks, e_size, BT)
        offs_v = pid_v * BV + tl.arange(0, BV)
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
            tl.store(d_ptr + bh * n + rows, d, mask=mask_t & lane_flag(pid_v == 0, rows))
        else:
            out = tl.dot(scores.to(v.dtype), v, input_precision=PRECISION) + inter
        _store_with_residual(out_ptr, res_ptr, bh, n, dv, rows, offs_v, out, RESIDUAL)

    @triton.jit
    def _dq_block(
        q_ptr, k_ptr, v_ptr, do_ptr, d_ptr, w_ptr, base, dq_ptr, pid_k, bh, offs_t, rows, mask_t,
        n, dk, dv,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, V_BLOCKS: tl.constexpr,
        NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr,
        FEATURE: tl.constexpr,
    ):  # fmt: skip
        """dq_i = (Σ_{j≤i, same chunk} (do_i·v_j − w_i) k_j + S_c do_i − w_i z_c) / d_i for one
        key block (``base``: the forward states); the value dimension is reduced in blocks of
        ``BV``. With ``FEATURE``, k is mapped on load and dq is taken back through φ to the
        raw q (read only then)."""
        offs_k = pid_k * BK + tl.arange(0, BK)
        mask_k = offs_k < dk
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
            u = tl.where(keep, dov - w[:, None], 0.0)  # formed after the cancellation
            dq = tl.dot(u.to(k.dtype), k, inter, input_precision=PRECISION)
            dq = (dq - w[:, None] * z[None, :]) / d[:, None]
        else:
            u = tl.where(keep, dov, 0.0)
            dq = tl.dot(u.to(k.dtype), k, inter, input_precision=PRECISION)
        if FEATURE:
            dq *= _elu_slope(_rows_tile(q_ptr, bh, n, dk, rows, offs_k).to(tl.float32))
        _rows_store(dq_ptr, bh, n, dk, rows, offs_k, dq)

    @triton.jit
    def _dk_block(
        q_ptr, k_ptr, v_ptr, do_ptr, d_ptr, w_ptr, base, dk_ptr, pid_k, bh, offs_t, rows, mask_t,
        n, dk, dv,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, V_BLOCKS: tl.constexpr,
        NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, INTRA_PRECISION: tl.constexpr,
        STATE_PRECISION: tl.constexpr, FEATURE: tl.constexpr,
    ):  # fmt: skip
        """dk_j = Σ_{i≥j} (g_i·v_j + r_i) q_i for one key block: the intra-chunk part plus the
        reversed states ``[Σ q gᵀ, Σ r q]`` of the later chunks (at ``base``). With
        ``FEATURE``, q is mapped on load and dk is taken back through φ to the raw k."""
        offs_k = pid_k * BK + tl.arange(0, BK)
        mask_k = offs_k < dk
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
        _rows_store(dk_ptr, bh, n, dk, rows, offs_k, grad)

    @triton.jit
    def _dv_block(
        q_ptr, k_ptr, do_ptr, d_ptr, base, dv_ptr, pid_v, bh, offs_t, rows, mask_t, n, dk, dv,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, K_BLOCKS: tl.constexpr,
        NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, INTRA_PRECISION: tl.constexpr,
        STATE_PRECISION: tl.constexpr, FEATURE: tl.constexpr,
    ):  # fmt: skip
        """dv_j = Σ_{i≥j} (q_i·k_j) g_i for one value block: intra-chunk + later chunks."""
        offs_v = pid_v * BV + tl.arange(0, BV)
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
        _rows_store(dv_ptr, bh, n, dv, rows, offs_v, grad)

    @triton.jit
    def _grads_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, d_ptr, w_ptr, states_ptr, rev_ptr, dq_ptr, dk_ptr, dv_ptr,
        n, dk, dv, n_chunks, e_size,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, K_BLOCKS: tl.constexpr,
        V_BLOCKS: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
        INTRA_PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr, FEATURE: tl.constexpr,
    ):  # fmt: skip
        """dq, dk and dv in one launch, side by side per chunk: programs ``[0, K)`` take a key
        block of dq (from the forward states), ``[K, 2K)`` a key block of dk and the rest a
        value block of dv (from the reversed states); K = ``K_BLOCKS``."""
        block, bh, offs_t, rows, mask_t, base = _chunk_program(states_ptr, n, n_chunks, e_size, BT)
        if block < K_BLOCKS:
            _dq_block(
                q_ptr, k_ptr, v_ptr, do_ptr, d_ptr, w_ptr, base, dq_ptr, block, bh, offs_t, rows,
                mask_t, n, dk, dv, BT, BK, BV, V_BLOCKS, NORMALIZE, PRECISION, STATE_PRECISION,
                FEATURE,
            )  # fmt: skip
        else:
            rev = _chunk_base(rev_ptr, bh, n_chunks, e_size)
            if block < 2 * K_BLOCKS:
                _dk_block(
                    q_ptr, k_ptr, v_ptr, do_ptr, d_ptr, w_ptr, rev, dk_ptr, block - K_BLOCKS, bh,
                    offs_t, rows, mask_t, n, dk, dv, BT, BK, BV, V_BLOCKS, NORMALIZE, PRECISION,
                    INTRA_PRECISION, STATE_PRECISION, FEATURE,
                )  # fmt: skip
            else:
                _dv_block(
                    q_ptr, k_ptr, do_ptr, d_ptr, rev, dv_ptr, block - 2 * K_BLOCKS, bh, offs_t,
                    rows, mask_t, n, dk, dv, BT, BK, BV, K_BLOCKS, NORMALIZE, PRECISION,
                    INTRA_PRECISION, STATE_PRECISION, FEATURE,
                )  # fmt: skip


# One Launcher per kernel: after its first call per specialization it skips Triton's
# argument binding (see ops/_launch.py).
_LAUNCH: dict[str, Launcher] = (
    {
        "states": Launcher(_chunk_states_kernel),
        "scan": Launcher(_exclusive_scan_kernel),
        "forward": Launcher(_forward_kernel),
        "backward_states": Launcher(_backward_states_kernel),
        "grads": Launcher(_grads_kernel),
    }
    if HAS_TRITON
    else {}
)


def _device_arch(device: torch.device) -> int:
    """Compute capability as an int (90 for H100); 90 off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 90
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
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
        if q.dtype not in KERNEL_DTYPES:
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
        low = q.dtype in LOW_PRECISION
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
        self.k_blocks = _cdiv(self.dk, self.bk)
        self.v_blocks = _cdiv(self.dv, self.bv)
        # The gradient kernel holds the most at once (dq, dk and dv branches in one launch):
        # with Triton >= 3.9 on sm_90 it takes narrower head-dim blocks (more programs per
        # chunk) where the plan's own would spill (``_grads_tiles``).
        self.grads_bk, self.grads_bv = (
            _grads_tiles(self.arch, low, widest, self.bk, self.bv)
            if NARROW_TILES
            else (self.bk, self.bv)
        )
        self.grads_k_blocks = _cdiv(self.dk, self.grads_bk)
        self.grads_v_blocks = _cdiv(self.dv, self.grads_bv)
        self.n_chunks = _cdiv(self.n, self.bt)
        # Per chunk: [S (dk x dv), z (dk)]; the unnormalized product has no z.
        self.e_size = self.dk * self.dv + (self.dk if normalize else 0)
        self.bh = bh
        self._metas: dict[tuple[str, bool, bool], Mapping[str, Any]] = {}

    def meta(self, kernel: str, *, normalize: bool, residual: bool = False) -> Mapping[str, Any]:
        """Compile-time arguments and ``num_warps`` of one kernel, built once per plan (a
        read-only mapping): the launches use these, and the resource tests compile exactly
        them (8 warps: 4 spill at 64 x 64 tiles). ``residual``: a 16-bit output saved with its
        rounding residual (``forward`` and ``backward_states``)."""
        key = (kernel, normalize, residual)
        if key not in self._metas:
            self._metas[key] = MappingProxyType(self._meta(kernel, normalize, residual))
        return self._metas[key]

    def _meta(self, kernel: str, normalize: bool, residual: bool) -> dict[str, Any]:
        tiles = {"BT": self.bt, "BK": self.bk, "BV": self.bv}
        blocks = {"K_BLOCKS": self.k_blocks, "V_BLOCKS": self.v_blocks}
        dots = {"PRECISION": self.prec, "STATE_PRECISION": self.state_prec,
                "FEATURE": self.feature, "num_warps": 8}  # fmt: skip
        if kernel == "states":
            return {**tiles, "V_BLOCKS": self.v_blocks, "WITH_Z": normalize,
                    "PRECISION": self.prec, "FEATURE": self.feature, "num_warps": 4}  # fmt: skip
        if kernel == "forward":
            return {**tiles, "K_BLOCKS": self.k_blocks, "NORMALIZE": normalize,
                    "RESIDUAL": residual, **dots}  # fmt: skip
        if kernel == "backward_states":
            return {**tiles, **blocks, "NORMALIZE": normalize, "RESIDUAL": residual, **dots}
        if kernel == "grads":
            return {"BT": self.bt, "BK": self.grads_bk, "BV": self.grads_bv,
                    "K_BLOCKS": self.grads_k_blocks, "V_BLOCKS": self.grads_v_blocks,
                    "NORMALIZE": normalize, "INTRA_PRECISION": self.intra_prec,
                    **dots}  # fmt: skip
        raise ValueError(f"unknown kernel {kernel!r}")

    def flat(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``t`` contiguous in ``dtype`` (the plan's default): the kernels read a (..., n, ·)
        tensor as (batch·head, n, ·) rows, so no reshape is needed (each costs host time)."""
        dtype = dtype or self.dtype
        if t.dtype != dtype:
            t = t.to(dtype)
        return t if t.is_contiguous() else t.contiguous()

    def backward_buffers(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        grad_out: torch.Tensor,
        grad_dtype: torch.dtype,
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The contiguous inputs of a backward and its empty dq, dk, dv (in the inputs'
        shapes)."""
        inputs = tuple(self.flat(t) for t in (q, k, v, grad_out))
        dq, dk, dv = (_empty_rows(t, grad_dtype) for t in (q, k, v))
        return inputs, (dq, dk, dv)

    def output_buffers(
        self, v: torch.Tensor, out_dtype: torch.dtype, normalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Empty ``(out, d, res)`` of a forward with values ``v``: ``out`` of v's shape,
        ``d`` when normalized, ``res`` (``out``'s rounding residual) when normalized with a
        16-bit ``out``."""
        out = _empty_rows(v, out_dtype)
        if not normalize:
            return out, None, None
        d = torch.empty((*self.batch, self.n), device=v.device, dtype=torch.float32)
        return out, d, (torch.empty_like(out) if out_dtype in LOW_PRECISION else None)

    def grid(self, kernel: str) -> tuple[int, int, int]:
        """(chunks, programs per chunk, batch·head) of a chunk-parallel kernel."""
        tiles = self.k_blocks * self.v_blocks
        blocks = {
            "states": tiles,
            "backward_states": 2 * tiles,  # forward and reversed state tiles
            "forward": self.v_blocks,
            "grads": 2 * self.grads_k_blocks + self.grads_v_blocks,  # dq, dk, dv blocks
        }[kernel]
        return (self.n_chunks, blocks, self.bh)

    def empty_states(self, device: torch.device, count: int = 1) -> tuple[torch.Tensor, ...]:
        """``count`` uninitialized (batch·head, chunks, E) fp32 buffers of per-chunk states
        (from one allocation)."""
        shape = (self.bh, self.n_chunks, self.e_size)
        if count == 1:
            return (torch.empty(shape, device=device, dtype=torch.float32),)
        return torch.empty((count, *shape), device=device, dtype=torch.float32).unbind(0)

    def scan(self, states: torch.Tensor, rev: torch.Tensor | None = None) -> None:
        """In place: each chunk's state in ``states`` becomes the sum over the chunks before
        it and, in ``rev`` when given, over the chunks after it (one launch for both)."""
        grid = (_cdiv(self.e_size, SCAN_META["BE"]), self.bh, 1 if rev is None else 2)
        _LAUNCH["scan"](
            grid, (states, states if rev is None else rev, self.n_chunks, self.e_size), SCAN_META
        )


def _grads_tiles(arch: int, low: bool, widest: int, bk: int, bv: int) -> tuple[int, int]:
    """Key and value block widths of ``_grads_kernel`` with Triton >= 3.9: the plan's own
    (``bk``, ``bv``) except on sm_90 where they spill. Chosen by one criterion, no spills with
    3.9 and its ptxas (``tests/test_kernel_resources.py``; at 255 registers the plan's own
    blocks spilled 24-164 bytes with 3.9; 3.8 keeps them, within its bounds there): fp32 at head dims <= 64 (64-position chunks, 3xTF32
    states) takes 32 x 32 blocks (232-236 registers); 16-bit heads of 128 (32-position
    chunks) 16 x 32 (182-186); of 256 (16-position chunks) 32 x 32 (136-137). Not yet timed
    on a GPU (see PERFORMANCE.md)."""
    if arch < 90 or widest <= 32 or (low and widest <= 64):
        return bk, bv
    if widest <= 64:
        return min(bk, 32), min(bv, 32)
    if widest <= 128:
        return min(bk, 16), min(bv, 32)
    return min(bk, 32), min(bv, 32)


def _empty_rows(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous tensor of ``like``'s shape and device in ``dtype``
    (``empty_like`` binds faster than ``torch.empty`` with a shape, device and dtype)."""
    return torch.empty_like(like, dtype=dtype, memory_format=torch.contiguous_format)


def _cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ on the host (``triton.cdiv`` costs a few µs per call through its wrapper)."""
    return -(-a // b)


@functools.lru_cache(maxsize=256)
def _cached_plan(
    shape: tuple[int, ...],
    dv: int,
    dtype: torch.dtype,
    chunk_size: int,
    precision: str | None,
    normalize: bool,
    arch: int,
    feature_map: str | None,
) -> _Plan:
    q = torch.empty(shape, dtype=dtype, device="meta")
    v = torch.empty((*shape[:-1], dv), dtype=dtype, device="meta")
    return _Plan(q, v, chunk_size, precision, normalize, arch=arch, feature_map=feature_map)


def plan_for(
    q: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    precision: str | None,
    normalize: bool = True,
    feature_map: str | None = None,
) -> _Plan:
    """The ``_Plan`` of a call, built once per (shape, dtype, GPU, settings): the host work of
    a training step at a few thousand tokens is what bounds its time."""
    arch = _device_arch(q.device)
    key = (tuple(q.shape), v.shape[-1], q.dtype, chunk_size, precision, normalize, arch)
    return _cached_plan(*key, feature_map)


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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Causal linear attention on features (normalized) or the causal product (not).

    Returns ``(out, d, res)``: ``out`` (..., N, Dv) in ``out_dtype`` (fp32 accumulation
    whatever it is); ``d = den + eps`` (..., N) float32 when ``normalize`` (``None``
    otherwise); ``res``, when ``normalize`` and ``out_dtype`` is 16-bit, what rounding ``out``
    lost (``None`` otherwise). The backward needs ``d`` and ``out + res``: its dq is a
    difference of two terms that cancel to ~1/√N of their size, so an output rounded to bf16
    would put ~25 % errors in dq at 32k tokens. ``feature_map="elu"``: q and k are raw inputs,
    mapped by φ = elu + 1 inside the kernels (no feature tensors are formed). Three launches:
    the chunk-local states, their scan, the outputs.
    """
    plan = plan_for(q, v, chunk_size, precision, normalize, feature_map)
    q3, k3, v3 = plan.flat(q), plan.flat(k), plan.flat(v)
    out, d, res = plan.output_buffers(v, out_dtype, normalize)
    if plan.n and plan.bh:
        (states,) = plan.empty_states(q.device)
        sizes = (plan.n, plan.dk, plan.dv, plan.n_chunks, plan.e_size)
        _LAUNCH["states"](
            plan.grid("states"), (k3, v3, states, *sizes), plan.meta("states", normalize=normalize)
        )
        plan.scan(states)
        _LAUNCH["forward"](
            plan.grid("forward"),
            (q3, k3, v3, states, out, out if res is None else res, out if d is None else d,
             *sizes, float(eps)),
            plan.meta("forward", normalize=normalize, residual=res is not None),
        )  # fmt: skip
    return out, d, res


def causal_linear_backward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    d: torch.Tensor | None,
    grad_out: torch.Tensor,
    *,
    res: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    precision: str | None = None,
    feature_map: str | None = None,
    grad_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``causal_linear_forward_triton`` from its ``out``, ``d`` and ``res``;
    ``out`` and ``d`` are ``None`` for the unnormalized product. Returns (dq, dk, dv) in
    ``grad_dtype``, with respect to the raw q, k when ``feature_map`` is fused (as in the
    forward).

    Three launches: both chunk-local states (the forward's, recomputed rather than saved, and
    the reversed ones) with ``w``, their two scans, then dq, dk and dv side by side.
    """
    normalize = d is not None
    if normalize and out is None:
        raise ValueError("the normalized backward needs the forward's output")
    plan = plan_for(q, v, chunk_size, precision, normalize, feature_map)
    (q3, k3, v3, do3), (dq, dk, dv) = plan.backward_buffers(q, k, v, grad_out, grad_dtype)
    if plan.n and plan.bh:
        out3 = res3 = d3 = w3 = do3  # placeholders when unnormalized (never read or written)
        if d is not None and out is not None:
            out3 = plan.flat(out, out.dtype)
            res3 = out3 if res is None else plan.flat(res, res.dtype)
            d3 = plan.flat(d, torch.float32)
            w3 = torch.empty_like(d3)  # w = do · out per position, formed with the states
        sizes = (plan.n, plan.dk, plan.dv, plan.n_chunks, plan.e_size)
        states, rev = plan.empty_states(q.device, 2)
        _LAUNCH["backward_states"](
            plan.grid("backward_states"),
            (q3, k3, v3, do3, out3, res3, d3, w3, states, rev, *sizes),
            plan.meta("backward_states", normalize=normalize, residual=res is not None),
        )  # fmt: skip
        plan.scan(states, rev)
        _LAUNCH["grads"](
            plan.grid("grads"),
            (q3, k3, v3, do3, d3, w3, states, rev, dq, dk, dv, *sizes),
            plan.meta("grads", normalize=normalize),
        )  # fmt: skip
    return dq, dk, dv


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
