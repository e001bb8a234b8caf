"""linear_attention and linear_attention_step against the paper's formulas."""

import pytest
import torch
import torch.nn.functional as F

from verger.core.testing import assert_close
from verger.fast_attention import (
    FavorFeatureMap,
    LinearAttentionState,
    linear_attention,
    linear_attention_step,
)
from verger.fast_attention.ops.causal_linear import (
    causal_linear,
    causal_linear_fused,
    causal_product,
)


def _qkv(b=2, h=3, n=33, d=8, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dv = dv or d
    return (
        torch.randn(b, h, n, d, generator=g).to(dtype),
        torch.randn(b, h, n, d, generator=g).to(dtype),
        torch.randn(b, h, n, dv, generator=g).to(dtype),
    )


def naive(q, k, v, causal, phi=lambda x: F.elu(x) + 1, eps=1e-6):
    """V'_i = Σ_j φ(q_i)·φ(k_j) v_j / (Σ_j φ(q_i)·φ(k_j) + eps), j ≤ i when causal."""
    sim = phi(q.double()) @ phi(k.double()).mT
    if causal:
        sim = sim.tril()
    return (sim @ v.double()) / (sim.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 33, 200])
def test_matches_naive_formula(causal, n):
    q, k, v = _qkv(n=n, dv=5)
    assert_close(linear_attention(q, k, v, causal=causal), naive(q, k, v, causal), rtol=1e-5)


