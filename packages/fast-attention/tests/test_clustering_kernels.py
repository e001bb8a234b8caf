"""Triton assignment step of Hamming k-means: popcount spec, torch tie-breaking, dispatch,
errors, and the compiled kernel's resources on sm_90 (no GPU needed)."""

import pytest
import torch

from verger.core.kernels.resources import KernelConfig, kernel_resources, ptxas_available
from verger.fast_attention.ops import clustering
from verger.fast_attention.ops.clustering import (
    hamming_assign,
    hamming_kmeans,
    hash_codes,
    resolve_backend,
)
from verger.fast_attention.ops.clustering import triton as kernels
from verger.fast_attention.ops.clustering.reference import hamming_distance_reference, pack_bits

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")


def _codes(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(dtype)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _popcount(codes, centroids):
    """(G, N, C) Hamming distances by popcount on packed int64 codes (the spec)."""
    return hamming_distance_reference(pack_bits(codes)[..., None], pack_bits(centroids)[:, None])


@needs_triton
@pytest.mark.parametrize(
    "g, n, c, bits",
    [(1, 64, 16, 17), (3, 37, 70, 63), (2, 130, 5, 1), (2, 65, 129, 17), (4, 1, 3, 63)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_assignment_matches_popcount_argmin(g, n, c, bits, dtype):
    codes = _codes(g, n, bits, seed=n + c, dtype=dtype)
    centroids = _codes(g, c, bits, seed=bits, dtype=dtype)
    assign, dist = kernels.hamming_assign_triton(codes, centroids)
    ref = _popcount(codes, centroids)
    assert assign.dtype == torch.long and assign.shape == (g, n)
    assert torch.equal(assign, ref.argmin(-1))  # argmin: first minimum, as argmax on scores
    assert torch.equal(dist.long(), ref.min(-1).values)
    torch_assign = hamming_assign(codes.float(), centroids.float(), backend="torch")
    assert torch.equal(assign, torch_assign)


@needs_triton
def test_ties_go_to_the_lowest_index_like_torch_argmax():
    # 4 bits and 150 centroids (3 blocks of 64): every row has many tied nearest centroids,
    # duplicates sit in different blocks, and the first block may not hold the best one.
    codes = _codes(2, 90, 4, seed=1)
    centroids = _codes(2, 150, 4, seed=2)
    centroids[0, :64] = -codes[0, 0]  # first block: all at distance 4 from row 0
    centroids[0, 64:] = codes[0, 0] * torch.tensor([-1.0, 1, 1, 1])  # later ones at distance 1
    centroids[0, 100] = centroids[0, 140] = codes[0, 0]  # two exact matches in later blocks
    scores = torch.bmm(codes, centroids.mT)
    expected = scores.argmax(-1)
    assign = hamming_assign(codes, centroids, backend="triton")
    assert torch.equal(assign, expected)
    assert assign[0, 0] == 100
    # all centroids identical: torch returns index 0 everywhere
    same = codes[:, :1].expand(-1, 70, -1).contiguous()
    assert torch.equal(hamming_assign(codes, same, backend="triton"), torch.zeros(2, 90).long())


@needs_triton
@pytest.mark.parametrize("padded", [False, True])
def test_kmeans_triton_equals_torch(padded):
    x = torch.randn(3, 150, 16, generator=torch.Generator().manual_seed(3))
    valid = None
    if padded:
        valid = torch.ones(3, 150, dtype=torch.bool)
        valid[1, 97:] = False
    codes = hash_codes(x, 63, valid=valid, generator=torch.Generator().manual_seed(0))
    a_t, c_t = hamming_kmeans(codes, 70, 10, valid=valid, backend="torch", generator=_gen(1))
    a_k, c_k = hamming_kmeans(codes, 70, 10, valid=valid, backend="triton", generator=_gen(1))
    assert torch.equal(a_t, a_k) and torch.equal(c_t, c_k)
    dist = _popcount(codes, c_k)
    assert torch.equal(a_k, dist.argmin(-1))


@needs_triton
def test_kmeans_fitted_on_a_sample_equals_on_both_backends(monkeypatch):
    # groups longer than lloyd_rows(C) fit on a sample (here 80 of 300 rows), then assign all
    monkeypatch.setattr(clustering, "lloyd_rows", lambda c: 8 * c)
    codes = _codes(3, 300, 63, seed=4)
    valid = torch.rand(3, 300, generator=torch.Generator().manual_seed(4)) > 0.3
    for v in (None, valid):
        a_t, c_t = hamming_kmeans(codes, 10, 5, valid=v, backend="torch", generator=_gen())
        a_k, c_k = hamming_kmeans(codes, 10, 5, valid=v, backend="triton", generator=_gen())
        assert torch.equal(a_k, a_t) and torch.equal(c_k, c_t)
        assert torch.equal(a_t, _popcount(codes, c_t).argmin(-1))


@needs_triton
@pytest.mark.parametrize(
    "g, n, c, bits, iterations",
    [
        (2, 150, 150, 63, 10),  # three centroid blocks, three row blocks
        (3, 90, 20, 4, 10),  # 4 bits: tied scores and tied votes everywhere, empty clusters
        (2, 33, 33, 17, 3),  # a cluster per row at the start
        (1, 70, 7, 1, 1),  # one bit, a single update
        (4, 129, 65, 64, 6),
        (1, 1100, 70, 63, 4),  # blocks of 128 rows (KMEANS_WIDE_ROWS), nine of them
    ],
)
def test_kmeans_kernel_equals_the_torch_loop(g, n, c, bits, iterations):
    # The torch loop is the specification: k-means++ seeds from the same draws, votes of the
    # members with ties to +1, empty clusters kept, the stop at the first unchanged
    # assignment; padding rows neither seed nor vote.
    codes = _codes(g, n, bits, seed=n + c)
    valid = torch.rand(g, n, generator=torch.Generator().manual_seed(c)) > 0.2
    valid = valid.sort(1, descending=True).values  # left-aligned, as with right padding
    for v in (None, valid):
        a_t, c_t = hamming_kmeans(codes, c, iterations, valid=v, backend="torch", generator=_gen())
        a_k, c_k = hamming_kmeans(codes, c, iterations, valid=v, backend="triton", generator=_gen())
        assert torch.equal(a_k, a_t) and torch.equal(c_k, c_t)


@needs_triton
def test_kmeans_kernel_groups_converge_apart_in_a_fixed_number_of_launches(monkeypatch):
    # group 0 starts at its fixed point (its rows are copies of 4 codes, and k-means++ seeds
    # one centroid on each), group 1 needs several updates: group 0's later sweeps must
    # change nothing, as in the torch loop, which runs until every group is stable; and the
    # loop is iterations + 1 launches
    rows = _codes(1, 4, 16, seed=9)[0]
    codes = _codes(2, 64, 16, seed=10)
    codes[0] = rows.repeat_interleave(16, 0)
    launches = []
    real = kernels._kmeans_step_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(kernels, "_kmeans_step_kernel", Counting())
    a_k, c_k = hamming_kmeans(codes, 4, 10, backend="triton", generator=_gen(2))
    monkeypatch.undo()
    a_t, c_t = hamming_kmeans(codes, 4, 10, backend="torch", generator=_gen(2))
    assert torch.equal(a_k, a_t) and torch.equal(c_k, c_t)
    assert sorted(c_k[0].tolist()) == sorted(rows.tolist())
    assert len(launches) == 11 and launches[0] == (1, 2)  # (row blocks, groups)
    with pytest.raises(ValueError, match=r"weights must be \(G, N\)"):
        kernels.hamming_kmeans_triton(codes, codes[:, :4], 3, torch.ones(2, 63))
    many = _codes(kernels.MAX_GRID_Y + 1, 1, 2)
    with pytest.raises(ValueError, match="groups exceed one launch"):
        kernels.hamming_kmeans_triton(many, many, 3)


@pytest.mark.parametrize("c, bits", [(5, 1), (100, 63), (300, 17), (1000, 63), (70, 200)])
def test_cpu_assignment_by_keyed_max_equals_argmax_with_ties(c, bits):
    # The CPU torch path finds the nearest centroid with one amax over keys s·C + (C−1−c)
    # instead of an argmax: same answers, ties to the lowest index included.
    from verger.fast_attention.ops.clustering import _keys_are_exact

    codes = _codes(3, 200, bits, seed=c)
    centroids = _codes(3, c, bits, seed=bits)
    centroids[:, c // 2 :: 3] = centroids[:, : len(range(c // 2, c, 3))]  # duplicates: ties
    assert _keys_are_exact(codes, c)
    expected = torch.bmm(codes, centroids.mT).argmax(-1)
    got = hamming_assign(codes, centroids, backend="torch")
    assert torch.equal(got, expected)
    if bits <= 63:  # the popcount spec packs into one int64
        assert torch.equal(got, _popcount_argmin(codes, centroids))


def _popcount_argmin(codes, centroids):
    return _popcount(codes, centroids).argmin(-1)


def test_cpu_assignment_falls_back_to_argmax_where_keys_would_be_inexact():
    from verger.fast_attention.ops.clustering import _keys_are_exact

    codes = _codes(1, 40, 63, seed=7)
    assert not _keys_are_exact(codes, 2**18)  # (bits + 1)·C >= 2**24: not exact in fp32
    assert not _keys_are_exact(codes.double(), 100)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # may run fp32 matmuls in TF32/bf16
        assert not _keys_are_exact(codes, 100)
        centroids = _codes(1, 100, 63, seed=8)
        expected = _popcount_argmin(codes, centroids)
        assert torch.equal(hamming_assign(codes, centroids, backend="torch"), expected)
    finally:
        torch.set_float32_matmul_precision(before)


def test_dispatch():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, 63) == "torch"
    assert resolve_backend("triton", cpu, 63) == "triton"
    if kernels.HAS_TRITON:
        assert resolve_backend("auto", torch.device("cuda"), 63) == "triton"
    assert resolve_backend("auto", torch.device("cuda"), 65) == "torch"  # too wide for the tile
    with pytest.raises(ValueError, match="backend"):
        hamming_assign(_codes(1, 4, 8), _codes(1, 2, 8), backend="cuda")
    with pytest.raises(ValueError, match="bits"):  # the torch path checks its inputs too
        hamming_assign(_codes(1, 4, 9), _codes(1, 2, 8), backend="torch")
    with pytest.raises(ValueError, match="at least one centroid"):
        hamming_assign(_codes(1, 4, 8), _codes(1, 0, 8), backend="torch")
    codes, cents = _codes(2, 33, 9, seed=4), _codes(2, 5, 9, seed=5)
    expected = torch.bmm(codes, cents.mT).argmax(-1)
    assert torch.equal(hamming_assign(codes, cents), expected)


@needs_triton
def test_bad_inputs_raise_clear_errors():
    codes, cents = _codes(2, 8, 16), _codes(2, 4, 16)
    run = kernels.hamming_assign_triton
    with pytest.raises(ValueError, match=r"\(G, N, bits\)"):
        run(codes[0], cents)
    with pytest.raises(ValueError, match="groups"):
        run(codes, cents[:1])
    with pytest.raises(ValueError, match="bits"):
        run(codes, cents[..., :8])
    with pytest.raises(TypeError, match="float"):
        run(codes.long(), cents)
    with pytest.raises(ValueError, match="bits <= 64"):
        run(_codes(1, 4, 65), _codes(1, 2, 65))
    with pytest.raises(ValueError, match="at least one centroid"):
        run(codes, cents[:, :0])
    empty, _ = run(codes[:, :0], cents)
    assert empty.shape == (2, 0)


@pytest.fixture(scope="module")
def resources():
    if not kernels.HAS_TRITON or not ptxas_available():
        pytest.skip("needs triton's NVIDIA backend")
    configs = []
    for n_clusters, bits in [(100, 63), (8, 17), (32, 1)]:
        meta = kernels.launch_meta(n_clusters, bits)
        warps = meta.pop("num_warps")
        signature = {"codes_ptr": "*fp32", "cent_ptr": "*fp32", "assign_ptr": "*i64",
                     "dist_ptr": "*i32", "n": "i32", "c": "i32", "bits": "i32",
                     "n_row_blocks": "i32"}  # fmt: skip
        configs.append(
            KernelConfig(kernels._hamming_assign_kernel, signature, meta, num_warps=warps)
        )
    return kernel_resources(*configs, arch=90)


@pytest.mark.slow  # ptxas compile: minutes on 2 CPU cores (run by tests_latest)
@pytest.mark.ptxas
def test_assign_kernel_does_not_spill_and_uses_tensor_cores(resources):
    for res in resources:
        assert not res.spills, res
        assert res.tensor_core_instructions > 0, f"the dot runs on FMA units: {res}"


@pytest.mark.slow  # ptxas compile: minutes on 2 CPU cores (run by tests_latest)
@pytest.mark.ptxas
def test_kmeans_step_kernel_does_not_spill_and_uses_tensor_cores():
    if not kernels.HAS_TRITON or not ptxas_available():
        pytest.skip("needs triton's NVIDIA backend")
    signature = {"codes_ptr": "*fp32", "weight_ptr": "*fp32", "assign_ptr": "*i64",
                 "cent_ptr": "*fp32", "final_ptr": "*fp32", "votes_ptr": "*fp32",
                 "counts_ptr": "*fp32", "changed_ptr": "*i32", "n": "i32", "c": "i32",
                 "bits": "i32", "t": "i32", "iterations": "i32"}  # fmt: skip
    configs = []
    for n_clusters, bits, n in [(100, 63, 0), (8, 17, 0), (100, 63, kernels.KMEANS_WIDE_ROWS)]:
        meta = kernels.kmeans_launch_meta(n_clusters, bits, n)
        warps = meta.pop("num_warps")
        meta["HAS_WEIGHT"] = True  # the variant with one more load
        configs.append(KernelConfig(kernels._kmeans_step_kernel, signature, meta, warps))
    for arch in (80, 90):
        for res in kernel_resources(*configs, arch=arch):
            assert not res.spills, res
            assert res.tensor_core_instructions > 0, f"the dots run on FMA units: {res}"
