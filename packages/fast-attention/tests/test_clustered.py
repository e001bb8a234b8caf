"""Clustered and improved clustered attention: hashing, k-means and the attention products."""

import pytest
import torch

from verger.core.testing import assert_close
from verger.fast_attention import (
    cluster_queries,
    clustered_attention,
    clustered_attention_from_clusters,
)
from verger.fast_attention.ops.clustering import hamming_kmeans, hash_codes
from verger.fast_attention.ops.clustering.reference import (
    clustered_attention_reference,
    hamming_distance_reference,
    pack_bits,
)


def _qkv(b=2, h=2, n=40, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g) for _ in range(3))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _exact(q, k, v):
    return torch.softmax(q @ k.mT / q.shape[-1] ** 0.5, -1) @ v


@pytest.mark.parametrize("topk", [None, 5, 30])
@pytest.mark.parametrize("padded", [False, True])
def test_products_match_dense_reference(topk, padded):
    q, k, v = _qkv()
    mask = None
    if padded:
        mask = torch.zeros(2, 40, dtype=torch.bool)
        mask[1, 27:] = True
    assign, c = cluster_queries(q, n_clusters=6, key_padding_mask=mask, generator=_gen())
    out = clustered_attention_from_clusters(q, k, v, assign, c, topk=topk, key_padding_mask=mask)
    ref = clustered_attention_reference(q, k, v, assign, c, topk=topk, key_padding_mask=mask)
    assert_close(out, ref, rtol=1e-5)


def test_kmeans_assigns_nearest_centroid_by_popcount_and_centroids_are_majorities():
    x = torch.randn(3, 200, 16, generator=_gen(2))
    codes = hash_codes(x, 31, generator=_gen())
    assign, centroids = hamming_kmeans(codes, 7, 10)
    dist = hamming_distance_reference(pack_bits(codes)[..., None], pack_bits(centroids)[:, None, :])
    chosen = dist.gather(-1, assign[..., None]).squeeze(-1)
    assert torch.equal(chosen, dist.min(-1).values)
    for g in range(3):  # a Lloyd fixed point: each non-empty centroid is its members' majority
        for c in range(7):
            members = codes[g][assign[g] == c]
            if len(members):
                majority = torch.where(members.sum(0) >= 0, 1.0, -1.0)
                assert torch.equal(majority, centroids[g, c])


def test_hamming_matmul_form_equals_popcount():
    a = torch.where(torch.randn(50, 63) > 0, 1.0, -1.0)
    b = torch.where(torch.randn(9, 63) > 0, 1.0, -1.0)
    via_matmul = (63 - a @ b.T) / 2
    via_popcount = hamming_distance_reference(pack_bits(a)[:, None], pack_bits(b)[None, :])
    assert torch.equal(via_matmul.long(), via_popcount)


def test_improved_is_more_accurate_than_clustered():
    for seed in range(3):
        q, k, v = _qkv(b=1, h=4, n=128, d=16, seed=seed)
        exact = _exact(q, k, v)
        errs = {}
        for topk in (None, 16):
            out = clustered_attention(q, k, v, n_clusters=8, topk=topk, generator=_gen(seed))
            errs[topk] = float((out - exact).norm())
        assert errs[16] <= errs[None]


def test_full_topk_is_exact_softmax():
    q, k, v = _qkv(n=30)
    out = clustered_attention(q, k, v, n_clusters=4, topk=30, generator=_gen())
    assert_close(out, _exact(q, k, v), rtol=1e-5)


def test_more_clusters_than_queries_is_defined():
    q, k, v = _qkv(n=6)
    out = clustered_attention(q, k, v, n_clusters=100, topk=1000, generator=_gen())
    assert_close(out, _exact(q, k, v), rtol=1e-5)
    _, used = cluster_queries(q, n_clusters=100)
    assert used == 6
    single = clustered_attention(q[:, :, :1], k, v, n_clusters=5)  # one query: its own centroid
    assert_close(single, _exact(q[:, :, :1], k, v), rtol=1e-5)


