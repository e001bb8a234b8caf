"""TransformerLM: structure, fused vs plain equivalence, KV cache, generation, save/load."""

import json

import pytest
import torch
from torch import nn

from verger.core.nn import (
    LMCache,
    SoftmaxAttention,
    SwiGLU,
    TransformerConfig,
    TransformerLM,
)
from verger.core.testing import assert_close, limit_torch_threads, tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    with limit_torch_threads(1):  # tiny model: extra threads only add contention
        yield


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return TransformerLM(tiny_config(**kw))


def _ids(b, t, vocab=61, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 0),
        ("d_model", 30),  # not divisible by n_heads=4
        ("n_heads", 0),
        ("n_layers", 1.5),
        ("mlp_hidden", 0),
        ("mlp_ratio", -1.0),
        ("max_seq_len", 0),
        ("rope_base", float("nan")),
        ("norm_eps", 0.0),
        ("dropout", 1.0),
        ("fused", 1),
        ("attention", ""),
        ("attention_options", []),
        ("init_std", 0),
    ],
)
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_config_odd_head_dim_and_roundtrip():
    with pytest.raises(ValueError, match="head_dim"):
        TransformerConfig(vocab_size=10, d_model=12, n_heads=4)  # head_dim 3
    cfg = TransformerConfig(vocab_size=10, d_model=96, n_heads=4)
    assert cfg.hidden_size == 256  # 8/3 * 96 = 256 exactly, a multiple of 64
    assert TransformerConfig(vocab_size=10, d_model=104, n_heads=4).hidden_size == 320
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        TransformerConfig.from_dict({**cfg.to_dict(), "n_kv_heads": 2})


def test_structure_names_and_parameter_count():
    cfg = tiny_config()
    model = TransformerLM(cfg)
    d, h, v, n = cfg.d_model, cfg.hidden_size, cfg.vocab_size, cfg.n_layers
    assert model.lm_head.weight is model.embed.weight
    block = model.blocks[1]
    assert isinstance(block.attn, SoftmaxAttention) and isinstance(block.mlp, SwiGLU)
    assert block.mlp.hidden == h == 88
    assert block.mlp.w_gate.weight.shape == (h, d) and block.mlp.w_down.weight.shape == (d, h)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert getattr(block.attn, name).weight.shape == (d, d)
    per_layer = 4 * d * d + 3 * d * h + 2 * d  # projections, MLP, two norm scales
    assert model.num_parameters() == v * d + n * per_layer + d
    assert model.num_parameters(non_embedding=True) == n * per_layer + d
    untied = TransformerLM(tiny_config(tie_embeddings=False))
    assert untied.num_parameters() == model.num_parameters() + v * d
    assert untied.num_parameters(non_embedding=True) == model.num_parameters(non_embedding=True)


def test_fused_and_plain_models_agree_on_loss_and_every_gradient():
    fused = _model(fused=True)
    plain = TransformerLM(tiny_config(fused=False))
    plain.load_state_dict(fused.state_dict())
    assert isinstance(plain.norm, nn.RMSNorm)
    ids, targets = _ids(3, 17), _ids(3, 17, seed=2)
    targets[0, :5] = -100
    out_f, out_p = fused(ids, targets), plain(ids, targets)
    assert out_f.logits is None and out_p.logits is None
    assert_close(out_f.loss, out_p.loss, rtol=1e-5, name="loss")
    out_f.loss.backward()
    out_p.loss.backward()
    grads_p = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        assert_close(p.grad, grads_p[name].grad, rtol=1e-4, name=name)
    logits = fused(ids, targets, return_logits=True).logits
    assert_close(logits, plain(ids).logits, rtol=1e-5, name="logits")


def test_loss_ignores_masked_targets():
    model = _model()
    ids, targets = _ids(2, 12), _ids(2, 12, seed=3)
    masked = targets.clone()
    masked[:, :6] = -100
    logits = model(ids).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, 6:].reshape(-1, 61), targets[:, 6:].reshape(-1)
    )
    assert_close(model(ids, masked).loss, expected, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_kv_cache_reproduces_the_full_forward(fused):
    model = _model(fused=fused).eval()
    ids = _ids(2, 20)
    full = model(ids).logits
    out = model(ids[:, :7], use_cache=True)  # prefill, then one token, then a chunk of 12
    parts = [out.logits]
    out = model(ids[:, 7:8], cache=out.cache, use_cache=True)
    parts.append(out.logits)
    out = model(ids[:, 8:], cache=out.cache, use_cache=True)
    parts.append(out.logits)
    assert isinstance(out.cache, LMCache) and out.cache.seq_len == 20
    assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, name="cached logits")


def test_greedy_generation_matches_uncached_argmax_loop():
    model = _model(seed=4)
    prompt = _ids(2, 5)
    got = model.generate(prompt, 9, greedy=True)
    seq = prompt
    with torch.no_grad():
        for _ in range(9):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(got, seq)
    assert model.training  # mode restored


def test_sampling_top_k_and_seed():
    model = _model(seed=5)
    prompt = _ids(3, 4)
    greedy = model.generate(prompt, 6, greedy=True)
    assert torch.equal(model.generate(prompt, 6, top_k=1), greedy)
    a = model.generate(prompt, 6, temperature=2.0, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 6, temperature=2.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (3, 10)
    c = model.generate(prompt, 6, temperature=2.0, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, c)
    # top-k: every sampled token is among the k most likely under the model at its step
    seq = model.generate(prompt, 6, top_k=3, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits = model(seq[:, :-1]).logits[:, 3:]
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == seq[:, 4:, None]).any(-1).all()


def test_generate_rejects_bad_arguments():
    model = _model()
    prompt = _ids(1, 4)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model.generate(prompt, 61)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 2, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)


def test_forward_rejects_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="input_ids holds 61"):
        model(torch.full((1, 3), 61))
    with pytest.raises(TypeError, match=r"input_ids has dtype torch\.float32"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq>0\]"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="targets holds -5"):
        model(_ids(1, 3), torch.full((1, 3), -5))
    with pytest.raises(ValueError, match="must match input_ids"):
        model(_ids(1, 3), _ids(1, 4))
    with pytest.raises(TypeError, match="config must be a TransformerConfig"):
        TransformerLM({"vocab_size": 3})


def test_cache_from_another_model_is_rejected():
    cache = _model(n_layers=1)(_ids(1, 3), use_cache=True).cache
    with pytest.raises(ValueError, match="cache has 1 layers, the model 2"):
        _model()(_ids(1, 1), cache=cache, use_cache=True)


def test_limit_torch_threads_restores_the_count():
    before = torch.get_num_threads()
    with limit_torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_dropout_is_active_only_in_training():
    model = _model(dropout=0.3)
    ids = _ids(2, 8)
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_roundtrip(tmp_path, tie):
    model = _model(tie_embeddings=tie)
    out = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["tie_embeddings"] is tie
    loaded = TransformerLM.from_pretrained(out)
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.embed.weight) is tie
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    ids = _ids(2, 6)
    assert torch.equal(model.eval()(ids).logits, loaded.eval()(ids).logits)


def test_load_rejects_mismatched_weights(tmp_path):
    _model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_embeddings"] = False  # the file has no separate lm_head
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        TransformerLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        TransformerLM.from_pretrained(tmp_path / "nowhere")
