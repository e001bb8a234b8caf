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

import torch

from verger.core.kernels import next_power_of_2, require_triton

try:
    import triton
    import triton.language as tl

    from verger.core.kernels.lang import lane_flag

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional at import
    HAS_TRITON = False

MAX_BITS = 64  # one (BN, 64) fp16 tile of codes; the int64 popcount spec stops at 63
MAX_PROGRAMS = 2**31 - 1  # groups x row blocks ride on grid axis 0

if HAS_TRITON:

    @triton.jit
    def _running_argmax(a, b, cols, mask_c, c, best, best_idx):
        """Fold one block of centroids (``b``: (BB, BC), transposed) into the running best
        score and index of each code row of ``a`` (BN, BB); ties to the lowest index."""
        scores = tl.dot(a, b, out_dtype=tl.float32)  # exact integers in [-bits, bits]
        scores = tl.where(mask_c[None, :], scores, float("-inf"))
        block_max = tl.max(scores, axis=1)
        block_idx = tl.min(tl.where(scores == block_max[:, None], cols[None, :], c), axis=1)
        better = block_max > best  # strict: an earlier block keeps its ties
        return tl.where(better, block_max, best), tl.where(better, block_idx, best_idx)

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
            best, best_idx = _running_argmax(a, b, cols, mask_c, c, best, best_idx)
        out = g * n + rows
        tl.store(assign_ptr + out, best_idx.to(tl.int64), mask=mask_r)
        tl.store(dist_ptr + out, ((bits - best) * 0.5).to(tl.int32), mask=mask_r)

    @triton.jit
    def _kmeans_step_kernel(
        codes_ptr,
        weight_ptr,
        assign_ptr,
        cent_ptr,
        final_ptr,
        votes_ptr,
        counts_ptr,
        changed_ptr,
        n,
        c,
        bits,
        t,
        iterations,
        HAS_WEIGHT: tl.constexpr,
        BN: tl.constexpr,
        BC: tl.constexpr,
        BB: tl.constexpr,
        BZ: tl.constexpr,
    ):
        """Sweep ``t`` of Lloyd's loop for one block of ``BN`` rows of group ``g``.

        Workspaces (fp32 unless said): ``cent`` (2, G, C, bits), centroids c_t in slot t % 2;
        ``votes`` (3, G, C, bits) and ``counts`` (3, G, C), the sums of sweep t in slot t % 3;
        ``changed`` (iterations + 1, G) int32, rows whose assignment sweep t changed.

        Sweep t ≥ 1 runs only if sweep t − 1 changed a row of the group (a fixed point stays
        one); it forms c_t = sign of the votes of sweep t − 1 (ties to +1) where the cluster
        has members, else c_{t−1}, on the fly. Every sweep assigns its rows to the nearest
        c_t, counts the changes, adds its rows' votes for the next sweep (atomics of integer
        sums: exact in any order) and zeroes the slot the sweep after next accumulates into.
        The row-block-0 program writes c_t to ``cent`` and to ``final``.
        """
        rb = tl.program_id(0)
        g = tl.program_id(1).to(tl.int64)
        n_groups = tl.num_programs(1)
        n_blocks = tl.num_programs(0)
        active = True
        if t > 0:
            active = tl.load(changed_ptr + (t - 1) * n_groups + g) > 0
        if active:
            cb = c * bits
            cent_in = cent_ptr + (((t + 1) % 2) * n_groups + g) * cb  # c_{t−1} (c_0 at t = 0)
            cent_out = cent_ptr + ((t % 2) * n_groups + g) * cb
            votes_in = votes_ptr + (((t + 2) % 3) * n_groups + g) * cb
            counts_in = counts_ptr + ((t + 2) % 3) * n_groups * c + g * c
            if t == 0:
                cent_in = cent_out
            rows = rb * BN + tl.arange(0, BN)
            offs_b = tl.arange(0, BB)
            mask_r = rows < n
            mask_b = offs_b < bits
            a = tl.load(  # (BN, BB) codes, zero past `bits`
                codes_ptr + g * n * bits + rows[:, None] * bits + offs_b[None, :],
                mask=mask_r[:, None] & mask_b[None, :],
                other=0.0,
            ).to(tl.float16)
            best = tl.full([BN], float("-inf"), dtype=tl.float32)
            best_idx = tl.zeros([BN], dtype=tl.int32)
            for start in range(0, c, BC):
                cols = start + tl.arange(0, BC)
                mask_c = cols < c
                tile = cols[None, :] * bits + offs_b[:, None]  # (BB, BC): transposed
                tile_mask = mask_b[:, None] & mask_c[None, :]
                cent = tl.load(cent_in + tile, mask=tile_mask, other=0.0)
                if t > 0:
                    votes = tl.load(votes_in + tile, mask=tile_mask, other=0.0)
                    members = tl.load(counts_in + cols, mask=mask_c, other=0.0)
                    cent = tl.where(members[None, :] > 0, tl.where(votes >= 0, 1.0, -1.0), cent)
                if rb == 0:
                    tl.store(final_ptr + g * cb + tile, cent, mask=tile_mask)
                    if t > 0:
                        tl.store(cent_out + tile, cent, mask=tile_mask)
                best, best_idx = _running_argmax(
                    a, cent.to(tl.float16), cols, mask_c, c, best, best_idx
                )
            # rows whose nearest centroid changed (every row at t = 0)
            prev = tl.load(
                assign_ptr + g * n + rows, mask=mask_r & lane_flag(t > 0, rows), other=-1
            )
            moved = tl.sum(tl.where(mask_r & (prev != best_idx), 1, 0), axis=0)
            tl.atomic_add(changed_ptr + t * n_groups + g, moved)
            tl.store(assign_ptr + g * n + rows, best_idx.to(tl.int64), mask=mask_r)
            if t < iterations:  # the votes of this assignment make c_{t+1}
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + g * n + rows, mask=mask_r, other=0.0)
                else:
                    w = tl.where(mask_r, 1.0, 0.0)
                votes_out = votes_ptr + ((t % 3) * n_groups + g) * cb
                counts_out = counts_ptr + (t % 3) * n_groups * c + g * c
                for start in range(0, c, BC):
                    cols = start + tl.arange(0, BC)
                    mask_c = cols < c
                    one_hot = tl.where(cols[None, :] == best_idx[:, None], w[:, None], 0.0)
                    block_votes = tl.dot(tl.trans(one_hot.to(tl.float16)), a)  # (BC, BB)
                    # only the clusters this block's rows joined: the atomics bound the time
                    members = tl.sum(one_hot, axis=0)
                    joined = mask_c & (members > 0)
                    tl.atomic_add(
                        votes_out + cols[:, None] * bits + offs_b[None, :],
                        block_votes,
                        mask=joined[:, None] & mask_b[None, :],
                    )
                    tl.atomic_add(counts_out + cols, members, mask=joined)
            if t + 1 < iterations:  # sweep t + 1 accumulates into slot (t + 1) % 3: zero it
                votes_next = votes_ptr + (((t + 1) % 3) * n_groups + g) * cb
                counts_next = counts_ptr + ((t + 1) % 3) * n_groups * c + g * c
                zeros = tl.zeros([BZ], dtype=tl.float32)
                for off in range(rb * BZ, cb, n_blocks * BZ):
                    idx = off + tl.arange(0, BZ)
                    tl.store(votes_next + idx, zeros, mask=idx < cb)
                    tl.store(counts_next + idx, zeros, mask=idx < c)


