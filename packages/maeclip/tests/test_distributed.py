"""Two gloo processes: ClipLoss gathers features across ranks, DDP matches one big batch."""

from __future__ import annotations

import shutil
from pathlib import Path

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


def _resume_two_ranks(folder: str) -> dict:
    """4 steps straight vs 2 + resume: each rank must get its own mask RNG stream back."""
    from verger.maeclip import mnist_pairs

    data = mnist_pairs(image_size=16).subset(range(0, 5000, 100))
    model_cfg = MAECLIPConfig(model_name="maeclip-micro")
    cfg = TrainConfig(steps=4, batch_size=16, warmup_steps=1, progress=False)
    straight = train(model_cfg, cfg, data)
    ckpt_cfg = TrainConfig(
        steps=4, batch_size=16, warmup_steps=1, progress=False, out_dir=folder, checkpoint_every=2
    )
    train(model_cfg, ckpt_cfg, data)
    dist.barrier()
    if dist.get_rank() == 0:  # interrupt after step 2
        ckpts = Path(folder) / "checkpoints"
        shutil.rmtree(ckpts / "step-00000004")
        (ckpts / "latest").write_text("step-00000002\n")
    dist.barrier()
    resumed = train(model_cfg, ckpt_cfg, data)
    return {
        "straight": [h["mae_loss"] for h in straight.history[2:]],
        "resumed": [h["mae_loss"] for h in resumed.history],
    }


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        yield from ((image, f"caption {i}") for i, image in enumerate(images))


def _odd_global_batch_error() -> str:
    """A global batch of 15 cannot split over 2 ranks; streamed data must not round it down."""
    cfg = TrainConfig(steps=2, batch_size=15, warmup_steps=0, progress=False)
    try:
        train(MAECLIPConfig(model_name="maeclip-micro"), cfg, _Stream())
    except ValueError as err:
        return str(err)
    return "no error"


def _all_checks(folder: str) -> dict:
    """One process launch (the costly part) for every two-rank check."""
    return {
        "full": _ddp_step("full"),
        "masked": _ddp_step("masked"),
        "train": _train_two_ranks(),
        "resume": _resume_two_ranks(folder),
        "odd_batch": _odd_global_batch_error(),
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return run_multiprocess(_all_checks, 2, str(tmp_path_factory.mktemp("run")), timeout=400)


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


def test_resume_under_two_processes_restores_every_ranks_masks(two_ranks):
    for rank, r in enumerate(two_ranks):
        resumed = r["resume"]
        assert resumed["resumed"] == resumed["straight"], f"rank {rank}"


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(two_ranks):
    for r in two_ranks:
        assert "batch_size=15 is not divisible by the 2 ranks" in r["odd_batch"]
