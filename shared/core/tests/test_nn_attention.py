"""The attention registry, rotary helpers, and a whole model through the Triton kernels."""

import pytest
import torch
from torch import nn

from verger.core.kernels import use_backend
from verger.core.nn import (
    RotaryEmbedding,
    SoftmaxAttention,
    TransformerLM,
    apply_rotary,
    available_attentions,
    get_attention,
    register_attention,
)
from verger.core.testing import assert_close, limit_torch_threads, requires_triton, tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    with limit_torch_threads(1):  # tiny model: extra threads only add contention
        yield


class _ScaledSoftmax(nn.Module):
    """A plug-in: softmax attention whose output is scaled by a configured factor."""

    def __init__(self, config, layer_index):
        super().__init__()
        self.inner = SoftmaxAttention(config.replace(attention_options={}), layer_index)
        self.scale = config.attention_options.get("scale", 1.0)
        self.calls = 0

    def forward(self, x, *, cache=None, use_cache=False, start_pos=0):
        self.calls += 1
        y, cache = self.inner(x, cache=cache, use_cache=use_cache, start_pos=start_pos)
        return y * self.scale, cache


register_attention("test-scaled", replace=True)(_ScaledSoftmax)


def test_registry_lookup_and_errors():
    assert {"softmax", "test-scaled"} <= set(available_attentions())
    assert get_attention("test-scaled") is _ScaledSoftmax
    with pytest.raises(ValueError, match=r"attention='nope' is not registered; available: \["):
        get_attention("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_attention("softmax")(lambda config, i: nn.Identity())
    with pytest.raises(ValueError, match="name=''"):
        register_attention("")
    with pytest.raises(ValueError, match="attention='nope'"):
        TransformerLM(tiny_config(attention="nope"))
    with pytest.raises(ValueError, match="takes no attention_options"):
        TransformerLM(tiny_config(attention_options={"x": 1}))


def test_plugin_is_used_by_every_block_and_saved(tmp_path):
    torch.manual_seed(0)
    scaled = TransformerLM(tiny_config(attention="test-scaled", attention_options={"scale": 0.0}))
    ids = torch.randint(0, 61, (2, 9))
    scaled(ids)
    assert all(b.attn.calls == 1 for b in scaled.blocks)
    # scale 0 removes attention: the logits at a position depend on that token alone
    other = ids.clone()
    other[:, :4] = (other[:, :4] + 1) % 61
    assert torch.equal(scaled(ids).logits[:, 4:], scaled(other).logits[:, 4:])
    scaled.save_pretrained(tmp_path)
    loaded = TransformerLM.from_pretrained(tmp_path)
    assert loaded.blocks[0].attn.scale == 0.0
    with pytest.raises(ValueError, match="attention_options"):
        TransformerLM(
            tiny_config(attention="test-scaled", attention_options={"scale": object()})
        ).save_pretrained(tmp_path / "bad")


def test_rotary_module_offsets_and_bounds():
    rot = RotaryEmbedding(8, 16, base=100.0)
    x = torch.randn(1, 6, 2, 8)
    whole = rot(x)
    assert_close(rot(x[:, 4:].contiguous(), start_pos=4), whole[:, 4:], rtol=1e-6)
    cos, sin = rot.tables(6, 0, x.device)
    assert_close(apply_rotary(x, cos, sin, fused=False), whole, rtol=1e-6)
    with pytest.raises(ValueError, match="exceed max_seq_len=16"):
        rot(x, start_pos=11)
    rot.half()  # tables are not parameters/buffers: precision is kept
    assert rot.tables(2, 0, x.device)[0].dtype == torch.float32


def test_cache_position_mismatch_is_rejected():
    attn = SoftmaxAttention(tiny_config())
    x = torch.randn(1, 3, 32)
    _, cache = attn(x, use_cache=True)
    with pytest.raises(ValueError, match="cache holds 3 positions but start_pos=2"):
        attn(x[:, :1], cache=cache, use_cache=True, start_pos=2)


@requires_triton
def test_whole_model_through_triton_kernels_matches_plain_model():
    torch.manual_seed(1)
    fused = TransformerLM(tiny_config(fused=True, n_layers=1))
    plain = TransformerLM(tiny_config(fused=False, n_layers=1))
    plain.load_state_dict(fused.state_dict())
    ids, targets = torch.randint(0, 61, (2, 7)), torch.randint(0, 61, (2, 7))
    with use_backend("triton"):
        loss = fused(ids, targets).loss
        loss.backward()
    ref = plain(ids, targets).loss
    ref.backward()
    assert_close(loss, ref, rtol=1e-5, name="loss")
    grads = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        assert_close(p.grad, grads[name].grad, rtol=1e-4, name=name)
