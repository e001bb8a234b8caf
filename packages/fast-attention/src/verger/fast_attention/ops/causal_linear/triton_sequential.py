"""Causal linear attention as one loop over chunks per (batch·head): the sequential schedule.

The chunk-parallel kernels (``triton.py``) fill the GPU at batch 1, but a training step is 6
launches; with few tokens the step is bound by the host's launch time, not by the GPU (an H200
step at 8k tokens, batch 1, 8 heads, when it was 11 launches: 0.35 ms of kernels in 1.38 ms).
Here each program carries its running state in registers through the chunks, so a step is 3
launches:

- forward: per chunk, ``out = (tril(Q Kᵀ) V + Q S) / d`` with ``d = rowsum(tril(Q Kᵀ)) + Q z +
  eps``, then ``S += Kᵀ V``, ``z += Σ k``;
- backward, forward sweep: ``w = do · out`` per row (stored for the next sweep) and
  ``dq = (tril(do Vᵀ − w) K + do Sᵀ − w zᵀ) / d``;
- backward, reverse sweep: with ``g = do / d``, ``r = −w / d`` and the states of the later
  chunks ``R = Σ q gᵀ``, ``ρ = Σ r q``: ``dk = triu((V doᵀ − w) / d) Q + V Rᵀ + ρ`` and
  ``dv = triu(K Qᵀ) g + K R``.

The same precisions as the parallel kernels: 16-bit operands on the tensor cores where the
terms are formed after their cancellation, fp32 states with 3xTF32 dots where two growing sums
cancel. Only ``batch·heads`` programs run, so this schedule suits short sequences and small
batches; head dims up to 64 (the states live in registers). Optional fused elu+1 map as in
``triton.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from verger.fast_attention.ops._launch import Launcher
from verger.fast_attention.ops.causal_linear.triton import (
    HAS_TRITON,
    LOW_PRECISION,
    NARROW_TILES,
    _device_arch,
    _Plan,
    plan_for,
)

MAX_SEQUENTIAL_DIM = 64  # S (dk x dv, fp32) stays in registers

if HAS_TRITON:
    import triton
    import triton.language as tl

    from verger.fast_attention.ops.causal_linear.triton import (
        _elu_slope,
        _feature_tile,
        _rows_store,
        _rows_tile,
        _saved_output,
        _store_with_residual,
    )

    @triton.jit
    def _program(BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """This program's batch·head and the offsets of a chunk's rows and head dims."""
        return (tl.program_id(0).to(tl.int64), tl.arange(0, BT), tl.arange(0, BK),
                tl.arange(0, BV))  # fmt: skip

    @triton.jit
    def _advance(s, z, k, v, PRECISION: tl.constexpr):
        """The running state after one more chunk: S + Kᵀ V, z + Σ k."""
        return tl.dot(tl.trans(k), v, s, input_precision=PRECISION), z + tl.sum(
            k.to(tl.float32), axis=0
        )

    @triton.jit
    def _seq_forward_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, res_ptr, d_ptr, n, dk, dv, eps,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
        PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr, RESIDUAL: tl.constexpr,
    ):  # fmt: skip
        bh, offs_t, offs_k, offs_v = _program(BT, BK, BV)
        causal = offs_t[:, None] >= offs_t[None, :]
        s = tl.zeros([BK, BV], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
        for start in range(0, n, BT):
            rows = start + offs_t
            q = _feature_tile(q_ptr, bh, n, dk, rows, offs_k, FEATURE)
            k = _feature_tile(k_ptr, bh, n, dk, rows, offs_k, FEATURE)
            v = _rows_tile(v_ptr, bh, n, dv, rows, offs_v)
            scores = tl.where(causal, tl.dot(q, tl.trans(k), input_precision=PRECISION), 0.0)
            q32 = q.to(tl.float32)
            d = tl.sum(scores, axis=1) + tl.sum(q32 * z[None, :], axis=1) + eps
            inv = 1.0 / d
            # normalized weights are in [0, 1] for non-negative features: safe in 16 bits
            out = tl.dot((scores * inv[:, None]).to(v.dtype), v, input_precision=PRECISION)
            out += tl.dot(q32, s, input_precision=STATE_PRECISION) * inv[:, None]
            _store_with_residual(out_ptr, res_ptr, bh, n, dv, rows, offs_v, out, RESIDUAL)
            tl.store(d_ptr + bh * n + rows, d, mask=rows < n)
            s, z = _advance(s, z, k, v, PRECISION)

    @triton.jit
    def _seq_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, out_ptr, res_ptr, d_ptr, w_ptr, dq_ptr, n, dk, dv,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
        PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr, RESIDUAL: tl.constexpr,
    ):  # fmt: skip
        bh, offs_t, offs_k, offs_v = _program(BT, BK, BV)
        causal = offs_t[:, None] >= offs_t[None, :]
        s = tl.zeros([BK, BV], dtype=tl.float32)
        z = tl.zeros([BK], dtype=tl.float32)
        for start in range(0, n, BT):
            rows = start + offs_t
            k = _feature_tile(k_ptr, bh, n, dk, rows, offs_k, FEATURE)
            v = _rows_tile(v_ptr, bh, n, dv, rows, offs_v)
            do = _rows_tile(do_ptr, bh, n, dv, rows, offs_v)
            do32 = do.to(tl.float32)
            out = _saved_output(out_ptr, res_ptr, bh, n, dv, rows, offs_v, RESIDUAL)
            w = tl.sum(do32 * out, axis=1)
            tl.store(w_ptr + bh * n + rows, w, mask=rows < n)
            d = tl.load(d_ptr + bh * n + rows, mask=rows < n, other=1.0)
            dov = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            u = tl.where(causal, dov - w[:, None], 0.0)  # formed after the cancellation
            dq = tl.dot(u.to(k.dtype), k, input_precision=PRECISION)
            dq = tl.dot(do32, tl.trans(s), dq, input_precision=STATE_PRECISION)
            dq = (dq - w[:, None] * z[None, :]) / d[:, None]
            if FEATURE:
                dq *= _elu_slope(_rows_tile(q_ptr, bh, n, dk, rows, offs_k).to(tl.float32))
            _rows_store(dq_ptr, bh, n, dk, rows, offs_k, dq)
            s, z = _advance(s, z, k, v, PRECISION)

    @triton.jit
    def _reverse_state(r_s, r_z, q32, g, w, d, STATE_PRECISION: tl.constexpr):
        """The reversed states after one more (earlier) chunk: R + Qᵀ G, ρ + Σ r q."""
        r_s = tl.dot(tl.trans(q32), g, r_s, input_precision=STATE_PRECISION)
        return r_s, r_z + tl.sum(q32 * (-w / d)[:, None], axis=0)

    @triton.jit
    def _seq_dkv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, d_ptr, w_ptr, dk_ptr, dv_ptr, n, dk, dv,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FEATURE: tl.constexpr,
        PRECISION: tl.constexpr, INTRA_PRECISION: tl.constexpr, STATE_PRECISION: tl.constexpr,
    ):  # fmt: skip
        """The reverse sweep, two programs per batch·head (grid axis 1): 0 forms dv, 1 forms
        dk; each carries its own copy of the reversed states, so neither holds both
        gradients' operands (one program doing both spills with Triton 3.9 in fp32)."""
        bh, offs_t, offs_k, offs_v = _program(BT, BK, BV)
        later = offs_t[None, :] >= offs_t[:, None]  # row j (key), column i (query): i >= j
        r_s = tl.zeros([BK, BV], dtype=tl.float32)  # Σ q gᵀ over the later chunks
        r_z = tl.zeros([BK], dtype=tl.float32)  # Σ r q over the later chunks
        n_chunks = tl.cdiv(n, BT)
        for i in range(0, n_chunks):
            rows = (n_chunks - 1 - i) * BT + offs_t
            q = _feature_tile(q_ptr, bh, n, dk, rows, offs_k, FEATURE)
            do = _rows_tile(do_ptr, bh, n, dv, rows, offs_v)
            d = tl.load(d_ptr + bh * n + rows, mask=rows < n, other=1.0)
            w = tl.load(w_ptr + bh * n + rows, mask=rows < n, other=0.0)
            g = do.to(tl.float32) / d[:, None]
            q32 = q.to(tl.float32)
            if tl.program_id(1) == 0:
                # dv_j = Σ_{i>=j} (q_i·k_j) g_i + K R
                k = _feature_tile(k_ptr, bh, n, dk, rows, offs_k, FEATURE)
                scores_t = tl.where(later, tl.dot(k, tl.trans(q), input_precision=PRECISION), 0.0)
                dv_tile = tl.dot(scores_t, g, input_precision=INTRA_PRECISION)
                dv_tile = tl.dot(k.to(tl.float32), r_s, dv_tile, input_precision=STATE_PRECISION)
                _rows_store(dv_ptr, bh, n, dv, rows, offs_v, dv_tile)
            else:
                # dk_j = Σ_{i>=j} (g_i·v_j + r_i) q_i + V Rᵀ + ρ; columns scaled by 1/d_i (tiny
                # at long lengths), so fp32 operands keep the range
                v = _rows_tile(v_ptr, bh, n, dv, rows, offs_v)
                vdo = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                dscores_t = tl.where(later, (vdo - w[None, :]) / d[None, :], 0.0)
                dk_tile = tl.dot(dscores_t, q32, input_precision=INTRA_PRECISION)
                dk_tile = tl.dot(
                    v.to(tl.float32), tl.trans(r_s), dk_tile, input_precision=STATE_PRECISION
                )
                dk_tile += r_z[None, :]
                if FEATURE:
                    raw_k = _rows_tile(k_ptr, bh, n, dk, rows, offs_k).to(tl.float32)
                    dk_tile *= _elu_slope(raw_k)
                _rows_store(dk_ptr, bh, n, dk, rows, offs_k, dk_tile)
            r_s, r_z = _reverse_state(r_s, r_z, q32, g, w, d, STATE_PRECISION)


