"""prepare / enable_fake_quant / convert on verger-core's TransformerLM: the delayed start,
bit-exact export, packed storage size, safetensors round trip, and bad input."""

import copy

import pytest
import torch

from verger.core.nn import TransformerLM
from verger.core.testing import tiny_config
from verger.qat_scaling import (
    QATLinear,
    QuantConfig,
    convert,
    enable_fake_quant,
    fake_quantizers,
    load_quantized,
    pack_codes,
    packed_size,
    prepare,
    save_quantized,
    scale_parameters,
    storage_report,
    unpack_codes,
)
from verger.qat_scaling.convert import QuantizedLinear, TiedQuantizedHead


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return TransformerLM(tiny_config(mlp_hidden=96, **overrides))


def _ids(seed=1):
    return torch.randint(0, 61, (3, 17), generator=torch.Generator().manual_seed(seed))


def _train_steps(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(steps):
        ids = _ids(10 + i)
        model(ids, ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("bits", [1, "ternary", 2, 3, 4, 6, 8])
@pytest.mark.parametrize("group,embedding_bits", [(None, None), (16, 4), (32, 8)])
def test_fake_quant_forward_equals_converted_model_bit_for_bit(
    tmp_path, bits, group, embedding_bits
):
    model = prepare(
        _model(), QuantConfig(bits=bits, group_size=group, embedding_bits=embedding_bits)
    )
    enable_fake_quant(model, True)
    _train_steps(model)  # learned scales move away from their initial values
    model.eval()
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        converted = convert(copy.deepcopy(model))
        got = converted(ids).logits
    assert torch.equal(got, want)
    assert not any(isinstance(m, QATLinear) for m in converted.modules())
    save_quantized(converted, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    if embedding_bits is not None:
        assert isinstance(loaded.lm_head, TiedQuantizedHead)


@pytest.mark.parametrize(
    "bits,stored", [(1, 1), ("ternary", 2), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)]
)
def test_packed_storage_is_n_times_b_over_8_plus_scales(bits, stored):
    model = prepare(_model(), QuantConfig(bits=bits, group_size=16))
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, QATLinear))
    scales = sum(s.numel() for s in scale_parameters(model))
    convert(model)
    report = storage_report(model)
    assert report["quantized_weights"] == n and n % 8 == 0
    assert report["packed_bytes"] == n * stored // 8
    assert report["scale_bytes"] == 4 * scales == 4 * n // 16
    assert report["fp32_bytes"] == 4 * n


def test_bit_packing_round_trips_and_layout():
    torch.manual_seed(5)
    for bits in range(1, 9):
        for n in (1, 7, 8, 33, 1000):
            codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
            packed = pack_codes(codes, bits)
            assert packed.numel() == packed_size(n, bits) == -(-n // 8) * bits
            assert torch.equal(unpack_codes(packed, bits, n), codes)
    # two 4-bit codes per byte, the first in the low nibble; four 2-bit codes per byte
    assert pack_codes(torch.tensor([3, 12, 0, 15, 1, 2, 5, 9], dtype=torch.uint8), 4).tolist() == [
        3 | 12 << 4, 0 | 15 << 4, 1 | 2 << 4, 5 | 9 << 4,
    ]  # fmt: skip
    assert pack_codes(torch.tensor([1, 2, 3, 0, 0, 0, 0, 3], dtype=torch.uint8), 2).tolist() == [
        1 | 2 << 2 | 3 << 4, 3 << 6,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="does not fit"):
        pack_codes(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 8)


def test_delayed_start_keeps_fp_until_enabled_and_initializes_scales_then():
    model = _model()
    reference = copy.deepcopy(model)
    prepare(model, QuantConfig(bits=4, group_size=16))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)  # off: full precision
    _train_steps(model)  # FP training moves the weights
    _, q, w = fake_quantizers(model)[0]
    before = w.detach().clone()
    assert enable_fake_quant(model, True) == len(fake_quantizers(model))
    want = before.view(w.shape[0], -1, 16).abs().amax(-1) / 7  # max|w| / Qp at this moment
    assert torch.equal(q.scale.detach(), want)
    with torch.no_grad():
        on = model(ids).logits
    assert not torch.equal(on, reference(ids).logits)
    assert enable_fake_quant(model, True) == 0  # already on: scales are kept
    # the switch is part of the state: a fresh prepared copy picks it up from the state dict
    fresh = prepare(_model(seed=3), QuantConfig(bits=4, group_size=16))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, on)
    enable_fake_quant(model, False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _forward_fp(model, ids))


def _forward_fp(model, ids):
    plain = _model()
    state = {k: v for k, v in model.state_dict().items() if "quantizer" not in k}
    plain.load_state_dict(state)
    return plain(ids).logits


def test_prepare_keeps_parameter_tensors_and_the_head_in_fp():
    model = _model()
    weights = {n: p for n, p in model.named_parameters()}
    prepare(model, QuantConfig(bits=2))
    after = dict(model.named_parameters())
    for name, p in weights.items():
        assert after[name] is p  # an optimizer built before prepare stays valid
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.embed.weight
    n_linear = 7 * model.config.n_layers  # q, k, v, o, gate, up, down
    assert len(fake_quantizers(model)) == n_linear


def test_exclude_and_untied_head():
    model = _model(tie_embeddings=False)
    prepare(model, QuantConfig(bits=4, embedding_bits=8), exclude=["blocks.0.*", "*.w_down"])
    names = {n for n, _, _ in fake_quantizers(model)}
    assert not any(n.startswith("blocks.0.") or n.endswith("w_down") for n in names)
    assert {"embed", "lm_head", "blocks.1.attn.q_proj"} <= names
    enable_fake_quant(model, True)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        converted = convert(model)
        assert isinstance(converted.lm_head, QuantizedLinear)
        assert torch.equal(converted(ids).logits, want)


def test_bad_prepare_input_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"does not divide the 32 inputs of layer 'blocks\.0\.attn\.q_proj'"
    ):
        prepare(_model(), QuantConfig(bits=4, group_size=24))
    model = prepare(_model(), QuantConfig(bits=4))
    with pytest.raises(ValueError, match="prepared twice"):
        prepare(model, QuantConfig(bits=4))
    with pytest.raises(ValueError, match="quantized together or not at all"):
        prepare(_model(), QuantConfig(bits=4, embedding_bits=8), exclude="lm_head")
    with pytest.raises(ValueError, match="no layer left"):
        prepare(_model(), QuantConfig(bits=4), exclude="*")
    with pytest.raises(TypeError, match="patterns"):
        prepare(_model(), QuantConfig(bits=4), exclude=[3])
    with pytest.raises(TypeError, match="QuantConfig"):
        prepare(_model(), {"bits": 4})
    with pytest.raises(ValueError, match="call prepare first"):
        enable_fake_quant(_model(), True)
    with pytest.raises(TypeError, match="bool"):
        enable_fake_quant(model, 1)
    with pytest.raises(ValueError, match="call prepare first"):
        convert(_model())
