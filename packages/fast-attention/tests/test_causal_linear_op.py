"""The causal linear kernels (chunked torch and Triton) against the naive O(N²) spec."""

import functools

import pytest
import torch
import torch.nn.functional as F

from verger.core.bench import measure_peak_memory
from verger.core.testing import assert_close, relative_rms_error
from verger.fast_attention.ops.causal_linear import (
    causal_linear,
    causal_linear_fused,
    causal_linear_reference,
    causal_product,
    causal_product_chunked,
    causal_product_reference,
    causal_product_triton,
    chunked,
)
from verger.fast_attention.ops.causal_linear.chunked import _exclusive_cumsum
from verger.fast_attention.ops.causal_linear.triton import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _features(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(*shape, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("n", [1, 7, 64, 130, 400])  # 400 / 16: 25 chunks, scanned in groups
@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_product_matches_reference(n, chunk, reverse):
    a, b, c = _features(2, 3, n, 12)
    out = causal_product_chunked(a, b, c, reverse=reverse, chunk_size=chunk)
    assert_close(out, causal_product_reference(a, b, c, reverse=reverse), rtol=1e-5)


@pytest.mark.parametrize("n", [5, 100])
def test_causal_linear_forward_and_grads_match_reference(n):
    q, k, v = (t.requires_grad_() for t in _features(2, 3, n, 8))
    out = causal_linear(q, k, v, chunk_size=32)
    ref = causal_linear_reference(q, k, v)
    assert_close(out, ref, rtol=1e-5, name="out")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, rtol=1e-5, name=f"d{name}")


@pytest.mark.parametrize("n", [13, 70])  # 4 chunks of 4; 18 chunks, scanned in 6 groups of 3
def test_gradcheck_fp64(n):
    q, k, v = (t.double().requires_grad_() for t in _features(1, 1, n, 3))
    assert torch.autograd.gradcheck(lambda *x: causal_linear(*x, chunk_size=4), (q, k, v))
    assert torch.autograd.gradcheck(lambda *x: causal_product(*x, chunk_size=4), (q, k, v))


@pytest.mark.parametrize("block_chunks", [1, 3])
def test_chunked_scores_in_blocks_of_chunks_match_reference(monkeypatch, block_chunks):
    # long sequences form the masked scores a block of chunks at a time: force small blocks
    monkeypatch.setattr(chunked, "SCORES_BLOCK_BYTES", block_chunks * 8 * 8 * 8)  # fp64, 8x8
    q, k, v = (t.double().requires_grad_() for t in _features(2, 2, 61, 5))  # 2·2·8 chunks
    a, b, c = (t.detach() for t in (q, k, v))
    for reverse in (False, True):
        got = causal_product_chunked(a, b, c, reverse=reverse, chunk_size=8)
        assert_close(got, causal_product_reference(a, b, c, reverse=reverse), rtol=1e-12)
    for fn, ref in ((causal_linear, causal_linear_reference),
                    (causal_product, causal_product_reference)):  # fmt: skip
        out = fn(q, k, v, chunk_size=8, backend="torch")
        assert_close(out, ref(q, k, v), rtol=1e-12, name="out")
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = torch.autograd.grad(ref(q, k, v), (q, k, v), grad)
        for name, a, b in zip("qkv", got, want):
            assert_close(a, b, rtol=1e-10, name=f"d{name}")


def test_chunked_training_step_never_holds_all_masked_scores_on_cpu(monkeypatch):
    # 2·16 chunks of 128: the whole sequence's (C, C) scores would be 2 MB, five times the
    # inputs; in blocks of one chunk (64 KB) the step's peak stays well under that
    q, k, v = (t.requires_grad_() for t in _features(1, 2, 2048, 8))
    all_scores = 2 * 16 * 128 * 128 * 4

    def step():
        causal_linear(q, k, v, chunk_size=128, backend="torch").sum().backward()

    peaks = {}
    for block in (all_scores, 128 * 128 * 4):
        monkeypatch.setattr(chunked, "SCORES_BLOCK_BYTES", block)
        peaks[block] = measure_peak_memory(step, device="cpu")
    assert peaks[all_scores] > all_scores  # the measure sees the scores when they form whole
    assert peaks[128 * 128 * 4] < all_scores / 2


@pytest.mark.parametrize("chunks", [1, 2, 15, 16, 17, 18, 100, 128, 129])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunk_state_scan_is_an_exclusive_cumsum(chunks, reverse):
    # two-level (grouped) for 16+ chunks with a divisor, one loop for fewer or a prime count
    states = torch.randn(2, 3, chunks, 4, 5, dtype=torch.float64)
    exclusive = (states.flip(2).cumsum(2).flip(2) if reverse else states.cumsum(2)) - states
    assert_close(_exclusive_cumsum(states, reverse=reverse), exclusive, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    q, k, v = _features(1, 2, 300, 16, dtype=dtype)
    out = causal_linear(q, k, v, backend="torch")
    assert out.dtype == torch.float32
    assert_close(out, causal_linear_reference(q.float(), k.float(), v.float()), rtol=1e-5)


def _saved_bytes(n):
    total, biggest = 0, 0

    def pack(t):
        nonlocal total, biggest
        total += t.numel() * t.element_size()
        biggest = max(biggest, t.numel())
        return t

    q, k, v = (t.requires_grad_() for t in _features(1, 2, n, 16))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_linear(q, k, v, chunk_size=64).sum().backward()
    return total, biggest


def test_backward_memory_is_linear_in_length():
    small, _ = _saved_bytes(512)
    large, biggest = _saved_bytes(2048)
    assert large / small <= 4.05  # O(N): what autograd keeps grows with the length, no faster
    assert biggest <= 2 * 2048 * 16  # never an N×N matrix nor per-position D×D states


def test_bad_inputs_raise_clear_errors():
    q, k, v = _features(1, 2, 8, 4)
    with pytest.raises(ValueError, match="shape"):
        causal_linear(q, k[:, :, :5], v)
    with pytest.raises(ValueError, match="chunk_size"):
        causal_linear(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        causal_linear(q, k, v, backend="cuda")


@needs_triton
@pytest.mark.parametrize("n", [1, 37, 100])
def test_triton_product_matches_reference_fp32(n):
    a, b, c = _features(2, 2, n, 16)
    out = causal_product_triton(a, b, c, chunk_size=16)
    assert_close(out, causal_product_reference(a, b, c), rtol=1e-5)


def _grads_vs_reference(fn, ref_fn, q, k, v, **kwargs):
    out = fn(q, k, v, **kwargs)
    qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ref_fn(qf, kf, vf)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=ref.dtype)
    grad = grad.to(ref.device)
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    want = torch.autograd.grad(ref, (qf, kf, vf), grad)
    return out, ref, got, want


def _elu_reference(q, k, v):
    """The fused kernels' spec: causal linear attention on elu+1 features, naively."""
    return causal_linear_reference(F.elu(q) + 1, F.elu(k) + 1, v)


FORMS = {  # kernel, its spec, whether q and k are raw inputs (any sign) or features (>= 0)
    "normalized": (functools.partial(causal_linear, backend="triton"), causal_linear_reference),
    "product": (functools.partial(causal_product, backend="triton"), causal_product_reference),
    # elu+1 applied inside the kernels: with Dk padded, φ(0) = 1 must not leak into the dots
    "fused_elu": (causal_linear_fused, _elu_reference),
    # one program per batch·head looping over the chunks (head dims <= 64)
    "sequential": (functools.partial(causal_linear_fused, schedule="sequential"), _elu_reference),
}


@needs_triton
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize(
    "shape, chunk",
    [
        ((2, 3, 135, 20, 80), 32),  # 5 chunks with a ragged tail, Dk padded, Dv in 2 blocks
        ((1, 2, 70, 100, 130), 64),  # head dims > 64: blocked reductions, shorter chunks
        ((2, 2, 200, 64, 40), 64),  # the sequential schedule's widest heads, Dv padded
    ],
)
def test_triton_forward_backward_ragged_and_wide(form, shape, chunk):
    b, h, n, dk, dv = shape
    if form == "sequential" and max(dk, dv) > 64:
        with pytest.raises(ValueError, match="schedule='parallel'"):
            q, k, _ = _features(b, h, n, dk)
            causal_linear_fused(q, k, torch.rand(b, h, n, dv), schedule="sequential")
        return
    g = torch.Generator().manual_seed(1)
    make = torch.randn if form == "fused_elu" else torch.rand
    q, k = (make(b, h, n, dk, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(b, h, n, dv, generator=g).requires_grad_()
    fn, ref_fn = FORMS[form]
    out, ref, got, want = _grads_vs_reference(fn, ref_fn, q, k, v, chunk_size=chunk)
    assert out.dtype == torch.float32 and out.shape == (b, h, n, dv)
    assert_close(out, ref.float(), rtol=1e-5, name="out")
    for name, a, w in zip("qkv", got, want):
        assert_close(a, w.float(), rtol=1e-5, name=f"d{name}")


@needs_triton
@pytest.mark.parametrize("schedule", ["parallel", "sequential"])
def test_fused_half_precision_output_is_saved_with_its_rounding_residual(schedule):
    # The fused path returns fp16 outputs, but the backward's dq = Σ_j (do_i·(v_j − out_i)) k_j
    # / d_i cancels to ~1/√N of its terms' size (and more when every v_j sits near out_i): an
    # out rounded to fp16/bf16 put 3-25 % errors in dq at 32k tokens on an H200. The forward
    # keeps what the rounding lost; out + res is the fp32 output, and the backward given
    # (out, res) is the backward given the fp32 output.
    from verger.fast_attention.ops.causal_linear.library import triton_backward, triton_forward

    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 2, 96, 16, generator=g).half() for _ in range(2))
    v = (4 + 0.05 * torch.randn(1, 2, 96, 16, generator=g)).half()
    grad = torch.randn(1, 2, 96, 16, generator=g).half()
    opts = {"eps": 1e-6, "normalize": True, "chunk_size": 32, "feature_map": "elu"}
    out, d, res = triton_forward(q, k, v, out_dtype=torch.float16, schedule=schedule, **opts)
    out32, d32, none = triton_forward(q, k, v, out_dtype=torch.float32, schedule=schedule, **opts)
    assert none is None and res is not None and res.dtype == out.dtype == torch.float16
    assert torch.equal(d, d32)
    rounded_err = relative_rms_error(out.float(), out32)
    assert rounded_err > 1e-5  # fp16 spacing at 4 is 2^-8: the residual has work to do
    assert relative_rms_error(out.float() + res.float(), out32) < 1e-3 * rounded_err

    opts = {"chunk_size": 32, "feature_map": "elu", "grad_dtype": torch.float32,
            "schedule": schedule}  # fmt: skip
    want = triton_backward(q, k, v, out32, d32, grad, **opts)
    got = triton_backward(q, k, v, out, d, grad, res=res, **opts)
    rounded = triton_backward(q, k, v, out, d, grad, **opts)
    for name, a, w in zip("qkv", got, want):
        assert_close(a, w, rtol=1e-4, name=f"d{name}")
    assert relative_rms_error(rounded[0], want[0]) > 1e-2  # the error the residual removes


class _Recorded:
    """A Triton kernel whose launches are appended to ``log`` by name."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append(self.name)
            return launch(*args, **kwargs)

        return run


@needs_triton
def test_triton_training_step_is_six_launches(monkeypatch):
    # At a few thousand tokens a GPU training step is bound by the host's launch time: the
    # fused parallel path is 3 launches forward and 3 backward, and a new one shows up here.
    from verger.fast_attention.ops.causal_linear import triton as kernels

    log: list[str] = []
    for name, launcher in kernels._LAUNCH.items():
        monkeypatch.setattr(launcher, "kernel", _Recorded(launcher.kernel, name, log))
    q, k, v = (t.sub(0.5).requires_grad_() for t in _features(1, 2, 100, 16))
    out = causal_linear_fused(q, k, v)
    assert log == ["states", "scan", "forward"]
    out.backward(torch.randn_like(out))
    assert log[3:] == ["backward_states", "scan", "grads"]
    assert_close(out, _elu_reference(q, k, v), rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("form", ["normalized", "fused_elu"])
def test_triton_takes_strided_views(form):
    # Modules hand over (B, T, H, D) projections viewed as (B, H, T, D): the launchers must
    # read them (and a strided upstream gradient) as the contiguous tensors they stand for.
    g = torch.Generator().manual_seed(4)
    x = [torch.rand(2, 37, 3, 16, generator=g).requires_grad_() for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in x)
    assert not q.is_contiguous()
    fn, ref_fn = FORMS[form]
    out = fn(q, k, v, chunk_size=16)
    weights = torch.randn(2, 37, 3, 16, generator=g).transpose(1, 2)  # a strided grad
    got = torch.autograd.grad((out * weights).sum(), x)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    ref = ref_fn(qc, kc, vc)
    want = torch.autograd.grad((ref * weights).sum(), (qc, kc, vc))
    assert_close(out, ref, rtol=1e-5, name="out")
    for name, a, b in zip("qkv", got, want):
        assert_close(a.transpose(1, 2), b, rtol=1e-5, name=f"d{name}")


@needs_triton
def test_triton_fp16_long_sequence_gradients_survive_the_cancellation():
    # The inter-chunk terms of dq and dk grow with N and cancel to ~sqrt(N): the kernels must
    # form them from fp32 states (16 chunks here), not from 16-bit operands.
    q, k, v = (t.half().requires_grad_() for t in _features(1, 2, 1024, 16, seed=5))
    out, ref, got, want = _grads_vs_reference(
        causal_linear, causal_linear_reference, q, k, v, backend="triton", chunk_size=64
    )
    assert_close(out, ref.float(), rtol=2e-3, name="out")
    for name, a, w in zip("qkv", got, want):
        assert a.dtype == torch.float16
        assert_close(a.float(), w.float(), rtol=1e-2, name=f"d{name}")


@needs_triton
def test_triton_fp16_state_stays_fp32_past_fp16_range():
    # Chunk states reach ~1e5 > fp16 max (65504): they must not be cast to fp16.
    a, b, c = (60 * t for t in _features(1, 1, 160, 16, dtype=torch.float32))
    a, b, c = (t.half() for t in (a, b, c))
    out = causal_product_triton(a, b, c, chunk_size=16)
    assert torch.isfinite(out).all()
    assert_close(out, causal_product_reference(a, b, c), rtol=2e-3, name="out")


@needs_triton
def test_triton_rejects_unknown_precision_dtype_and_feature_map(monkeypatch):
    a, b, c = _features(1, 1, 8, 16)
    with pytest.raises(ValueError, match="precision"):
        causal_product_triton(a, b, c, precision="fp64")
    with pytest.raises(TypeError, match="float64"):
        causal_linear(a.double(), b.double(), c.double(), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        causal_linear_fused(a.double(), b.double(), c.double())
    with pytest.raises(ValueError, match="favor"):
        causal_linear_fused(a, b, c, feature_map="favor")
    with pytest.raises(ValueError, match="schedule"):
        causal_linear_fused(a, b, c, schedule="serial")
    with pytest.raises(ValueError, match="backend"):
        causal_linear_fused(a, b, c, backend="cuda")
    with pytest.raises(ValueError, match="Triton schedule"):
        causal_linear_fused(a, b, c, backend="torch", schedule="sequential")
    from verger.fast_attention.ops.causal_linear import triton_sequential

    monkeypatch.setattr(triton_sequential, "_device_arch", lambda device: 80)  # an A100
    with pytest.raises(ValueError, match="sm_90"):
        causal_linear_fused(a, b, c, schedule="sequential")


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("form", ["normalized", "fused_elu", "sequential"])
def test_triton_causal_linear_forward_backward(dtype, tol, form):
    q, k, v = (t.requires_grad_() for t in _features(2, 2, 45, 16, dtype=dtype))
    if form != "normalized":  # raw inputs of either sign
        q, k = (t.detach().sub(0.5).mul(4).requires_grad_() for t in (q, k))
    fn, ref_fn = FORMS[form]
    out, ref, got, want = _grads_vs_reference(fn, ref_fn, q, k, v, chunk_size=16)
    # the fused path returns the inputs' dtype; on features, fp32
    assert out.dtype == (torch.float32 if form == "normalized" else dtype)
    assert_close(out.float(), ref.float(), rtol=tol, name="out")
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype
        assert_close(a.float(), b.float(), rtol=tol, name=f"d{name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_on_gpu_all_dtypes(dtype):
    q, k, v = (t.cuda().requires_grad_() for t in _features(2, 4, 1000, 64, dtype=dtype))
    out, ref, got, want = _grads_vs_reference(  # auto -> triton on CUDA
        causal_linear, causal_linear_reference, q, k, v
    )
    assert_close(out, ref.float(), rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, name="out")
    for name, a, b in zip("qkv", got, want):
        assert_close(a.float(), b.float(), rtol=2e-2, name=f"d{name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [False, True, "sequential"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, dim", [(32768, 64), (4096, 128), (2000, 256)])
def test_triton_on_gpu_long_sequences_and_wide_heads(dtype, n, dim, fused):
    # Against the chunked torch path in fp64 on the same GPU: at 32k tokens the inter-chunk dq/dk
    # terms cancel to ~1/180 of their size, the case that needs fp32 states and 3xTF32.
    # ``fused``: raw q, k through linear_attention's path (elu+1 inside the kernels), with the
    # chunk-parallel or (head dims <= 64) the sequential schedule.
    if fused == "sequential" and dim > 64:
        pytest.skip("the sequential schedule runs head dims <= 64")
    q, k, v = (t.cuda() for t in _features(1, 4, n, dim, seed=7))
    fn, ref_fn = causal_linear, functools.partial(causal_linear, backend="torch")
    if fused:
        q, k = (4 * t - 2 for t in (q, k))
        fn = functools.partial(
            causal_linear_fused, schedule="sequential" if fused == "sequential" else "parallel"
        )
        ref_fn = lambda a, b, c: causal_linear(F.elu(a) + 1, F.elu(b) + 1, c, backend="torch")  # noqa: E731
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, ref, got, want = _grads_vs_reference(fn, ref_fn, q, k, v)
    assert out.dtype == (dtype if fused else torch.float32)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close(out.float(), ref.float(), rtol=tol, name="out")
    for name, a, b in zip("qkv", got, want):
        assert_close(a.float(), b.float(), rtol=3e-2, name=f"d{name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_direct_launches_compile_again_for_misaligned_inputs():
    # After a kernel's first launch the Launchers skip Triton's binding and reuse the compiled
    # kernel for the same specialization; a contiguous input 2 bytes past a 16-byte boundary
    # is another one (aligned loads are vectorized), so it must not reuse the aligned kernel.
    def misaligned(t):
        buf = torch.empty(t.numel() + 1, device="cuda", dtype=t.dtype)[1:].view(t.shape)
        return buf.copy_(t).requires_grad_()

    q, k, v = (t.cuda().half() for t in _features(1, 4, 1000, 64, seed=2))
    q, k = 4 * q - 2, 4 * k - 2
    grad = torch.randn(1, 4, 1000, 64, device="cuda", dtype=torch.half)
    results = []
    for make in (lambda t: t.clone().requires_grad_(),) * 2 + (misaligned,) * 2:
        inputs = [make(t) for t in (q, k, v)]
        out = causal_linear_fused(*inputs)
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    assert results[2][0].data_ptr() % 16 == 0  # outputs are fresh (aligned) allocations
    for got in results[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, results[0]):
            assert_close(a.float(), b.float(), rtol=1e-3, name=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_matches_flash_linear_attention_if_installed():
    fla = pytest.importorskip("fla.ops.linear_attn")
    q, k, v = (t.cuda().half() for t in _features(1, 4, 2048, 64))
    ours = causal_product(q, k, v)
    theirs = fla.chunk_linear_attn(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0, normalize=False
    )[0].transpose(1, 2)
    assert_close(ours, theirs.float(), rtol=5e-3)


def test_auto_backend_picks_triton_on_cuda_only_for_inputs_it_tiles():
    from verger.fast_attention.ops.causal_linear import resolve_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", cuda, 64) == ("triton" if HAS_TRITON else "torch")
    assert resolve_backend("auto", cuda, 300) == "torch"  # e.g. 300 clusters as features
    assert resolve_backend("auto", cpu, 64) == "torch"
    assert resolve_backend("triton", cpu, 300) == "triton"  # explicit choices are kept
    assert resolve_backend("auto", cuda, 64, 70000) == "torch"  # batch*heads > grid axis
    # float64 (gradcheck on a GPU) takes the torch path instead of Triton's TypeError
    assert resolve_backend("auto", cuda, 64, 8, torch.float64) == "torch"


@needs_triton
def test_triton_rejects_batch_heads_beyond_the_grid_limit():
    q = torch.rand(70000, 1, 2, 4)
    with pytest.raises(ValueError, match="batch\\*heads"):
        causal_product_triton(q, q, q)
