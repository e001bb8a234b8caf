"""Sharding: a partition of the training set, written once, resumable by chunks."""

from __future__ import annotations

import os

import pytest
import torch

import verger.smalltalk.sharding as sharding
from verger.smalltalk.data import SequenceSet
from verger.smalltalk.routers import load_routers, routers_fingerprint
from verger.smalltalk.sharding import load_shard_index, shard_corpus
from verger.smalltalk.toy import toy_config


def _shard(folder, **kwargs):
    config = toy_config()
    return shard_corpus(
        config,
        folder,
        routers=load_routers(folder, config.num_experts),
        train=SequenceSet.load(folder / "data" / "train.safetensors"),
        routers_fingerprint=routers_fingerprint(folder, config.num_experts),
        show_progress=False,
        **kwargs,
    )


def test_shards_partition_the_training_set_in_balanced_parts(trained_folder):
    index = load_shard_index(trained_folder)
    train = SequenceSet.load(trained_folder / "data" / "train.safetensors")
    ids = torch.cat([index.load_shard(e).ids for e in range(4)])
    assert sorted(ids.tolist()) == list(range(len(train)))  # every sequence exactly once
    assert index.counts == [96, 96, 96, 96]
    for e in range(4):
        shard = index.load_shard(e)
        assert torch.equal(shard.tokens, train.tokens[shard.ids])
        assert bool((index.experts[shard.ids] == e).all())
    exchange = index.manifest["exchange"]
    assert exchange["all_gather_payload_bytes"] == 4 * len(train) * 4  # one fp32 score each


def test_the_index_is_written_once(model_copy):
    manifest = model_copy / "shards" / "manifest.json"
    before = manifest.stat().st_mtime_ns, (model_copy / "shards" / "index.safetensors").read_bytes()
    again = _shard(model_copy)
    after = manifest.stat().st_mtime_ns, (model_copy / "shards" / "index.safetensors").read_bytes()
    assert before == after
    assert torch.equal(again.experts, load_shard_index(model_copy).experts)


def test_a_killed_shard_job_resumes_from_its_saved_chunks(model_copy, monkeypatch):
    reference = load_shard_index(model_copy)
    for name in os.listdir(model_copy / "shards"):
        path = model_copy / "shards" / name
        if path.is_file():
            path.unlink()
    for chunk in (model_copy / "shards" / "scores").iterdir():
        chunk.unlink()
    calls = []
    real = sharding.score_matrix

    def dies_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while scoring the third chunk
        return real(*args, **kwargs)

    monkeypatch.setattr(sharding, "score_matrix", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        _shard(model_copy, chunk_size=100)
    assert not (model_copy / "shards" / "manifest.json").exists()  # not complete, not written
    assert len(list((model_copy / "shards" / "scores").iterdir())) == 2
    calls.clear()
    resumed = _shard(model_copy, chunk_size=100)
    assert len(calls) == 2  # chunks 3 and 4 only: 1 and 2 came from disk
    assert torch.equal(resumed.experts, reference.experts)


def test_a_shard_of_other_routers_is_refused(model_copy):
    config = toy_config()
    with pytest.raises(ValueError, match="holds a shard of other routers or data"):
        shard_corpus(
            config,
            model_copy,
            routers=load_routers(model_copy, 4),
            train=SequenceSet.load(model_copy / "data" / "train.safetensors"),
            routers_fingerprint="0000000000000000",
        )


def test_missing_shard_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not sharded yet"):
        load_shard_index(tmp_path)
