"""torchao, the peer: our fake quantization equals torchao's on the same weights (int4 /
int8, symmetric, per group or per channel), and configs convert to torchao's.

Skipped without torchao; the package's test extra installs it."""

import copy

import pytest
import torch

from verger.core.nn import TransformerLM
from verger.core.testing import tiny_config
from verger.qat_scaling import (
    QuantConfig,
    WeightFakeQuantizer,
    enable_fake_quant,
    prepare,
    to_torchao_fake_quantize_config,
    to_torchao_qat_config,
)

torchao = pytest.importorskip("torchao")

from torchao.quantization import quantize_  # noqa: E402
from torchao.quantization.granularity import PerAxis, PerGroup  # noqa: E402
from torchao.quantization.qat import IntxFakeQuantizeConfig  # noqa: E402
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer  # noqa: E402

from verger.qat_scaling.torchao_compat import torchao_fake_quantize  # noqa: E402


@pytest.mark.parametrize("bits,dtype", [(4, torch.int4), (8, torch.int8)])
@pytest.mark.parametrize("group", [32, None])
@pytest.mark.parametrize("learned", [False, True])
def test_forward_equals_torchao_fake_quantizer(bits, dtype, group, learned):
    torch.manual_seed(bits)
    w = torch.randn(48, 128) * 0.05
    w[0, :3] = torch.tensor([0.3, -0.3, 0.0])  # ties of max|w| with both signs
    config = QuantConfig(bits=bits, group_size=group, scale_init="torchao", learned_scale=learned)
    ours = WeightFakeQuantizer((48, 128), config)
    ours.initialize(w)
    ours.set_enabled(True)
    theirs = IntxFakeQuantizer(
        IntxFakeQuantizeConfig(dtype, group_size=group, is_symmetric=True)
        if group
        else IntxFakeQuantizeConfig(dtype, "per_channel", is_symmetric=True)
    )
    with torch.no_grad():
        want = theirs(w)
        assert torch.equal(ours(w), want)
        assert torch.equal(torchao_fake_quantize(w, config), want)


def test_model_forward_equals_torchao_prepared_model():
    torch.manual_seed(0)
    base = TransformerLM(tiny_config(mlp_hidden=96))
    config = QuantConfig(bits=4, group_size=16, scale_init="torchao", learned_scale=False)
    ours = prepare(copy.deepcopy(base), config)
    enable_fake_quant(ours, True)
    theirs = copy.deepcopy(base)
    quantize_(theirs, to_torchao_qat_config(config), filter_fn=lambda m, name: name != "lm_head" and isinstance(m, torch.nn.Linear))  # fmt: skip
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
        assert not torch.equal(ours(ids).logits, base(ids).logits)


def test_config_conversion():
    c = to_torchao_fake_quantize_config(QuantConfig(bits=4, group_size=32, scale_init="torchao"))
    assert c.dtype == torch.int4 and c.granularity == PerGroup(32) and c.is_symmetric
    assert c.range_learning and not c.is_dynamic
    c = to_torchao_fake_quantize_config(
        QuantConfig(bits=8, scale_init="torchao", learned_scale=False, scale_dtype="bfloat16")
    )
    assert c.dtype == torch.int8 and c.granularity == PerAxis(0) and c.is_dynamic
    assert c.scale_precision == torch.bfloat16
    qat = to_torchao_qat_config(QuantConfig(bits=4, scale_init="torchao"))
    assert qat.step == "prepare" and qat.weight_config.dtype == torch.int4
    with pytest.raises(ValueError, match="no equivalent"):
        to_torchao_fake_quantize_config(QuantConfig(bits=2))
    with pytest.raises(ValueError, match="scale_init='torchao'"):
        to_torchao_fake_quantize_config(QuantConfig(bits=4))
    with pytest.raises(ValueError, match="step"):
        to_torchao_qat_config(QuantConfig(bits=4, scale_init="torchao"), step="train")
