"""What the clustering finds: k-means++ seeding (torch and Triton alike), recovery of
well-separated clusters, the error with the true clusters against its closed form,
reproducibility from a seed, and the LM q, k, v capture of the accuracy bench."""

import pytest
import torch
import torch.nn.functional as F

from verger.core.kernels.resources import KernelConfig, kernel_resources, ptxas_available
from verger.core.nn import TransformerConfig, TransformerLM
from verger.core.testing import assert_close
from verger.fast_attention import cluster_queries, clustered_attention_from_clusters
from verger.fast_attention.clustered_accuracy import (
    StructuredQueries,
    capture_qkv,
    clustering_error,
    exact_attention,
    load_qkv,
    relative_error,
    save_qkv,
)
from verger.fast_attention.ops import clustering
from verger.fast_attention.ops.clustering import (
    hamming_assign,
    hamming_kmeans,
    hash_codes,
    seed_centroids,
)
from verger.fast_attention.ops.clustering import triton as kernels
from verger.fast_attention.ops.clustering.reference import kmeans_reference
from verger.fast_attention.ops.clustering.seeding import (
    seed_candidates,
    seed_centroids_torch,
    seed_draws,
    seed_rows,
)

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _codes(*shape, seed=0):
    return (torch.randint(0, 2, shape, generator=_gen(seed)) * 2 - 1).float()