if HAS_TRITON:

    @triton.jit
    def _seed_weights(near_ptr, ok_ptr, rows, mask, first_seed, HAS_OK: tl.constexpr):
        """k-means++ weights of a block of candidates: 1 for the first seed, then the squared
        Hamming distance to the nearest seed so far; 0 outside the candidates (int32)."""
        near = tl.load(near_ptr + rows, mask=mask, other=0)
        w = tl.where(first_seed, 1, near * near)
        if HAS_OK:
            w = tl.where(tl.load(ok_ptr + rows, mask=mask, other=0) != 0, w, 0)
        return tl.where(mask, w, 0)

    @triton.jit
    def _seed_kernel(
        cand_ptr,
        ok_ptr,
        draws_ptr,
        seeds_ptr,
        near_ptr,
        m,
        c,
        bits,
        HAS_OK: tl.constexpr,
        BM: tl.constexpr,
        BB: tl.constexpr,
    ):
        """k-means++ seeds of one group (``seeding.py`` is the specification): for each seed j,
        fold seed j − 1 into every candidate's nearest distance (``near``, int32, set to
        bits + 1 by the caller) while summing the weights, then count the candidates whose
        running weight sum is at most ``(r_j · total) >> 31``: that count is the pick."""
        g = tl.program_id(0).to(tl.int64)
        offs_b = tl.arange(0, BB)
        mask_b = offs_b < bits
        base = cand_ptr + g * m * bits
        near_g = near_ptr + g * m
        ok_g = ok_ptr + g * m
        seed = tl.zeros([BB], dtype=tl.float32)
        pick = tl.zeros([], dtype=tl.int64)
        for j in range(0, c):
            total = tl.zeros([], dtype=tl.int64)
            for start in range(0, m, BM):
                rows = start + tl.arange(0, BM)
                mask = rows < m
                if j > 0:  # the nearest seed so far, seed j − 1 included
                    a = tl.load(
                        base + rows[:, None] * bits + offs_b[None, :],
                        mask=mask[:, None] & mask_b[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    dot = tl.sum(a * seed[None, :], axis=1)  # exact integers
                    dist = ((bits - dot) * 0.5).to(tl.int32)
                    near = tl.minimum(tl.load(near_g + rows, mask=mask, other=0), dist)
                    tl.store(near_g + rows, near, mask=mask)
                w = _seed_weights(near_g, ok_g, rows, mask, j == 0, HAS_OK)
                total += tl.sum(w.to(tl.int64), axis=0)
            target = (tl.load(draws_ptr + g * c + j) * total) >> 31
            first = tl.zeros([], dtype=tl.int64)
            running = tl.zeros([], dtype=tl.int64)
            for start in range(0, m, BM):
                rows = start + tl.arange(0, BM)
                mask = rows < m
                w = _seed_weights(near_g, ok_g, rows, mask, j == 0, HAS_OK).to(tl.int64)
                sums = running + tl.cumsum(w, axis=0)
                first += tl.sum(tl.where(mask & (sums <= target), 1, 0).to(tl.int64), axis=0)
                running += tl.sum(w, axis=0)
            pick = tl.where(total > 0, first, pick)
            seed = tl.load(base + pick * bits + offs_b, mask=mask_b, other=0.0).to(tl.float32)
            tl.store(seeds_ptr + (g * c + j) * bits + offs_b, seed, mask=mask_b)


SEED_META = {"BM": 256, "num_warps": 4}  # candidate rows per block of the seeding loops


@torch.compiler.disable
def seed_centroids_triton(
    cand: torch.Tensor, ok: torch.Tensor | None, n_clusters: int, draws: torch.Tensor
) -> torch.Tensor:
    """k-means++ seeds (G, C, bits) float32, one program per group: the same picks as
    ``seeding.seed_centroids_torch`` given the same candidates and draws."""
    require_triton(cand.device, op="clustering")
    g, m, bits = cand.shape
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"the triton kernel supports 1 <= bits <= {MAX_BITS}, got {bits}")
    seeds = torch.empty(g, n_clusters, bits, device=cand.device)
    if g == 0 or n_clusters == 0:
        return seeds
    near = torch.full((g, m), bits + 1, dtype=torch.int32, device=cand.device)
    ok8 = near if ok is None else ok.to(torch.int8).contiguous()  # placeholder when None
    _seed_kernel[(g,)](
        cand.contiguous(), ok8, draws.contiguous(), seeds, near, m, n_clusters, bits,
        HAS_OK=ok is not None, BB=max(16, next_power_of_2(bits)), **SEED_META,
    )  # fmt: skip
    return seeds


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
    check_assign_inputs(codes, centroids)
    require_triton(codes.device, op="clustering")
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


MAX_GRID_Y = 65535  # the step kernel's groups ride on grid axis 1


KMEANS_WIDE_ROWS = 1024  # from this many rows per group, the step kernel takes 128 per block


def kmeans_launch_meta(n_clusters: int, bits: int, n: int = 0) -> dict[str, int]:
    """Tile sizes of ``_kmeans_step_kernel``: those of ``launch_meta`` with 8 warps (with 4,
    the (BC, BB) vote tiles and their atomics' addresses spill on sm_80), plus ``BZ``, the
    length of the stretches of the next vote slot each program zeroes. From
    ``KMEANS_WIDE_ROWS`` rows per group, blocks of 128 rows: each block adds its votes with
    one atomic per (cluster joined, bit), and at 32k rows blocks of 64 (every cluster's
    votes added, joined or not) made the kernel 2x slower than the torch loop on an H200.
    256 rows spill on sm_80."""
    meta = {**launch_meta(n_clusters, bits), "BZ": 512, "num_warps": 8}
    if n >= KMEANS_WIDE_ROWS:
        meta["BN"] = 128
    return meta


@torch.compiler.disable
def hamming_kmeans_triton(
    codes: torch.Tensor,
    centroids: torch.Tensor,
    iterations: int,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's Hamming k-means from ``centroids`` (G, C, bits): ``(assign (G, N) int64,
    centroids (G, C, bits))``, with the rules of ``hamming_kmeans``'s torch loop.

    ``iterations + 1`` launches of ``_kmeans_step_kernel`` and two small torch ops, no host
    sync: each group stops on the device at its first unchanged assignment (later launches
    find it converged and do nothing). ``weights`` (G, N), 0 or 1: which rows vote (None:
    all).
    """
    _check(codes, centroids)
    g, n, bits = codes.shape
    n_clusters = centroids.shape[1]
    if weights is not None and weights.shape != (g, n):
        raise ValueError(f"weights must be (G, N) = {(g, n)}, got {tuple(weights.shape)}")
    if g > MAX_GRID_Y:
        raise ValueError(f"{g} groups exceed one launch (at most {MAX_GRID_Y}); use torch")
    iterations = max(int(iterations), 1)
    assign = torch.empty(g, n, dtype=torch.long, device=codes.device)
    if not (g and n):
        return assign, centroids.clone()
    meta = kmeans_launch_meta(n_clusters, bits, n)
    cb = g * n_clusters * bits
    # one zeroed buffer: vote slots (3, G, C, bits), count slots (3, G, C), changed counters
    work = torch.zeros(3 * cb + 3 * g * n_clusters + (iterations + 1) * g, device=codes.device)
    votes, counts = work[: 3 * cb], work[3 * cb : 3 * cb + 3 * g * n_clusters]
    changed = work[3 * cb + 3 * g * n_clusters :].view(torch.int32)  # zero bits: int 0
    cent = torch.empty(2, g, n_clusters, bits, device=codes.device)
    cent[0].copy_(centroids)
    final = torch.empty_like(cent[0])
    codes = codes.contiguous()
    w = None if weights is None else weights.to(torch.float32).contiguous()
    grid = (-(-n // meta["BN"]), g)
    for t in range(iterations + 1):  # without weights, `final` stands in (never read)
        _kmeans_step_kernel[grid](
            codes, final if w is None else w, assign, cent, final, votes, counts, changed,
            n, n_clusters, bits, t, iterations, HAS_WEIGHT=w is not None, **meta,
        )  # fmt: skip
    return assign, final.to(centroids.dtype)
