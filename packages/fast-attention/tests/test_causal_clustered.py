"""Causal clustered attention: the chunked form vs a per-query spec, causality, recurrence,
gradients, and the learned centroids of ``ClusteredAttention(causal=True)``."""

import copy

import pytest
import torch
import torch.nn.functional as F

from verger.core.nn import TransformerLM
from verger.core.testing import assert_close, tiny_config
from verger.fast_attention import (
    ClusteredAttention,
    ClusteredAttentionState,
    ImprovedClusteredAttention,
    assign_to_centroids,
    causal_clustered_attention,
    causal_clustered_attention_step,
)
from verger.fast_attention.ops.clustering.reference import causal_clustered_attention_reference


def _inputs(b=2, h=2, n=37, d=8, clusters=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3))
    return q, k, v, torch.randn(h, clusters, d, generator=g, dtype=dtype)


def _padding(b=2, n=37):
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[1, :4] = True  # left padding: real queries follow padded keys
    mask[1, -3:] = True
    return mask


@pytest.mark.parametrize("topk", [None, 3, 100])
@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_the_per_query_reference(topk, chunk, padded):
    q, k, v, c = _inputs()
    mask = _padding() if padded else None
    out = causal_clustered_attention(q, k, v, c, topk=topk, chunk_size=chunk, key_padding_mask=mask)
    ref = causal_clustered_attention_reference(
        q, k, v, c, topk=topk, chunk_size=chunk, key_padding_mask=mask
    )
    assert_close(out, ref, rtol=1e-10)


@pytest.mark.parametrize("topk", [None, 4])
def test_centroid_logits_far_below_zero_stay_finite(topk):
    # every key at centroid logit ≈ −100 (fp32): exp(−100) underflows, so every sum must keep
    # its own shift (the first chunk's empty top-k set included: a shift of 0 there overflows)
    q, _, v, c = _inputs(h=2, n=40, clusters=1, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    toward = -c[None, :, :1] / c[None, :, :1].square().sum(-1, keepdim=True) * 100 * 8**0.5
    k = toward.expand(2, 2, 40, 8) + 0.01 * torch.randn(2, 2, 40, 8, generator=g)
    out = causal_clustered_attention(q, k, v, c, topk=topk, chunk_size=8)
    ref = causal_clustered_attention_reference(
        q.double(), k.double(), v.double(), c.double(), topk=topk, chunk_size=8
    )
    assert torch.isfinite(out).all()
    assert_close(out.double(), ref, rtol=1e-4)


@pytest.mark.parametrize("chunk", [5, 64])
def test_top_k_over_every_earlier_key_is_causal_softmax(chunk):
    q, k, v, c = _inputs()
    out = causal_clustered_attention(q, k, v, c, topk=37, chunk_size=chunk)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-10)


