"""gathered_attention (improved clustered's exact top-k product): Triton vs the torch spec."""

import functools

import pytest
import torch

from verger.core.testing import assert_close
from verger.fast_attention import clustered as clustered_module
from verger.fast_attention.causal_clustered import causal_clustered_attention
from verger.fast_attention.clustered import clustered_attention
from verger.fast_attention.ops.gathered_attention import (
    gathered_attention,
    gathered_attention_reference,
)
from verger.fast_attention.ops.gathered_attention.triton import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _inputs(blocks, width, dim, dim_v, rows, keys, *, masked, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(blocks, width, dim, generator=g).to(dtype).requires_grad_()
    k = torch.randn(rows, dim, generator=g).to(dtype).requires_grad_()
    v = torch.randn(rows, dim_v, generator=g).to(dtype).requires_grad_()
    # distinct keys within a block, shared across blocks (the backward adds with atomics)
    key_rows = torch.stack([torch.randperm(rows, generator=g)[:keys] for _ in range(blocks)])
    ok = None
    if masked:
        ok = torch.rand(blocks, keys, generator=g) > 0.3
        ok[:, 0] = True
        ok[-1] = False  # a block that may see nothing: zeros, not NaN
    return q, k, v, key_rows, ok


def _vs_reference(q, k, v, key_rows, ok, scale=0.3, **positions):
    out = gathered_attention(q, k, v, key_rows, ok, scale=scale, backend="triton", **positions)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = gathered_attention_reference(*ref_in, key_rows, ok, scale, *positions.values())
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9), dtype=ref.dtype)
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    want = torch.autograd.grad(ref, ref_in, grad)
    return out, ref, got, want


@needs_triton
@pytest.mark.parametrize(
    "blocks, width, dim, dim_v, rows, keys, masked",
    [
        (5, 7, 16, 24, 40, 9, False),  # ragged everything, one key block
        (4, 64, 64, 64, 300, 70, True),  # three key blocks (32 + 32 + 6), masks
        (3, 20, 100, 70, 50, 40, True),  # head dims that are not powers of two
        (6, 1, 32, 32, 12, 12, True),  # blocks of one query (the causal top-k form)
    ],
)
def test_triton_matches_reference_outputs_and_gradients(
    blocks, width, dim, dim_v, rows, keys, masked
):
    q, k, v, key_rows, ok = _inputs(blocks, width, dim, dim_v, rows, keys, masked=masked)
    out, ref, got, want = _vs_reference(q, k, v, key_rows, ok)
    assert torch.isfinite(out).all()
    assert_close(out, ref.float(), rtol=1e-5, name="out")
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all()
        assert_close(a, b.float(), rtol=1e-5, name=f"d{name}")
    if masked:
        assert out[-1].abs().max() == 0  # the fully masked block


@needs_triton
@pytest.mark.parametrize("masked", [False, True])
def test_triton_causal_positions_match_reference(masked):
    # Row w may use key j only if key_pos <= query_pos; some rows see no key at all (zeros).
    q, k, v, key_rows, ok = _inputs(4, 24, 16, 16, 90, 45, masked=masked, seed=3)
    g = torch.Generator().manual_seed(4)
    query_pos = torch.randint(-1, 90, (4, 24), generator=g)
    key_pos = key_rows.clone()  # keys sit at their row index in the sequence
    out, ref, got, want = _vs_reference(q, k, v, key_rows, ok, query_pos=query_pos, key_pos=key_pos)
    sees_nothing = ~(key_pos[:, None, :] <= query_pos[:, :, None]).any(-1)
    assert sees_nothing.any() and out[sees_nothing].abs().max() == 0
    assert_close(out, ref.float(), rtol=1e-5, name="out")
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b.float(), rtol=1e-5, name=f"d{name}")