@pytest.mark.parametrize("topk", [None, 4])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_equals_truncation(topk, side):
    """Padded positions change nothing, wherever they are: they neither seed nor join the
    k-means, and padded keys get no weight."""
    q, k, v = _qkv(b=3, n=32)
    lengths = [32, 20, 9]
    pos = torch.arange(32)[None, :]
    n_real = torch.tensor(lengths)[:, None]
    mask = pos >= n_real if side == "right" else pos < 32 - n_real
    out = clustered_attention(
        q, k, v, n_clusters=4, topk=topk, key_padding_mask=mask, generator=_gen(5)
    )
    for i, n in enumerate(lengths):
        s, real = slice(i, i + 1), slice(0, n) if side == "right" else slice(32 - n, 32)
        alone = clustered_attention(
            q[s, :, real], k[s, :, real], v[s, :, real], n_clusters=4, topk=topk,
            generator=_gen(5),
        )  # fmt: skip
        assert_close(out[s, :, real], alone, rtol=1e-5, name=f"row {i}")
        assert torch.all(out[i][:, mask[i]] == 0)


@pytest.mark.parametrize("topk", [None, 3])
def test_gradcheck_fp64(topk):
    q, k, v = (t.double().requires_grad_() for t in _qkv(b=1, h=1, n=10, d=4))
    assign, c = cluster_queries(q.detach(), n_clusters=3, generator=_gen())
    assert torch.autograd.gradcheck(
        lambda *x: clustered_attention_from_clusters(*x, assign, c, topk=topk),
        (q, k, v),
    )


def test_half_precision_inputs():
    q, k, v = (t.half() for t in _qkv())
    out = clustered_attention(q, k, v, n_clusters=4, topk=8, generator=_gen())
    ref = clustered_attention(
        q.float(), k.float(), v.float(), n_clusters=4, topk=8, generator=_gen()
    )
    assert out.dtype == torch.float16
    assert_close(out.float(), ref, rtol=1e-2)


def test_bad_arguments():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="n_clusters"):
        clustered_attention(q, k, v, n_clusters=0)
    with pytest.raises(ValueError, match="topk"):
        clustered_attention(q, k, v, n_clusters=2, topk=0)
    with pytest.raises(ValueError, match="bits"):
        clustered_attention(q, k, v, n_clusters=2, bits=0)
    with pytest.raises(ValueError, match="every key"):
        clustered_attention(
            q, k, v, n_clusters=2, key_padding_mask=torch.ones(2, 40, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="causal_clustered_attention"):
        clustered_attention(q, k, v, n_clusters=2, causal=True)
    with pytest.raises(TypeError, match="share one dtype"):
        clustered_attention(q.half(), k, v, n_clusters=2)


def test_torch_compile_matches_eager():
    q, k, v = (t.requires_grad_() for t in _qkv())

    def fn(q, k, v):  # the hash planes from a fixed generator: the same clusters in both runs
        return clustered_attention(q, k, v, n_clusters=4, topk=5, generator=_gen())

    want = fn(q, k, v)
    got = torch.compile(fn, backend="aot_eager")(q, k, v)
    assert_close(got, want, rtol=1e-6)
    grads = zip(
        torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))
    )
    for name, (a, b) in zip("qkv", grads):
        assert_close(a, b, rtol=1e-5, name=f"d{name}")


def test_a_nan_query_spoils_only_its_own_cluster():
    q, k, v = _qkv(b=1, n=37)
    q[0, 0, 3] = float("nan")
    assign, _ = cluster_queries(q, n_clusters=5, generator=_gen(1))
    out = clustered_attention(q, k, v, n_clusters=5, generator=_gen(1))
    spoiled = out.isnan().any(-1)
    assert torch.equal(spoiled[0, 0], assign[0, 0] == assign[0, 0, 3])
    assert 0 < spoiled[0, 0].sum() < 37 and not spoiled[0, 1].any()