def test_cross_attention_lengths():
    q, _, _ = _qkv(n=7)
    _, k, v = _qkv(n=19, seed=1)
    assert_close(linear_attention(q, k, v), naive(q, k, v, False), rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_fp64(causal):
    q, k, v = (t.double().requires_grad_() for t in _qkv(b=1, h=2, n=13, d=4))
    assert torch.autograd.gradcheck(
        lambda *x: linear_attention(*x, causal=causal, chunk_size=4), (q, k, v)
    )


@pytest.mark.parametrize("feature_map", ["elu", "favor"])
def test_recurrent_steps_equal_causal_batch(feature_map):
    q, k, v = _qkv(n=40)
    fm = FavorFeatureMap(8, 32, seed=3) if feature_map == "favor" else "elu"
    full = linear_attention(q, k, v, causal=True, feature_map=fm)
    state = None
    for t in range(q.shape[2]):
        out, state = linear_attention_step(
            q[:, :, t], k[:, :, t], v[:, :, t], state, feature_map=fm
        )
        assert_close(out, full[:, :, t], rtol=1e-5, name=f"step {t}")
    assert state.steps == 40
    f = 32 if feature_map == "favor" else 8
    assert state.nbytes() == (2 * 3 * f * 8 + 2 * 3 * f) * 4  # constant, whatever the length


def test_prompt_state_then_steps():
    q, k, v = _qkv(n=30)
    full = linear_attention(q, k, v, causal=True)
    prefix, state = linear_attention(
        q[:, :, :20], k[:, :, :20], v[:, :, :20], causal=True, return_state=True
    )
    assert isinstance(state, LinearAttentionState)
    assert_close(prefix, full[:, :, :20], rtol=1e-5)
    for t in range(20, 30):
        out, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        assert_close(out, full[:, :, t], rtol=1e-5)


def test_triton_path_fuses_the_feature_map_and_matches_the_formula():
    # backend="triton" on CPU runs the interpreter: the elu map is applied inside the kernels.
    q, k, v = (t.requires_grad_() for t in _qkv(n=70, d=8, dv=6))
    fused = linear_attention(q, k, v, causal=True, backend="triton", chunk_size=16)
    assert fused.grad_fn is not None and "CausalLinear" in type(fused.grad_fn).__name__
    assert_close(fused, naive(q, k, v, True), rtol=1e-5)
    ref = linear_attention(q, k, v, causal=True, backend="torch")
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(fused, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, rtol=1e-5, name=f"d{name}")
    # the prompt state of the fused path continues exactly as the batch form
    full = linear_attention(q, k, v, causal=True, backend="torch")
    _, state = linear_attention(
        q[:, :, :50], k[:, :, :50], v[:, :, :50], causal=True, return_state=True,
        backend="triton",
    )  # fmt: skip
    out, _ = linear_attention_step(q[:, :, 50], k[:, :, 50], v[:, :, 50], state)
    assert_close(out, full[:, :, 50], rtol=1e-5)
    # 16-bit prompts keep an fp32 state (fp16 sums would overflow on long prompts)
    half = [t.detach().half() for t in (q, k, v)]
    _, state = linear_attention(*half, causal=True, return_state=True, backend="triton")
    assert state.s.dtype == state.z.dtype == torch.float32


def test_torch_path_maps_inside_its_node_and_keeps_raw_q_k_for_the_backward():
    # 300 positions: the last chunk of 128 is padded, so φ' multiplies a merged view in place
    q, k, v = (t.double().requires_grad_() for t in _qkv(b=1, h=2, n=300, d=8, dv=5))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = linear_attention(q, k, v, causal=True, backend="torch")
    assert "CausalLinear" in type(out.grad_fn).__name__  # one node: no separate feature map
    large = [t for t in saved if t.shape[-2:] in (q.shape[-2:], v.shape[-2:])]
    assert {t.data_ptr() for t in large} == {t.data_ptr() for t in (q, k, v, out)}
    assert_close(out, naive(q, k, v, True), rtol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(naive(q, k, v, True), (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, rtol=1e-9, name=f"d{name}")
    # 16-bit inputs: output and gradients in their dtype, fp32 inside
    half = [t.detach().half().requires_grad_() for t in (q, k, v)]
    out = linear_attention(*half, causal=True, backend="torch")
    assert out.dtype == torch.float16
    got = torch.autograd.grad(out, half, grad.half())
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.float16
        assert_close(a.double(), b, rtol=2e-2, name=f"d{name} fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_path_on_gpu_matches_the_formula():
    # the GPU fallback (backend="torch"): one block of masked scores, the scan, the map in one pass
    q, k, v = (t.double().cuda().requires_grad_() for t in _qkv(b=2, h=4, n=3000, d=32))
    out = linear_attention(q, k, v, causal=True, backend="torch")
    ref = naive(q, k, v, True)
    assert_close(out, ref, rtol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, rtol=1e-9, name=f"d{name}")


@pytest.mark.parametrize("causal", [False, True])
def test_ragged_lengths_with_padding_mask(causal):
    q, k, v = _qkv(b=3, n=24)
    lengths = [24, 17, 5]
    mask = torch.arange(24)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding
    out = linear_attention(q, k, v, causal=causal, key_padding_mask=mask)
    for i, n in enumerate(lengths):
        alone = linear_attention(
            q[i : i + 1, :, :n], k[i : i + 1, :, :n], v[i : i + 1, :, :n], causal=causal
        )
        assert_close(out[i : i + 1, :, :n], alone, rtol=1e-5, name=f"row {i}")
        assert torch.all(out[i, :, n:] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_inputs_return_half_close_to_fp32(dtype, causal):
    q, k, v = _qkv(n=64, dtype=dtype)
    out = linear_attention(q, k, v, causal=causal)
    assert out.dtype == dtype
    ref = naive(q.float(), k.float(), v.float(), causal)
    assert_close(out.float(), ref.float(), rtol=1e-2)


def test_bad_arguments():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="batch, heads, seq, dim"):
        linear_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, k, v, feature_map="relu6")
    with pytest.raises(TypeError, match="key_padding_mask"):
        linear_attention(q, k, v, key_padding_mask=torch.zeros(2, 33))
    with pytest.raises(ValueError, match="key_padding_mask"):
        linear_attention(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal"):
        linear_attention(q, k[:, :, :5], v[:, :, :5], causal=True)
    with pytest.raises(ValueError, match="return_state"):
        linear_attention(q, k, v, return_state=True)
    with pytest.raises(TypeError, match="dtype"):
        linear_attention(q.long(), k, v)
    with pytest.raises(ValueError, match="q_t"):
        linear_attention_step(q, k, v)
    with pytest.raises(TypeError, match="share one dtype"):
        linear_attention(q.half(), k, v)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            linear_attention(q, k, v, eps=eps)


def test_a_mistyped_keyword_is_an_error_not_a_feature_map_option():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="casual"):  # the default map takes no options
        linear_attention(q, k, v, casual=True)
    with pytest.raises(TypeError, match="casual"):  # nor does an instance (it is built)
        linear_attention(q, k, v, feature_map=FavorFeatureMap(8, seed=0), casual=True)
    with pytest.raises(TypeError, match="n_feature"):
        linear_attention(q, k, v, feature_map="favor", n_feature=16)
    out = linear_attention(q, k, v, feature_map="favor", n_features=16, seed=2)
    ref = linear_attention(q, k, v, feature_map=FavorFeatureMap(8, 16, seed=2))
    assert_close(out, ref, rtol=1e-6)  # real options still reach the map


def test_step_rejects_what_the_batch_form_rejects():
    q, k, v = (t[:, :, 0] for t in _qkv())
    _, state = linear_attention_step(q, k, v)
    with pytest.raises(TypeError, match="dtype"):
        linear_attention_step(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="share one dtype"):
        linear_attention_step(q, k, v.double())
    with pytest.raises(ValueError, match="eps"):
        linear_attention_step(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="expected s"):  # a state for another value size
        linear_attention_step(q, k, v[..., :5], state)
    with pytest.raises(TypeError, match="float64"):  # a state of another compute dtype
        linear_attention_step(q, k, v, LinearAttentionState(state.s.double(), state.z.double()))
    with pytest.raises(TypeError, match="LinearAttentionState"):
        linear_attention_step(q, k, v, (state.s, state.z))


def test_random_map_by_name_is_refused_where_a_state_must_match_later_steps():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="instance"):
        linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], feature_map="favor")
    with pytest.raises(ValueError, match="instance"):
        linear_attention(q, k, v, causal=True, feature_map="favor", return_state=True)