@needs_triton
def test_triton_fp16_accumulates_in_fp32():
    q, k, v, key_rows, ok = _inputs(3, 16, 32, 32, 64, 40, masked=True, dtype=torch.float16)
    out, ref, got, want = _vs_reference(q, k, v, key_rows, ok)
    assert out.dtype == torch.float16
    assert_close(out.float(), ref.float(), rtol=3e-3, name="out")
    for name, a, b in zip("qkv", got, want):
        assert_close(a.float(), b.float(), rtol=1e-2, name=f"d{name}")


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_improved_clustered_attention_is_the_same_through_the_triton_products(monkeypatch, causal):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 90, 16, generator=g).requires_grad_() for _ in range(3))
    mask = torch.zeros(2, 90, dtype=torch.bool)
    mask[1, 70:] = True

    centroids = torch.randn(2, 6, 16, generator=g)

    def run(backend="torch"):
        if causal:  # the Triton form: (chunk, cluster) blocks over top-k and chunk keys
            out = causal_clustered_attention(
                q, k, v, centroids, topk=20, chunk_size=16, key_padding_mask=mask,
                backend=backend,
            )  # fmt: skip
        else:
            out = clustered_attention(
                q, k, v, n_clusters=6, topk=20, key_padding_mask=mask,
                generator=torch.Generator().manual_seed(3),
            )  # fmt: skip
        return out, torch.autograd.grad(out.square().sum(), (q, k, v))

    want, want_grads = run()
    forced = functools.partial(gathered_attention, backend="triton")
    monkeypatch.setattr(clustered_module, "gathered_attention", forced)
    got, got_grads = run(backend="triton")
    assert_close(got, want, rtol=1e-5, name="out")
    for name, a, b in zip("qkv", got_grads, want_grads):
        assert_close(a, b, rtol=1e-5, name=f"d{name}")


def test_bad_inputs_raise_clear_errors():
    q, k, v, key_rows, _ = _inputs(2, 4, 8, 8, 10, 3, masked=False)
    with pytest.raises(ValueError, match="backend"):
        gathered_attention(q, k, v, key_rows, scale=1.0, backend="cuda")
    with pytest.raises(ValueError, match="expected q"):
        gathered_attention(q[0], k, v, key_rows, scale=1.0)
    with pytest.raises(ValueError, match="do not match"):
        gathered_attention(q, k[:, :4], v, key_rows, scale=1.0)
    with pytest.raises(ValueError, match="key_ok"):
        gathered_attention(q, k, v, key_rows, key_rows[:, :2] > 0, scale=1.0)
    with pytest.raises(ValueError, match="both query_pos and key_pos"):
        gathered_attention(q, k, v, key_rows, scale=1.0, query_pos=key_rows[:, :1])
    with pytest.raises(ValueError, match="query_pos"):
        gathered_attention(q, k, v, key_rows, scale=1.0, query_pos=key_rows, key_pos=key_rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True])
def test_clustered_products_and_kmeans_on_gpu_match_cpu(causal):
    from verger.fast_attention.clustered import cluster_queries, clustered_attention_from_clusters
    from verger.fast_attention.ops.clustering import hamming_kmeans, hash_codes

    g = torch.Generator().manual_seed(4)
    cpu = [torch.randn(2, 4, 3000, 64, generator=g).requires_grad_() for _ in range(3)]
    gpu = [t.detach().cuda().requires_grad_() for t in cpu]
    # the Triton assignment kernel: the same clusters as torch for the same codes
    codes = hash_codes(cpu[0].detach().reshape(8, 3000, 64), 63, generator=g)
    want_assign, want_centroids = hamming_kmeans(codes, 50, 10, backend="torch")
    got_assign, got_centroids = hamming_kmeans(codes.cuda(), 50, 10, backend="triton")
    assert torch.equal(got_assign.cpu(), want_assign)
    assert torch.equal(got_centroids.cpu(), want_centroids)
    # the gathered top-k products, for fixed clusters
    assign, clusters = cluster_queries(cpu[0].detach(), n_clusters=50, generator=g)
    results = []
    centroids = torch.randn(4, 50, 64, generator=g)
    for (q, k, v), a in ((cpu, assign), (gpu, assign.cuda())):
        if causal:  # the causal form's blocks: (chunk, cluster) groups with a position mask
            out = causal_clustered_attention(q, k, v, centroids.to(q.device), topk=32)
        else:
            out = clustered_attention_from_clusters(q, k, v, a, clusters, topk=32)
        results.append((out, torch.autograd.grad(out.square().sum(), (q, k, v))))
    (want, want_grads), (got, got_grads) = results
    assert_close(got.cpu(), want, rtol=1e-4, name="out")
    for name, a, b in zip("qkv", got_grads, want_grads):
        assert_close(a.cpu(), b, rtol=1e-3, name=f"d{name}")