@pytest.mark.parametrize("topk", [None, 3])
def test_outputs_never_depend_on_later_positions(topk):
    q, k, v, c = _inputs(n=40)
    out = causal_clustered_attention(q, k, v, c, topk=topk, chunk_size=8)
    for t in (0, 13, 23, 31):  # change everything after t, keys with huge logits included
        later = [x.clone() for x in (q, k, v)]
        for x in later:
            x[:, :, t + 1 :] = 30 * torch.randn_like(x[:, :, t + 1 :])
        changed = causal_clustered_attention(*later, c, topk=topk, chunk_size=8)
        torch.testing.assert_close(changed[:, :, : t + 1], out[:, :, : t + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("topk", [None, 2])
def test_gradcheck_fp64(topk):
    q, k, v, c = (t.requires_grad_() for t in _inputs(b=1, h=2, n=11, d=4, clusters=3))
    mask = torch.zeros(1, 11, dtype=torch.bool)
    mask[0, :2] = True
    a = assign_to_centroids(q, c)

    def fn(q, k, v, c):
        return causal_clustered_attention(
            q, k, v, c, topk=topk, chunk_size=3, key_padding_mask=mask, assignments=a
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, c))


def test_log_depth_scans_equal_the_sequential_ones():
    # GPUs scan the chunks in log2(nb) steps; CPUs one chunk at a time. Chunks 0-1 hold only
    # padded keys (−inf) and the logits grow along the sequence, so the running max changes.
    from verger.fast_attention.causal_clustered.scans import chunk_prefix, prefix_topk

    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 11, 4, generator=g, dtype=torch.float64)
    logits = logits + torch.linspace(0, 30, 44, dtype=torch.float64).view(11, 4)
    logits[:, :, :2] = float("-inf")
    logits[0, 1, 5, 2] = float("-inf")
    v = torch.randn(2, 11, 4, 5, generator=g, dtype=torch.float64)
    parts = {}
    for log_depth in (False, True):
        lg, vv = logits.clone().requires_grad_(), v.clone().requires_grad_()
        shift, sums, norms = chunk_prefix(lg, vv, log_depth=log_depth)
        weight = torch.randn(
            sums.shape, generator=torch.Generator().manual_seed(1), dtype=sums.dtype
        )
        grads = torch.autograd.grad((sums * weight).sum() + norms.sum(), (lg, vv))
        top_values, top_keys = prefix_topk(logits, 6, log_depth)
        top_keys = top_keys.masked_fill(top_values.isinf(), -1)  # missing: any position
        parts[log_depth] = (shift, sums, norms, *grads, top_values, top_keys)
    for name, a, b in zip(("shift", "sums", "norms", "dlogits", "dv", "top values", "top keys"),
                          parts[False], parts[True]):  # fmt: skip
        assert torch.equal(a.isinf(), b.isinf()), name
        assert_close(a.masked_fill(a.isinf(), 0).double(), b.masked_fill(b.isinf(), 0).double(),
                     rtol=1e-12, name=name)  # fmt: skip


@pytest.mark.parametrize("topk", [None, 3])
def test_recurrent_steps_equal_the_parallel_form(topk):
    q, k, v, c = _inputs()
    full = causal_clustered_attention(q, k, v, c, topk=topk, chunk_size=7)
    state, outs = None, []
    for t in range(q.shape[2]):
        o, state = causal_clustered_attention_step(
            q[:, :, t], k[:, :, t], v[:, :, t], c, state, topk=topk, chunk_size=7
        )
        outs.append(o)
    assert_close(torch.stack(outs, 2), full, rtol=1e-10)
    assert state.steps == q.shape[2]


@pytest.mark.parametrize("topk", [None, 3])
@pytest.mark.parametrize("prompt", [14, 20])  # a whole number of chunks, and not
def test_padded_prompt_state_then_steps(topk, prompt):
    q, k, v, c = _inputs()
    mask = torch.zeros(2, 37, dtype=torch.bool)
    mask[1, :5] = True  # left-padded prompt
    full = causal_clustered_attention(q, k, v, c, topk=topk, chunk_size=7, key_padding_mask=mask)
    _, state = causal_clustered_attention(
        q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], c, topk=topk, chunk_size=7,
        key_padding_mask=mask[:, :prompt], return_state=True,
    )  # fmt: skip
    assert isinstance(state, ClusteredAttentionState)
    outs = []
    for t in range(prompt, 37):
        o, state = causal_clustered_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], c, state)
        outs.append(o)
    assert_close(torch.stack(outs, 2), full[:, :, prompt:], rtol=1e-10)


def test_empty_prompt_gives_an_empty_state_that_steps_continue():
    q, k, v, c = _inputs(n=5)
    out, state = causal_clustered_attention(
        q[:, :, :0], k[:, :, :0], v[:, :, :0], c, topk=3, chunk_size=4, return_state=True
    )
    assert out.shape == (2, 2, 0, 8) and state.steps == 0
    outs = []
    for t in range(5):
        o, state = causal_clustered_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], c, state)
        outs.append(o)
    full = causal_clustered_attention(q, k, v, c, topk=3, chunk_size=4)
    assert_close(torch.stack(outs, 2), full, rtol=1e-10)


def test_state_size_does_not_grow_with_the_context():
    q, k, v, c = _inputs(b=1, n=300, d=4)
    state, sizes = None, {}
    for t in range(300):
        _, state = causal_clustered_attention_step(
            q[:, :, t], k[:, :, t], v[:, :, t], c, state, topk=4, chunk_size=16
        )
        if t % 16 == 15:  # the chunk buffer is empty right after a merge
            sizes[t] = state.nbytes()
    assert len(set(sizes.values())) == 1


