from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from torch.utils.data import Dataset

from verger.core.train import CheckpointError
from verger.maeclip import (
    MAECLIPConfig,
    TrainConfig,
    WebDatasetShards,
    train,
    train_test_split,
    write_webdataset_shards,
)
from verger.maeclip.evaluate import zero_shot_accuracy
from verger.maeclip.train import StepBatchSampler

MICRO = MAECLIPConfig(model_name="maeclip-micro")


def _cfg(**kw):
    base = dict(steps=6, batch_size=16, warmup_steps=1, progress=False, lr=3e-3)
    return TrainConfig(**(base | kw))


def test_resume_reproduces_the_uninterrupted_run(tmp_path, mnist_micro):
    data = mnist_micro.subset(range(64))
    straight = train(MICRO, _cfg(), data)
    first = train(MICRO, _cfg(steps=6, out_dir=tmp_path, checkpoint_every=3, log_every=1), data)
    assert (tmp_path / "checkpoints" / "step-00000006").is_dir()
    # interrupt after step 3: drop the final checkpoint and resume
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000006")
    (tmp_path / "checkpoints" / "latest").write_text("step-00000003\n")
    resumed = train(MICRO, _cfg(steps=6, out_dir=tmp_path, checkpoint_every=3, log_every=1), data)
    assert resumed.resumed_from == 3
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[3:]]
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values()
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [h["loss"] for h in first.history] == [h["loss"] for h in straight.history]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 1 and "mae_loss" in json.loads(lines[0])
    # steps 4-6 ran twice (first run, then the resume): the log keeps one record of each
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_sampler_batches_cover_the_epoch_and_split_ranks():
    full = list(StepBatchSampler(10, batch_size=4, steps=2, seed=0))
    assert len({i for b in full for i in b}) == 8
    halves = [
        list(StepBatchSampler(10, batch_size=4, steps=2, seed=0, rank=r, world=2)) for r in (0, 1)
    ]
    assert [a + b for a, b in zip(*halves)] == full
    later = list(StepBatchSampler(10, batch_size=4, steps=2, seed=0, start=1))
    assert later == full[1:]
    with pytest.raises(ValueError, match="not divisible"):
        StepBatchSampler(10, batch_size=5, steps=1, seed=0, world=2)


def test_train_config_validation():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=5, warmup_steps=5)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="out_dir"):
        TrainConfig(checkpoint_every=10)


def test_clip_training_learns_zero_shot_digits(mnist_micro, tokenizer_micro):
    """Convergence bound: 80 CLIP steps on MNIST captions beat chance (10%) by far."""
    train_set, test_set = train_test_split(mnist_micro, test_size=500)
    cfg = MICRO.for_method("clip")
    result = train(cfg, _cfg(steps=80, batch_size=64, warmup_steps=5), train_set)
    assert result.history[-1]["clip_loss"] < result.history[0]["clip_loss"] - 0.5
    assert zero_shot_accuracy(result.model, tokenizer_micro, test_set) > 0.3


def test_mae_training_lowers_the_reconstruction_loss(mnist_micro):
    result = train(MICRO.for_method("mae"), _cfg(steps=40, batch_size=64), mnist_micro)
    first = sum(h["mae_loss"] for h in result.history[:5]) / 5
    last = sum(h["mae_loss"] for h in result.history[-5:]) / 5
    assert last < 0.8 * first


class _MapStyle(Dataset):
    """A plain map-style dataset (the CSV/folder path): batches come through a DataLoader."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        return self.pairs[index]


@pytest.mark.parametrize("source", ["map-style", "webdataset"])
def test_resume_is_exact_for_loader_fed_and_streamed_data(tmp_path, mnist_micro, source):
    pairs = mnist_micro.subset(range(24))
    if source == "webdataset":
        shards = write_webdataset_shards(pairs, tmp_path / "shards", per_shard=8)

        def dataset():
            return WebDatasetShards(shards, image_size=16, shuffle=True, seed=0)
    else:

        def dataset():
            return _MapStyle(pairs)

    # 3 batches of 8 per epoch: the resume point (step 4) sits inside the second epoch
    cfg = _cfg(steps=6, batch_size=8, out_dir=tmp_path / "run", checkpoint_every=4)
    straight = train(MICRO, _cfg(steps=6, batch_size=8), dataset())
    train(MICRO, cfg, dataset())
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.rmtree(ckpts / "step-00000006")
    (ckpts / "latest").write_text("step-00000004\n")
    resumed = train(MICRO, cfg, dataset())
    assert resumed.resumed_from == 4
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[4:]]
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values()
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path, mnist_micro):
    data = mnist_micro.subset(range(32))
    cfg = _cfg(steps=3, out_dir=tmp_path, log_every=1)
    train(MICRO, cfg, data)
    shutil.rmtree(tmp_path / "checkpoints")  # as if killed after logging, before any save
    assert train(MICRO, cfg, data).resumed_from is None  # starts over...
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]  # ...and its log with it


def test_train_refuses_checkpoints_that_would_train_nothing_or_mix_runs(tmp_path, mnist_micro):
    data = mnist_micro.subset(range(32))
    train(MICRO, _cfg(steps=2, out_dir=tmp_path), data)
    with pytest.raises(ValueError, match="already reaches steps=2"):
        train(MICRO, _cfg(steps=2, out_dir=tmp_path), data)  # nothing left to train
    with pytest.raises(ValueError, match="already reaches steps=1"):
        train(MICRO, _cfg(steps=1, warmup_steps=0, out_dir=tmp_path), data)
    with pytest.raises(ValueError, match="earlier run"):
        train(MICRO, _cfg(steps=4, out_dir=tmp_path), data, resume=False)
    assert train(MICRO, _cfg(steps=3, out_dir=tmp_path), data).resumed_from == 2


def test_resuming_a_checkpoint_of_another_model_size_is_one_clear_error(tmp_path, mnist_micro):
    data = mnist_micro.subset(range(32))
    train(MICRO, _cfg(steps=2, out_dir=tmp_path), data)
    narrower = MAECLIPConfig(model_name="maeclip-micro", decoder_width=32)
    with pytest.raises(CheckpointError) as info:
        train(narrower, _cfg(steps=4, out_dir=tmp_path), data)
    message = str(info.value)
    assert "holds a model of another shape" in message
    # names a differing decoder tensor with both shapes (width 64 saved, 32 now)
    shapes = r"decoder\.\S+ \[[^\]]*64[^\]]*\] saved, \[[^\]]*32[^\]]*\] now"
    assert re.search(shapes, message), message
    assert "\n" not in message  # one line, not torch's size-mismatch listing


def test_a_killed_run_is_loaded_not_retrained_and_keeps_its_figures(tmp_path, mnist_micro):
    from verger.maeclip import load_finished

    data = mnist_micro.subset(range(32))
    cfg = _cfg(steps=2, out_dir=tmp_path)
    assert load_finished(MICRO, cfg) is None  # nothing trained yet
    done = train(MICRO, cfg, data)
    again = load_finished(MICRO, cfg)
    assert again is not None and again.resumed_from == 2
    assert again.history == done.history[-1:] and again.images_per_s == done.images_per_s
    for a, b in zip(done.model.state_dict().values(), again.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert load_finished(MICRO, _cfg(steps=3, out_dir=tmp_path)) is None  # not at its end


def test_a_nan_loss_stops_training_with_cores_error(mnist_micro):
    from verger.core.train import NonFiniteLossError

    data = mnist_micro.subset(range(32))
    data.images[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 0"):
        train(MICRO, _cfg(steps=2), data)