def _same_partition(a, b):
    """Whether two labelings of the same points are equal up to renaming the labels."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@needs_triton
@pytest.mark.parametrize(
    "g, n, bits, c, padded",
    [
        (2, 300, 63, 20, False),  # two blocks of candidates
        (3, 50, 5, 40, True),  # 5 bits: few distinct codes, ties in the weights, padding
        (1, 10, 63, 15, False),  # more seeds than candidates: the last one repeats
        (2, 700, 64, 3, False),  # sampled candidates (256 of 700), 64 bits
        (2, 40, 1, 4, True),  # one bit: two codes at most
    ],
)
def test_seeding_kernel_equals_the_torch_loop(g, n, bits, c, padded):
    codes = _codes(g, n, bits, seed=n + c)
    valid = torch.rand(g, n, generator=_gen(c)) > 0.3 if padded else None
    cand, ok = seed_candidates(codes, valid, seed_rows(c))
    draws = seed_draws(g, c, torch.device("cpu"), _gen(bits))
    want = seed_centroids_torch(cand, ok, c, draws)
    got = kernels.seed_centroids_triton(cand, ok, c, draws)
    assert torch.equal(got, want)
    assert torch.equal(seed_centroids(codes, c, valid=valid, generator=_gen(3), backend="triton"),
                       seed_centroids(codes, c, valid=valid, generator=_gen(3), backend="torch"))  # fmt: skip


def test_seeds_are_distinct_valid_rows_while_distinct_rows_remain():
    codes = _codes(3, 200, 12, seed=1)
    valid = torch.ones(3, 200, dtype=torch.bool)
    valid[1, 50:] = False
    codes[1, 50:] = 1.0  # padding rows share one code: it must never be drawn
    seeds = seed_centroids(codes, 30, valid=valid, generator=_gen())
    for gi in range(3):
        rows = {tuple(r) for r in codes[gi][valid[gi]].tolist()}
        picked = [tuple(s) for s in seeds[gi].tolist()]
        assert set(picked) <= rows
        assert len(set(picked)) == 30  # each draw weighs the seeds' own rows 0
    # 4 distinct codes, 6 seeds: every code once, then repeats of the last seed
    few = _codes(1, 4, 8, seed=2).repeat(1, 10, 1)
    seeds = seed_centroids(few, 6, generator=_gen())
    assert len({tuple(s) for s in seeds[0].tolist()}) == 4
    assert torch.equal(seeds[0, 4], seeds[0, 3]) and torch.equal(seeds[0, 5], seeds[0, 3])


def _separated(n=600, heads=2, dim=16, centres=8, noise=0.05, seed=0):
    """Queries around centres far apart (distances ~ 4·√dim, noise 0.05 per coordinate)."""
    spec = StructuredQueries(n=n, heads=heads, dim=dim, centres=centres, noise=noise)
    return spec.sample(seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_well_separated_clusters(seed):
    q, _, _, labels = _separated(seed=seed)
    assign, used = cluster_queries(q, n_clusters=8, generator=_gen(seed))
    assert used == 8
    for h in range(q.shape[1]):
        assert _same_partition(assign[0, h], labels[0, h]), f"head {h}"
        dense, _ = kmeans_reference(q[0, h], 8, 10, _gen(seed))
        assert _same_partition(dense, labels[0, h]), f"dense reference, head {h}"


def test_kmeans_fitted_on_a_sample_recovers_well_separated_clusters(monkeypatch):
    # Long groups fit the centroids on lloyd_rows(C) rows spread over the sequence, then
    # assign every row: here 120 of 600 (15 per cluster), with padding holes in one head.
    monkeypatch.setattr(clustering, "lloyd_rows", lambda c: 15 * c)
    q, _, _, labels = _separated(seed=5)
    valid = torch.ones(2, 600, dtype=torch.bool)
    valid[1, 100:180] = False
    codes = hash_codes(q[0], 63, valid=valid, generator=_gen(5))
    for v in (None, valid):
        assign, centroids = hamming_kmeans(codes, 8, 10, valid=v, generator=_gen(6))
        assert torch.equal(assign, hamming_assign(codes, centroids))  # every row: nearest
        for h in range(q.shape[1]):
            keep = slice(None) if v is None else v[h]
            assert _same_partition(assign[h][keep], labels[0, h][keep]), f"head {h}"


@needs_triton
def test_triton_kmeans_recovers_well_separated_clusters():
    q, _, _, labels = _separated(n=300, seed=3)
    codes = hash_codes(q[0], 63, generator=_gen(3))
    assign, _ = hamming_kmeans(codes, 8, 10, backend="triton", generator=_gen(4))
    for h in range(q.shape[1]):
        assert _same_partition(assign[h], labels[0, h])


def _closed_form(q, k, v, labels, topk):
    """Clustered attention for given clusters, written out in float64: each query takes
    softmax(c·Kᵀ/√D) V of its cluster's mean c; improved: its exact softmax over that row's
    top-k keys, scaled by their mass, replaces those keys' weights."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    scale = q.shape[-1] ** -0.5
    for h in range(q.shape[1]):
        for c in labels[0, h].unique().tolist():
            members = (labels[0, h] == c).nonzero().flatten()
            row = torch.softmax(q[0, h, members].mean(0) @ k[0, h].T * scale, -1)
            weights = row.expand(len(members), -1).clone()
            if topk is not None:
                top = row.topk(topk).indices
                exact = torch.softmax(q[0, h, members] @ k[0, h, top].T * scale, -1)
                weights[:, top] = row[top].sum() * exact
            out[0, h, members] = weights @ v[0, h]
    return out


@pytest.mark.parametrize("topk", [None, 8])
def test_error_with_true_clusters_equals_the_closed_form(topk):
    spec = StructuredQueries(n=256, heads=2, dim=16, centres=12)
    q, k, v, labels = spec.sample(0)
    exact = exact_attention(q, k, v)
    got = clustered_attention_from_clusters(q, k, v, labels, spec.centres, topk=topk)
    want = _closed_form(q, k, v, labels, topk)
    assert relative_error(got, exact) == pytest.approx(relative_error(want, exact), rel=1e-6)
    assert_close(got, want.float(), rtol=1e-5)
    # without noise every query is its cluster's mean: clustered attention is exact
    q0, k0, v0, labels0 = StructuredQueries(n=256, heads=2, dim=16, noise=0.0).sample(1)
    still = clustered_attention_from_clusters(q0, k0, v0, labels0, 64, topk=topk)
    assert relative_error(still, exact_attention(q0, k0, v0)) < 1e-6


