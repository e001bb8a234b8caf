"""Analytic FLOPs vs torch.utils.flop_counter (math SDPA so attention matmuls are counted)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from verger.core.nn import TransformerLM, flops_breakdown
from verger.core.testing import limit_torch_threads, tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    with limit_torch_threads(1):  # tiny model: extra threads only add contention
        yield


def _counted(fn):
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_matches_flop_counter(fused, tie):
    cfg = tiny_config(fused=fused, tie_embeddings=tie, d_model=48, n_heads=3, vocab_size=97)
    model = TransformerLM(cfg)
    b, t = 2, 24
    ids = torch.randint(0, 97, (b, t))
    forward = _counted(lambda: model(ids))
    assert forward == pytest.approx(b * t * model.flops_per_token(t, training=False), rel=0.02)
    train = _counted(lambda: model(ids, ids).loss.backward())
    assert train == pytest.approx(b * t * model.flops_per_token(t), rel=0.02)


def test_breakdown_scales_as_documented():
    cfg = tiny_config()
    a, b = flops_breakdown(cfg, 10), flops_breakdown(cfg, 20)
    assert b["attention_scores"] == 2 * a["attention_scores"]
    assert b["mlp"] == a["mlp"] == cfg.n_layers * 6 * cfg.d_model * cfg.hidden_size
    assert a["lm_head"] == 2 * cfg.d_model * cfg.vocab_size
    with pytest.raises(ValueError, match="seq_len=0"):
        flops_breakdown(cfg, 0)