_LAUNCH: dict[str, Launcher] = (
    {
        "forward": Launcher(_seq_forward_kernel),
        "dq": Launcher(_seq_dq_kernel),
        "dkv": Launcher(_seq_dkv_kernel),
    }
    if HAS_TRITON
    else {}
)


def check_sequential(q: torch.Tensor, v: torch.Tensor) -> None:
    """Raise unless the sequential schedule runs these head dims and this GPU: its fp32
    states live in registers, which holds on sm_90 (Hopper) up to head dim 64; Ampere's
    mma.sync lowering of the 3xTF32 state products spills kilobytes per thread
    (``tests/test_kernel_resources.py``)."""
    if q.shape[-1] > MAX_SEQUENTIAL_DIM or v.shape[-1] > MAX_SEQUENTIAL_DIM:
        raise ValueError(
            f"schedule='sequential' runs head dims <= {MAX_SEQUENTIAL_DIM}, got "
            f"{q.shape[-1]}/{v.shape[-1]}; use schedule='parallel'"
        )
    if _device_arch(q.device) < 90:
        raise ValueError(
            "schedule='sequential' needs an sm_90 or newer GPU (its register-resident states "
            "spill on older ones); use schedule='parallel'"
        )


def sequential_meta(plan: _Plan, kernel: str, residual: bool = False) -> dict[str, Any]:
    """Compile-time arguments, ``num_warps`` and ``num_stages`` of one sequential kernel (the
    launches use these; the resource tests compile exactly them). ``residual``: a 16-bit
    output saved with its rounding residual (``forward`` and ``dq``).

    The register budget decides, as in ``triton.py``: the fp32 state and its 3xTF32 products
    stay resident through the loop, so chunks are 32 positions for the 16-bit forward and dq
    sweeps and 16 for the rest (the reverse sweep holds more; from Triton 3.9 the 16-bit dq
    sweep takes 16 too: at 32 it spills 24-32 bytes with 3.9's compiler); 8 warps; two pipeline stages prefetch the next
    chunk's tiles where the registers allow it.
    """
    low = plan.dtype in LOW_PRECISION
    # Triton 3.8 keeps its 32-position 16-bit dq sweep; 3.9's compiler spills there
    wide = ("forward",) if NARROW_TILES else ("forward", "dq")
    meta: dict[str, Any] = {"BT": 32 if low and kernel in wide else 16, "BK": plan.bk,
                            "BV": plan.bv, "FEATURE": plan.feature, "PRECISION": plan.prec,
                            "STATE_PRECISION": plan.state_prec}  # fmt: skip
    if kernel == "dkv":
        meta["INTRA_PRECISION"] = plan.intra_prec
    else:
        meta["RESIDUAL"] = residual
    return {**meta, "num_warps": 8, "num_stages": 2 if low else 1}


