"""Chunked linear + cross-entropy vs F.cross_entropy(x @ W.T): values, gradients, memory."""

import pytest
import torch
import torch.nn.functional as F

from verger.core.bench import measure_peak_memory
from verger.core.kernels import linear_cross_entropy, linear_cross_entropy_reference
from verger.core.testing import assert_close, requires_triton

RTOL = {torch.float32: 1e-5, torch.float16: 3e-3}
BACKENDS = [pytest.param("triton", marks=requires_triton), "torch"]


def _run(fn, x, w, dy):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(x, w)
    loss.backward(dy)
    return loss, x.grad, w.grad


def _case(n, d, v, dtype, seed, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return x, w, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_with_ragged_chunks(backend, dtype, reduction):
    # 37 tokens in chunks of 8 (last chunk ragged), vocab 61 (not a block multiple), ignored rows
    x, w, t = _case(37, 24, 61, dtype, seed=0, ignore_every=5)
    dy = torch.randn(37) if reduction == "none" else torch.tensor(1.7)

    def fused(a, b):
        return linear_cross_entropy(a, b, t, chunk_size=8, reduction=reduction, backend=backend)

    def ref(a, b):
        return linear_cross_entropy_reference(a, b, t, reduction=reduction)

    loss, dx, dw = _run(fused, x, w, dy.to(torch.float32))
    rloss, rdx, rdw = _run(ref, x.float(), w.float(), dy)
    assert loss.dtype == torch.float32
    assert_close(loss, rloss, rtol=RTOL[dtype], name="loss")
    assert dx.dtype == dtype and dw.dtype == dtype
    assert_close(dx.float(), rdx, rtol=RTOL[dtype], name="dx")
    assert_close(dw.float(), rdw, rtol=RTOL[dtype], name="dweight")
    if reduction == "none":
        assert torch.all(loss[t == -100] == 0)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_vocab_spanning_several_blocks(dtype):
    # vocab 4100 > the kernel's 4096-wide block: exercises the online logsumexp across blocks
    x, w, t = _case(5, 16, 4100, dtype, seed=1)
    x = x * 4  # peaked softmax: a wrong running max would overflow or bias the result
    dy = torch.tensor(1.0)
    got = _run(lambda a, b: linear_cross_entropy(a, b, t, backend="triton"), x, w, dy)
    ref = _run(lambda a, b: linear_cross_entropy_reference(a, b, t), x.float(), w.float(), dy)
    for name, a, b in zip(("loss", "dx", "dweight"), got, ref):
        assert_close(a.float(), b, rtol=RTOL[dtype], name=name)


@pytest.mark.slow
@requires_triton
def test_triton_at_gpt2_vocab_with_ragged_rows():
    x, w, t = _case(67, 32, 50257, torch.float32, seed=8, ignore_every=9)
    dy = torch.tensor(1.0)
    got = _run(
        lambda a, b: linear_cross_entropy(a, b, t, chunk_size=16, backend="triton"), x, w, dy
    )
    ref = _run(lambda a, b: linear_cross_entropy_reference(a, b, t), x, w, dy)
    for name, a, b in zip(("loss", "dx", "dweight"), got, ref):
        assert_close(a, b, rtol=1e-5, name=name)


def test_leading_dims_and_chunk_size_do_not_change_the_result():
    x, w, t = _case(24, 8, 13, torch.float32, seed=2)
    whole = linear_cross_entropy(x, w, t, chunk_size=24)
    for chunk in (1, 5, 7, 100):
        assert_close(linear_cross_entropy(x, w, t, chunk_size=chunk), whole, rtol=1e-6)
    per_token = linear_cross_entropy(x.view(4, 6, 8), w, t.view(4, 6), reduction="none")
    assert per_token.shape == (4, 6)
    assert_close(per_token.mean(), whole, rtol=1e-6, name="mean of none")


def test_all_ignored_is_nan_like_torch_and_no_grad_path():
    x, w, _ = _case(4, 8, 13, torch.float32, seed=3)
    t = torch.full((4,), -100)
    assert torch.isnan(linear_cross_entropy(x, w, t)) == torch.isnan(F.cross_entropy(x @ w.T, t))
    with torch.no_grad():  # forward only: no gradient buffers, same value
        x2, w2, t2 = _case(9, 8, 13, torch.float32, seed=4)
        assert_close(
            linear_cross_entropy(x2, w2, t2, chunk_size=4),
            linear_cross_entropy_reference(x2, w2, t2),
            rtol=1e-6,
        )


def test_gradient_reaches_only_the_inputs_that_need_it():
    x, w, t = _case(10, 8, 13, torch.float32, seed=5)
    w.requires_grad_(True)  # frozen input x
    linear_cross_entropy(x, w, t, chunk_size=3).backward()
    ref_w = w.detach().clone().requires_grad_(True)
    linear_cross_entropy_reference(x, ref_w, t).backward()
    assert_close(w.grad, ref_w.grad, rtol=1e-5, name="dweight")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_does_not_lower_the_precision(reduction):
    x, w, t = _case(19, 16, 29, torch.float32, seed=7)
    dy = torch.tensor(1.0) if reduction == "mean" else torch.randn(19)

    def fused(a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(a, b, t, chunk_size=4, reduction=reduction)

    got = _run(fused, x, w, dy)
    ref = _run(lambda a, b: linear_cross_entropy_reference(a, b, t, reduction=reduction), x, w, dy)
    for name, a, b in zip(("loss", "dx", "dweight"), got, ref):
        assert_close(a, b, rtol=1e-5, name=name)


def test_peak_memory_far_below_materialized_logits_at_50k_vocab():
    torch.manual_seed(6)
    n, d, v = 512, 32, 50257
    x = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) * 0.02).requires_grad_(True)
    t = torch.randint(0, v, (n,))

    def naive():
        F.cross_entropy(x @ w.T, t).backward()

    def fused():
        linear_cross_entropy(x, w, t, chunk_size=64).backward()

    peak_naive = measure_peak_memory(naive, device="cpu")
    peak_fused = measure_peak_memory(fused, device="cpu")
    logits_bytes = n * v * 4
    assert peak_naive >= 2 * logits_bytes  # logits and their gradient are both alive
    # the fused peak is the fp32 weight gradient plus a few 64-row logits chunks
    assert peak_fused < 0.25 * peak_naive, (peak_fused, peak_naive)
    assert peak_fused < 2 * v * d * 4 + 3 * 64 * v * 4