def test_half_precision_inputs_accumulate_in_fp32():
    q, k, v, c = _inputs(dtype=torch.float32)
    out = causal_clustered_attention(q.half(), k.half(), v.half(), c, topk=4, chunk_size=8)
    ref = causal_clustered_attention(
        q.half().float(), k.half().float(), v.half().float(), c, topk=4, chunk_size=8
    )
    assert out.dtype == torch.float16
    assert_close(out.float(), ref, rtol=2e-3)


def test_bad_inputs_raise_clear_errors():
    q, k, v, c = _inputs()
    with pytest.raises(ValueError, match="centroids must be"):
        causal_clustered_attention(q, k, v, c[:, :, :3])
    with pytest.raises(TypeError, match="floating"):
        causal_clustered_attention(q, k, v, c.long())
    with pytest.raises(ValueError, match="chunk_size"):
        causal_clustered_attention(q, k, v, c, chunk_size=0)
    with pytest.raises(ValueError, match="topk"):
        causal_clustered_attention(q, k, v, c, topk=0)
    with pytest.raises(ValueError, match="same length"):
        causal_clustered_attention(q, k[:, :, :5], v[:, :, :5], c)
    with pytest.raises(ValueError, match="assignments"):
        causal_clustered_attention(q, k, v, c, assignments=torch.zeros(2, 2, 3).long())
    _, state = causal_clustered_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], c)
    with pytest.raises(ValueError, match="state is for"):
        causal_clustered_attention_step(q[:1, :, 0], k[:1, :, 0], v[:1, :, 0], c, state)
    with pytest.raises(TypeError, match="ClusteredAttentionState"):
        causal_clustered_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], c, object())


# --- the module: learned centroids ---------------------------------------------------------


def _module(topk=3, **options):
    torch.manual_seed(0)
    return ClusteredAttention(16, 2, n_clusters=4, topk=topk, causal=True, chunk_size=4, **options)


def test_first_batch_seeds_the_centroids_then_they_move_by_the_moving_average():
    m = _module(centroid_decay=0.9)
    x = torch.randn(3, 20, 16)
    assert not bool(m.centroids.ready)
    with torch.no_grad():
        m.eval()(x)  # any first call seeds; eval calls never update afterwards
    seeded = m.centroids.value.clone()
    assert bool(m.centroids.ready) and seeded.abs().sum() > 0
    m(x)
    assert torch.equal(m.centroids.value, seeded)
    y, _ = m.train()(x)
    assert torch.equal(m.centroids.value, seeded)  # recorded, applied by the backward
    y.sum().backward()
    q = m.q_proj(x).view(3, 20, 2, 8).transpose(1, 2).detach()
    a = assign_to_centroids(q, seeded)
    for h in range(2):
        for c in range(4):
            members = q[:, h][a[:, h] == c]
            moved = 0.9 * seeded[h, c] + 0.1 * members.mean(0) if len(members) else None
            want = seeded[h, c] if moved is None else moved
            assert_close(m.centroids.value[h, c], want, rtol=1e-5, name=f"head {h} centroid {c}")


def test_loading_a_state_dict_decides_whether_the_centroids_are_seeded(monkeypatch):
    # readiness is mirrored on the host (no GPU read per forward); a load must reset it
    m, x = _module(), torch.randn(2, 12, 16)
    with torch.no_grad():
        m.eval()(x)
    fresh = _module()
    fresh.load_state_dict(m.state_dict())

    def refuse(*args):
        raise AssertionError("loaded centroids were seeded again")

    monkeypatch.setattr(fresh.centroids, "initialize", refuse)
    with torch.no_grad():
        fresh.eval()(x)
    assert torch.equal(fresh.centroids.value, m.centroids.value)
    m.load_state_dict(_module().state_dict())  # an unseeded state: the next call seeds
    assert not m.centroids.is_ready()
    del fresh.centroids._ready_host  # as unpickled from a version without the mirror
    assert fresh.centroids.is_ready()
    with torch.no_grad():
        m.eval()(x)
    assert m.centroids.is_ready() and bool(m.centroids.ready)


