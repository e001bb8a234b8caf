"""Codec: lossless fp32, bounded low-bit error, exact byte counts; bytes in the engine."""

import pytest
import torch

from verger.sparse_diloco import Codec, DiLoCo, DiLoCoConfig, SubsetPlan
from verger.sparse_diloco.toy import ToyData, toy_loss, toy_model


@pytest.mark.parametrize("bits", [4, 8, 32])
@pytest.mark.parametrize("n", [1, 255, 256, 1000])
def test_roundtrip_error_and_size(bits, n):
    codec = Codec(bits=bits, block_size=64)
    x = torch.randn(n) * torch.logspace(-3, 1, n)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.numel() == codec.nbytes(n)
    y = codec.decode(payload, n)
    if bits == 32:
        assert torch.equal(x, y)
        return
    # round-to-nearest: error <= half a step of each block's scale
    qmax = 2 ** (bits - 1) - 1
    blocks = torch.nn.functional.pad(x, (0, (-n) % 64)).view(-1, 64)
    half_step = (blocks.abs().amax(1) / qmax / 2).repeat_interleave(64)[:n]
    assert ((x - y).abs() <= half_step * (1 + 1e-5) + 1e-12).all()
    assert payload.numel() == 4 * blocks.shape[0] + (64 if bits == 8 else 32) * blocks.shape[0]


def test_codec_validation():
    with pytest.raises(ValueError, match="bits"):
        Codec(bits=3)
    with pytest.raises(ValueError, match="block_size"):
        Codec(block_size=3)
    with pytest.raises(ValueError, match="bytes expected"):
        Codec(bits=8).decode(torch.zeros(3, dtype=torch.uint8), 10)


def test_engine_counts_only_trained_coordinates():
    model = toy_model(hidden=32)
    full, partial = SubsetPlan.full(model, 4), SubsetPlan.mlp_slices(model, 4)
    sent = {}
    for name, plan, bits in [("full", full, 32), ("partial", partial, 32), ("p4", partial, 4)]:
        config = DiLoCoConfig(
            num_workers=4, inner_steps=2, compression_bits=bits, compression_block=64
        )
        engine = DiLoCo(toy_model(hidden=32), plan, config, loss_fn=toy_loss, data=ToyData())
        engine.train(2)
        sent[name] = engine.bytes_sent
    assert sent["full"] == 2 * 4 * 4 * full.total_numel()
    assert sent["partial"] == 2 * 4 * sum(partial.trained_numel(k) for k in range(4))
    per_worker = [Codec(bits=4, block_size=64).nbytes(partial.trained_numel(k)) for k in range(4)]
    assert sent["p4"] == 2 * sum(per_worker)
