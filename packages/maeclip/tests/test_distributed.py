"""Two gloo processes: ClipLoss gathers features across ranks, DDP matches one big batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from verger.core.distributed import run_multiprocess
from verger.maeclip import MAECLIP, CaptionTokenizer, MAECLIPConfig, TrainConfig, train

B, N = 8, 16  # global batch, patches of the micro model


def _model(contrastive_input: str) -> MAECLIP:
    torch.manual_seed(0)
    return MAECLIP(MAECLIPConfig(model_name="maeclip-micro", contrastive_input=contrastive_input))


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 16, 16, generator=g)
    texts = CaptionTokenizer(16)([f"caption number {i}" for i in range(B)])
    noise = torch.rand(B, N, generator=g)
    return images, texts, noise


def _ddp_step(contrastive_input: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(contrastive_input)
    ddp = DistributedDataParallel(model)
    images, texts, noise = _batch()
    part = slice(rank * B // world, (rank + 1) * B // world)
    out = ddp(images[part], texts[part], noise=noise[part])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"clip": float(out.clip_loss), "mae": float(out.mae_loss), "grads": grads}


def _train_two_ranks() -> dict:
    from verger.maeclip import mnist_pairs

    data = mnist_pairs(image_size=16).subset(range(0, 5000, 50))
    cfg = TrainConfig(steps=3, batch_size=16, warmup_steps=1, progress=False)
    result = train(MAECLIPConfig(model_name="maeclip-micro"), cfg, data)
    return {
        "params": torch.cat([p.detach().flatten() for p in result.model.parameters()]),
        "clip": [h["clip_loss"] for h in result.history],
        "mae": [h["mae_loss"] for h in result.history],
    }


def _all_checks() -> dict:
    """One process launch (the costly part) for every two-rank check."""
    return {"full": _ddp_step("full"), "masked": _ddp_step("masked"), "train": _train_two_ranks()}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_multiprocess(_all_checks, 2, timeout=400)


@pytest.mark.parametrize("contrastive_input", ["full", "masked"])
def test_two_rank_ddp_equals_one_process_on_the_global_batch(two_ranks, contrastive_input):
    results = [r[contrastive_input] for r in two_ranks]
    model = _model(contrastive_input)
    images, texts, noise = _batch()
    out = model(images, texts, noise=noise)
    out.loss.backward()
    # the contrastive loss sees all 8 pairs on every rank (features gathered across ranks)
    for r in results:
        assert r["clip"] == pytest.approx(out.clip_loss.item(), rel=1e-5)
    # MAE: per-rank means over equal patch counts average to the global mean
    assert (results[0]["mae"] + results[1]["mae"]) / 2 == pytest.approx(
        out.mae_loss.item(), rel=1e-5
    )
    # gradients (averaged by DDP) equal the single-process gradients
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        for r in results:
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_train_under_two_processes_keeps_ranks_in_sync(two_ranks):
    a, b = (r["train"] for r in two_ranks)
    torch.testing.assert_close(a["params"], b["params"], rtol=0, atol=0)
    assert a["clip"] == pytest.approx(b["clip"], rel=1e-6)  # one global contrastive loss
    assert a["mae"] != b["mae"]  # different images and masks per rank
