"""Triton kernel for the assignment step of Hamming k-means: nearest centroid per code.

For ±1 codes ``a, b`` of ``bits`` entries the Hamming distance is ``(bits − a·b) / 2``, so the
nearest centroid is the argmax of the inner product. One program per (row block, group)
loads its (BN, bits) code tile once, loops over the group's centroids in blocks of ``BC``,
forms each (BN, BC) score tile with one ``tl.dot`` and keeps a running max / argmax: the
(G, N, C) score tensor is never materialized.

Exactness: the tiles are cast to fp16 (±1 and the zero padding of ``bits`` up to the block
width are exact) and the dots accumulate in fp32, so every score is an exact integer and the
result is identical to ``torch.bmm(codes, centroids.mT).argmax(-1)``. Ties go to the lowest
centroid index, as torch's argmax does (the first maximal value): within a block the smallest
column reaching the block max wins, and a later block replaces the running best only when it
is strictly greater.
"""

from __future__ import annotations

import os

import torch

from verger.core.kernels import next_power_of_2

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional at import
    HAS_TRITON = False

MAX_BITS = 64  # one (BN, 64) fp16 tile of codes; the int64 popcount spec stops at 63
MAX_PROGRAMS = 2**31 - 1  # groups x row blocks ride on grid axis 0

if HAS_TRITON:

    @triton.jit
    def _hamming_assign_kernel(
        codes_ptr,
        cent_ptr,
        assign_ptr,
        dist_ptr,
        n,
        c,
        bits,
        n_row_blocks,
        BN: tl.constexpr,
        BC: tl.constexpr,
        BB: tl.constexpr,
    ):
        """assign[g, i] = argmax_j codes[g, i]·cent[g, j] (lowest j on ties) and
        dist[g, i] = (bits − max) / 2, for one block of ``BN`` rows of one group ``g``."""
        pid = tl.program_id(0)
        g = (pid // n_row_blocks).to(tl.int64)
        rows = (pid % n_row_blocks) * BN + tl.arange(0, BN)
        offs_b = tl.arange(0, BB)
        mask_r = rows < n
        mask_b = offs_b < bits
        a = tl.load(  # (BN, BB) codes, zero past `bits` (adds nothing to the dots)
            codes_ptr + g * n * bits + rows[:, None] * bits + offs_b[None, :],
            mask=mask_r[:, None] & mask_b[None, :],
            other=0.0,
        ).to(tl.float16)
        cent_base = cent_ptr + g * c * bits
        best = tl.full([BN], float("-inf"), dtype=tl.float32)
        best_idx = tl.zeros([BN], dtype=tl.int32)
        for start in range(0, c, BC):
            cols = start + tl.arange(0, BC)
            mask_c = cols < c
            b = tl.load(  # (BB, BC) centroids, transposed
                cent_base + cols[None, :] * bits + offs_b[:, None],
                mask=mask_b[:, None] & mask_c[None, :],
                other=0.0,
            ).to(tl.float16)
            scores = tl.dot(a, b, out_dtype=tl.float32)  # exact integers in [-bits, bits]
            scores = tl.where(mask_c[None, :], scores, float("-inf"))
            block_max = tl.max(scores, axis=1)
            block_idx = tl.min(tl.where(scores == block_max[:, None], cols[None, :], c), axis=1)
            better = block_max > best  # strict: an earlier block keeps its ties
            best_idx = tl.where(better, block_idx, best_idx)
            best = tl.where(better, block_max, best)
        out = g * n + rows
        tl.store(assign_ptr + out, best_idx.to(tl.int64), mask=mask_r)
        tl.store(dist_ptr + out, ((bits - best) * 0.5).to(tl.int32), mask=mask_r)


def launch_meta(n_clusters: int, bits: int) -> dict[str, int]:
    """Compile-time tile sizes and ``num_warps`` of the launch (the resource tests use these).

    Rows in blocks of 64; centroids in blocks of up to 64 (fewer when there are fewer
    clusters); ``bits`` padded to a power of two ≥ 16 (the smallest ``tl.dot`` reduction).
    """
    return {
        "BN": 64,
        "BC": min(64, max(16, next_power_of_2(n_clusters))),
        "BB": max(16, next_power_of_2(bits)),
        "num_warps": 4,
    }


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_assign_inputs(codes: torch.Tensor, centroids: torch.Tensor) -> None:
    """Raise unless codes (G, N, bits) and centroids (G, C ≥ 1, bits) are float tensors that
    agree in groups and bits and share a device (every backend's precondition)."""
    if codes.dim() != 3 or centroids.dim() != 3:
        raise ValueError(
            "hamming assignment needs codes (G, N, bits) and centroids (G, C, bits), got shapes "
            f"{tuple(codes.shape)} and {tuple(centroids.shape)}"
        )
    (g, _, bits), (gc, n_clusters, bits_c) = codes.shape, centroids.shape
    if g != gc or bits != bits_c:
        raise ValueError(
            f"codes {tuple(codes.shape)} and centroids {tuple(centroids.shape)} must agree in "
            "groups (dim 0) and bits (dim 2)"
        )
    for name, t in (("codes", codes), ("centroids", centroids)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name} must be float32/float16/bfloat16 ±1 codes, not {t.dtype}")
    if codes.device != centroids.device:
        raise ValueError(f"codes on {codes.device} but centroids on {centroids.device}")
    if n_clusters < 1:
        raise ValueError("hamming assignment needs at least one centroid, got C = 0")


def _check(codes: torch.Tensor, centroids: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    check_assign_inputs(codes, centroids)
    if codes.device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got {codes.device} (on CPU it runs only "
            "under the Triton interpreter, TRITON_INTERPRET=1 set before import)"
        )
    if not 1 <= codes.shape[-1] <= MAX_BITS:
        raise ValueError(
            f"the triton kernel supports 1 <= bits <= {MAX_BITS}, got {codes.shape[-1]}"
        )


@torch.compiler.disable
def hamming_assign_triton(
    codes: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid in Hamming distance for ±1 codes: ``(assign (G, N) int64, distance
    (G, N) int32)``, ties to the lowest centroid index (as ``scores.argmax(-1)``)."""
    _check(codes, centroids)
    g, n, bits = codes.shape
    n_clusters = centroids.shape[1]
    assign = torch.empty(g, n, dtype=torch.long, device=codes.device)
    dist = torch.empty(g, n, dtype=torch.int32, device=codes.device)
    if g and n:
        meta = launch_meta(n_clusters, bits)
        n_row_blocks = triton.cdiv(n, meta["BN"])
        if g * n_row_blocks > MAX_PROGRAMS:
            raise ValueError(f"{g} groups x {n} rows exceed one launch; use backend='torch'")
        _hamming_assign_kernel[(g * n_row_blocks,)](
            codes.contiguous(), centroids.contiguous(), assign, dist,
            n, n_clusters, bits, n_row_blocks, **meta,
        )  # fmt: skip
    return assign, dist