def causal_linear_forward_sequential(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    eps: float,
    chunk_size: int,
    feature_map: str | None,
    out_dtype: torch.dtype,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Normalized causal linear attention, one program per batch·head: ``(out, den + eps,
    res)`` as ``causal_linear_forward_triton`` returns them. ``chunk_size`` is not used: the
    register budget sets the chunk (``sequential_meta``)."""
    check_sequential(q, v)
    plan = plan_for(q, v, chunk_size, precision, True, feature_map)
    q3, k3, v3 = plan.flat(q), plan.flat(k), plan.flat(v)
    out, d, res = plan.output_buffers(v, out_dtype, True)
    if plan.n and plan.bh:
        _LAUNCH["forward"](
            (plan.bh,),
            (q3, k3, v3, out, out if res is None else res, d, plan.n, plan.dk, plan.dv,
             float(eps)),
            sequential_meta(plan, "forward", residual=res is not None),
        )  # fmt: skip
    return out, d, res


def causal_linear_backward_sequential(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    d: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    res: torch.Tensor | None = None,
    chunk_size: int,
    feature_map: str | None,
    grad_dtype: torch.dtype,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``causal_linear_forward_sequential`` from its ``out``, ``d`` and
    ``res``."""
    check_sequential(q, v)
    plan = plan_for(q, v, chunk_size, precision, True, feature_map)
    (q3, k3, v3, do3), (dq, dk, dv) = plan.backward_buffers(q, k, v, grad_out, grad_dtype)
    if plan.n and plan.bh:
        d3 = plan.flat(d, torch.float32)
        w3 = torch.empty_like(d3)  # w = do · out, formed by the first sweep
        sizes = (plan.n, plan.dk, plan.dv)
        out3 = plan.flat(out, out.dtype)
        res3 = out3 if res is None else plan.flat(res, res.dtype)
        _LAUNCH["dq"](
            (plan.bh,), (q3, k3, v3, do3, out3, res3, d3, w3, dq, *sizes),
            sequential_meta(plan, "dq", residual=res is not None),
        )  # fmt: skip
        _LAUNCH["dkv"](
            (plan.bh, 2), (q3, k3, v3, do3, d3, w3, dk, dv, *sizes), sequential_meta(plan, "dkv")
        )
    return dq, dk, dv
