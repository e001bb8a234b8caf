"""The bench's experiment design: held-out halves for tuning and testing, each model at its
own learning rate, ratios against the tuned dense model, scoring a part of the held-out set."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from verger.smalltalk.bench import _combine
from verger.smalltalk.config import SmallTalkConfig
from verger.smalltalk.data import DATA_DIR, SequenceSet, heldout_halves
from verger.smalltalk.evaluation import evaluate
from verger.smalltalk.experts import expert_folder, load_expert, train_expert
from verger.smalltalk.model import sequence_losses


def test_heldout_halves_split_each_domain_in_two_contiguous_halves():
    domains = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, -1, -1])
    seqs = SequenceSet(
        torch.zeros(len(domains), 5, dtype=torch.int16), domains, ["a", "b", "c"],
        torch.arange(len(domains)),
    )  # fmt: skip
    tune, test = heldout_halves(seqs)
    assert tune.tolist() == [0, 1, 5, 8]  # the first half (rounded down) of each domain
    assert test.tolist() == [2, 3, 4, 6, 7, 9, 10, 11]  # the rest, unknown domains included
    assert sorted(tune.tolist() + test.tolist()) == list(range(len(domains)))


def _dense_weights(folder, out):
    train_expert(folder, "dense", out=out, resume=False, show_progress=False)
    return load_file(str(out / "model" / "model.safetensors"))


def test_dense_lr_sets_the_dense_models_rate_only(model_copy, tmp_path):
    config = SmallTalkConfig.load(model_copy)
    config.replace(dense_lr=4 * config.lr).save(model_copy)
    own = _dense_weights(model_copy, tmp_path / "own")
    expert = load_file(str(expert_folder(model_copy, 0) / "model" / "model.safetensors"))
    train_expert(model_copy, 0, out=tmp_path / "e0", resume=False, show_progress=False)
    again = load_file(str(tmp_path / "e0" / "model" / "model.safetensors"))
    assert all(torch.equal(expert[k], again[k]) for k in expert)  # experts keep ``lr``
    config.replace(lr=4 * config.lr).save(model_copy)
    same = _dense_weights(model_copy, tmp_path / "same")
    assert all(torch.equal(own[k], same[k]) for k in own)  # dense_lr acts as the dense lr
    config.save(model_copy)
    base = _dense_weights(model_copy, tmp_path / "base")
    assert not all(torch.equal(own[k], base[k]) for k in own)


def test_evaluate_scores_only_the_given_rows(trained_folder):
    val = SequenceSet.load(trained_folder / DATA_DIR / "validation.safetensors")
    rows = torch.arange(0, len(val), 3)
    metrics = evaluate(trained_folder, prefix_lens=(), rows=rows).metrics
    dense = load_expert(trained_folder, "dense")
    losses = sequence_losses(dense, val.tokens[rows])
    assert metrics["eval_sequences"] == len(rows)
    assert metrics["ppl_dense"] == pytest.approx(float(losses.mean().exp()), rel=1e-5)


def test_ratios_are_taken_against_the_tuned_dense_model():
    mixture = {"ppl_mixture": 10.0, "ppl_dense": 8.0, "ppl_ratio_vs_dense": 1.25,
               "ppl_ratio_vs_dense_prefix8": 1.5, "routing_purity_by_domain": 0.7}  # fmt: skip
    row = _combine(mixture, {"ppl_dense": 9.0})
    assert row["ppl_dense"] == 9.0
    assert row["ppl_ratio_vs_dense"] == pytest.approx(10.0 / 9.0)
    assert row["ppl_ratio_vs_dense_prefix8"] == pytest.approx(1.5 * 8.0 / 9.0)
    assert row["routing_purity_by_domain"] == 0.7