def test_unused_centroids_are_reseeded_with_queries_of_the_batch():
    m = _module()
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        m(x)
        m.centroids.value[0, 1] = 1e4  # far from every query: never assigned
        m.centroids.usage[0, 1] = 0.0
    with torch.no_grad():
        m(x)  # without gradients the update is applied at once
    q = m.q_proj(x).view(2, 12, 2, 8).transpose(1, 2)[:, 0].reshape(-1, 8)
    assert torch.isclose(q, m.centroids.value[0, 1].expand_as(q), atol=1e-5).all(-1).any()
    assert m.centroids.usage[0, 1] == pytest.approx(1 / 4)


def test_straight_through_centroids_train_the_query_projection():
    m = _module(topk=None)  # plain clustered: q only reaches the output through its centroid
    x = torch.randn(2, 12, 16)
    m(x)
    y, _ = m(x)
    y.square().sum().backward()
    assert m.q_proj.weight.grad is not None and m.q_proj.weight.grad.abs().sum() > 0


def test_activation_checkpointing_recomputes_the_same_forward():
    from torch.utils.checkpoint import checkpoint

    m = _module()
    x = torch.randn(2, 16, 16, requires_grad=True)
    m(x)  # seed; the next forwards record updates
    plain = copy.deepcopy(m)
    y, _ = plain(x)
    want = torch.autograd.grad(y.square().sum(), (x, *plain.parameters()))
    y2 = checkpoint(lambda t: m(t)[0], x, use_reentrant=False)
    seeded = m.centroids.value.clone()
    got = torch.autograd.grad(y2.square().sum(), (x, *m.parameters()))
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-6)
    assert not torch.equal(m.centroids.value, seeded)  # the backward applied the update


@pytest.mark.parametrize("training", [False, True])
def test_module_outputs_never_depend_on_later_tokens(training):
    m = _module()
    m(torch.randn(2, 16, 16))  # seed
    m.train(training)
    x = torch.randn(2, 16, 16)
    x2 = x.clone()
    x2[:, 9:] = torch.randn(2, 7, 16)
    y, _ = copy.deepcopy(m)(x)  # copies: a training call moves the centroids afterwards
    y2, _ = copy.deepcopy(m)(x2)
    assert_close(y2[:, :9], y[:, :9], rtol=1e-6)


def test_lm_generation_cache_equals_the_full_forward_and_centroids_are_saved():
    cfg = tiny_config(
        attention="improved_clustered",
        attention_options={"n_clusters": 3, "topk": 2, "chunk_size": 4},
    )
    model = TransformerLM(cfg)
    ids = torch.randint(0, 61, (2, 16))
    model(ids, targets=ids).loss.backward()  # seeds the centroids, then moves them
    model.eval()
    full = model(ids, return_logits=True).logits
    out = model(ids[:, :7], use_cache=True, return_logits=True)
    steps, cache = [out.logits], out.cache
    for t in range(7, 16):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True, return_logits=True)
        steps.append(out.logits)
        cache = out.cache
    assert_close(torch.cat(steps, 1), full, rtol=1e-5)
    assert isinstance(cache.layers[0], ClusteredAttentionState)
    reloaded = TransformerLM(cfg).eval()
    reloaded.load_state_dict(model.state_dict())
    assert_close(reloaded(ids, return_logits=True).logits, full, rtol=1e-6)


def test_module_bad_options():
    with pytest.raises(ValueError, match="centroid_decay"):
        ImprovedClusteredAttention(16, 2, causal=True, centroid_decay=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        ImprovedClusteredAttention(16, 2, causal=True, chunk_size=0)
    m = ImprovedClusteredAttention(16, 2, causal=True)
    with pytest.raises(TypeError, match="ClusteredAttentionState"):
        m(torch.randn(1, 3, 16), cache=object())


def test_torch_compile_matches_eager():
    q, k, v, c = (t.float().requires_grad_() for t in _inputs(n=40))

    def fn(q, k, v, c):
        return causal_clustered_attention(q, k, v, c, topk=3, chunk_size=8)

    compiled = torch.compile(fn, backend="aot_eager")
    want = fn(q, k, v, c)
    got = compiled(q, k, v, c)
    assert_close(got, want, rtol=1e-6)
    for name, a, b in zip(
        "qkvc",
        torch.autograd.grad(got.square().sum(), (q, k, v, c)),
        torch.autograd.grad(want.square().sum(), (q, k, v, c)),
    ):
        assert_close(a, b, rtol=1e-5, name=f"d{name}")