def test_clustering_finds_what_the_true_clusters_give():
    # 12 centres and 12 clusters: a k-means that merges two true clusters (the error of the
    # evenly spaced seeding it replaced) is several times worse than the true clusters
    spec = StructuredQueries(n=512, heads=4, dim=32, centres=12)
    q, k, v, labels = spec.sample(5)
    exact = exact_attention(q, k, v)
    for topk in (None, 16):
        true = relative_error(
            clustered_attention_from_clusters(q, k, v, labels, 12, topk=topk), exact
        )
        found = clustering_error(q, k, v, n_clusters=12, topk=topk, exact=exact)
        assert found <= 1.05 * true, (topk, found, true)


def test_a_seed_fixes_the_clustering_bit_for_bit():
    q, _, _, _ = StructuredQueries(n=500, heads=3, dim=16, centres=20).sample(2)
    first = cluster_queries(q, n_clusters=30, generator=_gen(7))[0]
    again = cluster_queries(q, n_clusters=30, generator=_gen(7))[0]
    assert torch.equal(first, again)
    torch.manual_seed(11)  # no generator: the default one, seeded
    a = cluster_queries(q, n_clusters=30)[0]
    torch.manual_seed(11)
    assert torch.equal(a, cluster_queries(q, n_clusters=30)[0])
    other = cluster_queries(q, n_clusters=30, generator=_gen(8))[0]
    assert not torch.equal(first, other)  # the seed does decide it


def test_structured_queries_settings_are_checked():
    with pytest.raises(ValueError, match="centres"):
        StructuredQueries(centres=0)
    with pytest.raises(ValueError, match="noise"):
        StructuredQueries(noise=float("nan"))
    with pytest.raises(ValueError, match="noise"):
        StructuredQueries(noise=-1.0)


def test_captured_qkv_are_what_the_layer_attends_with(tmp_path):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    model = TransformerLM(cfg)
    tokens = torch.randint(0, 40, (1, 50), generator=_gen())
    q, k, v = capture_qkv(model, tokens, layer=1)
    assert q.shape == k.shape == v.shape == (1, 4, 50, 8)
    attn = [m for m in model.modules() if hasattr(m, "q_proj")][1]
    outputs = []
    handle = attn.register_forward_hook(lambda _m, _a, out: outputs.append(out[0]))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(attn.o_proj(y.transpose(1, 2).reshape(1, 50, 32)), outputs[0], rtol=1e-5)
    path = save_qkv(tmp_path / "qkv.pt", q, k, v)
    for a, b in zip(load_qkv(path), (q, k, v)):
        assert torch.equal(a, b)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="not a q, k, v file"):
        load_qkv(path)
    with pytest.raises(ValueError, match="attention='softmax'"):
        linear = TransformerConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=4,
                                   max_seq_len=64, attention="linear")  # fmt: skip
        capture_qkv(TransformerLM(linear), tokens)


@pytest.mark.slow  # ptxas compile: minutes on 2 CPU cores (run by tests_latest)
@pytest.mark.ptxas
def test_seeding_kernel_does_not_spill():
    if not kernels.HAS_TRITON or not ptxas_available():
        pytest.skip("needs triton's NVIDIA backend")
    signature = {"cand_ptr": "*fp32", "ok_ptr": "*i8", "draws_ptr": "*i64",
                 "seeds_ptr": "*fp32", "near_ptr": "*i32", "m": "i32", "c": "i32",
                 "bits": "i32"}  # fmt: skip
    meta = {**kernels.SEED_META, "BB": 64, "HAS_OK": True}
    warps = meta.pop("num_warps")
    for arch in (80, 90):
        (res,) = kernel_resources(
            KernelConfig(kernels._seed_kernel, signature, meta, warps), arch=arch
        )
        assert not res.spills, res
