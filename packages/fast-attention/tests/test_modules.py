"""Modules with projections and their plug-in into verger.core's TransformerLM."""

import pytest
import torch

from verger.core.nn import TransformerLM, available_attentions
from verger.core.testing import assert_close, tiny_config
from verger.fast_attention import (
    CausalLinearAttention,
    ClusteredAttention,
    ImprovedClusteredAttention,
    LinearAttention,
    LinearAttentionState,
    clustered_attention,
    linear_attention,
)

OPTIONS = {
    "linear": {},
    "clustered": {"n_clusters": 4},
    "improved_clustered": {"n_clusters": 4, "topk": 4},
}


def _heads(module, x):
    b, t, _ = x.shape
    shape = (b, t, module.n_heads, module.head_dim)
    return [p(x).view(shape).transpose(1, 2) for p in (module.q_proj, module.k_proj, module.v_proj)]


def test_registered_in_core():
    assert {"linear", "clustered", "improved_clustered"} <= set(available_attentions())


def test_linear_module_equals_functional_with_projections():
    torch.manual_seed(0)
    m = LinearAttention(16, 2)
    x = torch.randn(3, 9, 16)
    q, k, v = _heads(m, x)
    want = m.o_proj(linear_attention(q, k, v).transpose(1, 2).reshape(3, 9, 16))
    got, cache = m(x)
    assert cache is None
    assert_close(got, want, rtol=1e-6)


def test_clustered_module_equals_functional():
    torch.manual_seed(0)
    m = ImprovedClusteredAttention(16, 2, n_clusters=3, topk=4)
    x = torch.randn(2, 12, 16)
    q, k, v = _heads(m, x)
    torch.manual_seed(1)
    got, _ = m(x)
    torch.manual_seed(1)
    ref = clustered_attention(q, k, v, n_clusters=3, topk=4)
    assert_close(got, m.o_proj(ref.transpose(1, 2).reshape(2, 12, 16)), rtol=1e-6)
    assert isinstance(ClusteredAttention(16, 2), torch.nn.Module)


def test_causal_linear_cache_is_the_recurrent_state():
    torch.manual_seed(0)
    m = CausalLinearAttention(16, 2)
    x = torch.randn(2, 10, 16)
    full, _ = m(x)
    y, state = m(x[:, :6], use_cache=True)
    assert isinstance(state, LinearAttentionState)
    parts = [y]
    for t in range(6, 10):
        y, state = m(x[:, t : t + 1], cache=state, use_cache=True, start_pos=t)
        parts.append(y)
    assert_close(torch.cat(parts, 1), full, rtol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        LinearAttention(16, 2)(x, use_cache=True)
    with pytest.raises(ValueError, match="key_padding_mask"):  # not silently ignored
        m(x[:, :1], cache=state, key_padding_mask=torch.zeros(2, 1, dtype=torch.bool))


def test_improved_clustered_module_needs_an_int_topk():
    with pytest.raises(ValueError, match="topk"):
        ImprovedClusteredAttention(16, 2, topk=None)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_transformer_lm_trains_with_each_attention(name):
    torch.manual_seed(0)
    model = TransformerLM(tiny_config(attention=name, attention_options=OPTIONS[name]))
    ids = torch.randint(0, 61, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):  # memorize one batch: the loss must go down
        out = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.3
    gen = model.generate(ids[:, :5], 6, greedy=True)
    assert gen.shape == (4, 11)


def test_linear_lm_incremental_logits_equal_full_pass():
    torch.manual_seed(0)
    model = TransformerLM(tiny_config(attention="linear")).eval()
    ids = torch.randint(0, 61, (2, 16))
    full = model(ids, return_logits=True).logits
    out = model(ids[:, :10], use_cache=True, return_logits=True)
    steps = [out.logits]
    cache = out.cache
    for t in range(10, 16):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True, return_logits=True)
        cache = out.cache
        steps.append(out.logits)
    assert_close(torch.cat(steps, 1), full, rtol=1e-5)


def test_favor_feature_map_through_attention_options():
    cfg = tiny_config(
        attention="linear",
        attention_options={
            "feature_map": "favor",
            "feature_map_options": {"n_features": 16, "seed": 0},
        },
    )
    model = TransformerLM(cfg)
    loss = model(torch.randint(0, 61, (2, 8)), targets=torch.randint(0, 61, (2, 8))).loss
    assert torch.isfinite(loss)
