"""Triton kernels for the rescaled exclusive prefix over chunks (spec: ``reference.py``).

One program per (group, block of centroids, block of value columns) carries the running
(max, sums, norms) through a loop over the chunks, as the reference does, so the whole scan
is one launch; torch needs about ten launches per chunk sequentially, or ~13 per step of a
log-depth scan. The backward is one reverse loop: with P_b the prefix maximum at b,

    ∂out_s[b] / ∂s_j = exp(m_j − P_b)  for j < b,

so ``ds_j = exp(m_j − P_{j+1}) · Σ_{b>j} exp(P_{j+1} − P_b) dS_b``, and the running sum
moves its reference from P_{b+1} to P_b with a factor exp(P_b − P_{b+1}) ≤ 1: no factor
exceeds 1, so nothing overflows (m_j ≤ P_{j+1} ≤ P_b). The maxima get no gradient (they are
shifts).
"""

from __future__ import annotations

import torch

from verger.core.kernels import require_triton

try:
    import triton
    import triton.language as tl

    from verger.core.kernels.lang import lane_flag

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional at import
    HAS_TRITON = False

MAX_GRID_YZ = 65535


def launch_meta(n_clusters: int, dim_v: int) -> dict[str, int]:
    """Blocks of 16 centroids and up to 64 value columns, 4 warps (the resource tests use it)."""
    bd = 16
    while bd < min(dim_v, 64):
        bd *= 2
    return {"BC": 16, "BD": bd, "num_warps": 4}


if HAS_TRITON:

    @triton.jit
    def _program_tiles(c, dv, BC: tl.constexpr, BD: tl.constexpr):
        """This program's group, centroids and value columns, their masks, and whether it
        writes the per-centroid outputs (one program per centroid block does)."""
        g = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        vcols = tl.program_id(2) * BD + tl.arange(0, BD)
        mask_c = cols < c
        mask_t = mask_c[:, None] & (vcols < dv)[None, :]
        return g, cols, vcols, mask_c, mask_t, lane_flag(tl.program_id(2) == 0, cols)

    @triton.jit
    def _prefix_fwd_kernel(
        m_ptr, s_ptr, z_ptr, out_m_ptr, out_s_ptr, out_z_ptr, nb, c, dv,
        BC: tl.constexpr, BD: tl.constexpr,
    ):  # fmt: skip
        g, cols, vcols, mask_c, mask_t, first = _program_tiles(c, dv, BC, BD)
        acc = s_ptr.dtype.element_ty
        run_m = tl.full([BC], float("-inf"), dtype=acc)
        run_s = tl.zeros([BC, BD], dtype=acc)
        run_z = tl.zeros([BC], dtype=acc)
        for b in range(0, nb):
            row = (g * nb + b) * c + cols  # (G, nb, C) entries of this chunk
            tile = row[:, None] * dv + vcols[None, :]
            tl.store(out_s_ptr + tile, run_s, mask=mask_t)
            tl.store(out_m_ptr + row, run_m, mask=mask_c & first)
            tl.store(out_z_ptr + row, run_z, mask=mask_c & first)
            m_b = tl.load(m_ptr + row, mask=mask_c, other=float("-inf"))
            new_m = tl.maximum(run_m, m_b)
            shift = tl.where(new_m == float("-inf"), 0.0, new_m)
            fa = tl.exp(run_m - shift)  # exp(−inf) = 0: an empty side adds nothing
            fb = tl.exp(m_b - shift)
            s_b = tl.load(s_ptr + tile, mask=mask_t, other=0.0)
            run_s = run_s * fa[:, None] + s_b * fb[:, None]
            run_z = run_z * fa + tl.load(z_ptr + row, mask=mask_c, other=0.0) * fb
            run_m = new_m

    @triton.jit
    def _prefix_bwd_kernel(
        m_ptr, out_m_ptr, d_out_s_ptr, d_out_z_ptr, d_s_ptr, d_z_ptr, nb, c, dv,
        BC: tl.constexpr, BD: tl.constexpr,
    ):  # fmt: skip
        g, cols, vcols, mask_c, mask_t, first = _program_tiles(c, dv, BC, BD)
        acc = d_out_s_ptr.dtype.element_ty
        acc_s = tl.zeros([BC, BD], dtype=acc)  # Σ_{b' > b} exp(P_{b+1} − P_b') dS_b'
        acc_z = tl.zeros([BC], dtype=acc)
        for i in range(0, nb):
            b = nb - 1 - i
            row = (g * nb + b) * c + cols
            tile = row[:, None] * dv + vcols[None, :]
            m_b = tl.load(m_ptr + row, mask=mask_c, other=float("-inf"))
            p_b = tl.load(out_m_ptr + row, mask=mask_c, other=float("-inf"))  # P_b
            p_next = tl.maximum(p_b, m_b)  # P_{b+1}
            shift = tl.where(p_next == float("-inf"), 0.0, p_next)
            factor = tl.exp(m_b - shift)  # ≤ 1; 0 for a chunk without a valid key
            tl.store(d_s_ptr + tile, factor[:, None] * acc_s, mask=mask_t)
            tl.store(d_z_ptr + row, factor * acc_z, mask=mask_c & first)
            # the reference moves to P_b (nothing before b is valid when P_b = −inf: any
            # finite value will do, the earlier factors are 0)
            r = tl.where(p_b == float("-inf"), 0.0, tl.exp(p_b - shift))
            acc_s = tl.load(d_out_s_ptr + tile, mask=mask_t, other=0.0) + r[:, None] * acc_s
            acc_z = tl.load(d_out_z_ptr + row, mask=mask_c, other=0.0) + r * acc_z