@pytest.mark.parametrize("causal", [False, True])
def test_empty_sequence_gives_an_empty_output_and_state(causal):
    q, k, v = (t[:, :, :0].requires_grad_() for t in _qkv(dv=5))
    out = linear_attention(q, k, v, causal=causal)
    assert out.shape == (2, 3, 0, 5) and out.dtype == v.dtype
    out.sum().backward()  # still part of the graph
    if causal:
        _, state = linear_attention(q, k, v, causal=True, return_state=True)
        assert state.steps == 0 and not state.s.any() and state.s.shape == (2, 3, 8, 5)
    for fn in (causal_linear, causal_product):
        assert fn(q.detach(), k.detach(), v.detach()).shape == (2, 3, 0, 5)


def test_double_backward_is_refused_clearly():
    q, k, v = (t.double().requires_grad_() for t in _qkv(n=9))
    out = linear_attention(q, k, v, causal=True)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gq.sum().backward()


def test_explicit_triton_backend_off_cuda_says_what_it_needs(monkeypatch):
    import verger.core.kernels._common as common
    from verger.core.kernels import TritonUnavailableError

    monkeypatch.setattr(common, "interpreter_on", lambda: False)
    q, k, v = _qkv()
    with pytest.raises(TritonUnavailableError, match="CUDA tensors"):
        linear_attention(q, k, v, causal=True, backend="triton")
    with pytest.raises(TritonUnavailableError, match="CUDA tensors"):
        causal_linear_fused(q, k, v)


def test_core_use_backend_reaches_this_packages_ops(monkeypatch):
    # one dispatch for every member (issue 20): core's use_backend("triton") redirects "auto"
    # here too, so without the interpreter it is refused like an explicit backend="triton"
    import verger.core.kernels._common as common
    from verger.core.kernels import TritonUnavailableError, use_backend

    monkeypatch.setattr(common, "interpreter_on", lambda: False)
    q, k, v = _qkv()
    linear_attention(q, k, v, causal=True)  # auto on CPU: the torch path
    with use_backend("triton"), pytest.raises(TritonUnavailableError, match="CUDA tensors"):
        linear_attention(q, k, v, causal=True)


@pytest.mark.parametrize("backend, feature_map", [("torch", "elu"), ("triton", "elu"),
                                                  ("triton", "favor"), ("sequential", "elu")])  # fmt: skip
def test_torch_compile_traces_every_path_in_one_graph(backend, feature_map):
    # fullgraph: no graph break, also through the Triton launchers (custom ops when compiling;
    # "elu" is the fused path, "favor" feeds precomputed features, "sequential" the fused
    # path's other schedule)
    torch._dynamo.reset()
    fm = FavorFeatureMap(8, 16, seed=0) if feature_map == "favor" else "elu"
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=2, n=40, d=8))

    def fn(q, k, v):
        if backend == "sequential":
            return causal_linear_fused(q, k, v, schedule="sequential")
        return linear_attention(q, k, v, causal=True, backend=backend, feature_map=fm)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v)
    want = fn(q, k, v)
    assert_close(got, want, rtol=1e-5)
    grad = torch.randn_like(want)
    for name, a, b in zip("qkv", torch.autograd.grad(got, (q, k, v), grad),
                          torch.autograd.grad(want, (q, k, v), grad)):  # fmt: skip
        assert_close(a, b, rtol=1e-5, name=f"d{name}")


def test_inplace_step_equals_functional_step():
    q, k, v = _qkv(n=5)
    _, state = linear_attention(q, k, v, causal=True, return_state=True)
    copy = LinearAttentionState(s=state.s.clone(), z=state.z.clone(), steps=state.steps)
    want, new = linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state)
    got, same = linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], copy, inplace=True)
    assert same is copy and same.steps == new.steps == 6
    assert_close(got, want, rtol=1e-6)
    assert_close(same.s, new.s, rtol=1e-6)