def _check(*tensors: torch.Tensor) -> None:
    require_triton(tensors[0].device, op="rescaled_scan")
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64) or any(t.dtype != dtype for t in tensors):
        raise TypeError(
            "the rescaled prefix kernels take float32 or float64 tensors of one dtype, got "
            f"{[t.dtype for t in tensors]}"
        )


def _grid(g: int, c: int, dv: int, meta: dict[str, int]) -> tuple[int, int, int]:
    grid = (g, -(-c // meta["BC"]), -(-dv // meta["BD"]))
    if max(grid[1:]) > MAX_GRID_YZ:
        raise ValueError(f"{c} centroids x {dv} value columns exceed one launch; use torch")
    return grid


@torch.compiler.disable
def rescaled_prefix_forward_triton(
    m: torch.Tensor, s: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exclusive prefixes of ``rescaled_prefix_reference`` in one launch."""
    _check(m, s, z)
    g, nb, c = z.shape
    dv = s.shape[-1]
    m, s, z = m.contiguous(), s.contiguous(), z.contiguous()
    out_m, out_s, out_z = torch.empty_like(m), torch.empty_like(s), torch.empty_like(z)
    if g and nb and c and dv:
        meta = launch_meta(c, dv)
        grid = _grid(g, c, dv, meta)
        _prefix_fwd_kernel[grid](m, s, z, out_m, out_s, out_z, nb, c, dv, **meta)
    return out_m, out_s, out_z


@torch.compiler.disable
def rescaled_prefix_backward_triton(
    m: torch.Tensor, out_m: torch.Tensor, d_out_s: torch.Tensor, d_out_z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients with respect to the chunk sums ``s`` and norms ``z`` (one launch)."""
    _check(m, out_m, d_out_s, d_out_z)
    g, nb, c = m.shape
    dv = d_out_s.shape[-1]
    m, out_m = m.contiguous(), out_m.contiguous()
    d_out_s, d_out_z = d_out_s.contiguous(), d_out_z.contiguous()
    d_s, d_z = torch.empty_like(d_out_s), torch.empty_like(d_out_z)
    if g and nb and c and dv:
        meta = launch_meta(c, dv)
        grid = _grid(g, c, dv, meta)
        _prefix_bwd_kernel[grid](m, out_m, d_out_s, d_out_z, d_s, d_z, nb, c, dv, **meta)
    return d_s, d_z
