"""Inference: loading a model folder in one call, routing, scoring, generating, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from verger.smalltalk.data import SequenceSet
from verger.smalltalk.model import SmallTalkLM
from verger.smalltalk.reference import route_reference


@pytest.fixture(scope="module")
def model(trained_folder):
    return SmallTalkLM.from_pretrained(trained_folder)


@pytest.fixture(scope="module")
def val(trained_folder):
    return SequenceSet.load(trained_folder / "data" / "validation.safetensors")


def test_routing_is_the_argmax_of_router_likelihoods(model, val):
    for m in (2, 5, 12, 32):
        routes = model.route(val.tokens[:6, :32], m)
        for i in range(6):
            assert int(routes[i]) == route_reference(list(model.routers), val.tokens[i].long(), m)


def test_score_uses_exactly_one_expert_per_sequence(model, val):
    result = model.score(val, 12)
    assert result.tokens == 32 and result.tokens_after_prefix == 21
    for i in (0, 7, 30):
        expert = model.experts[int(result.experts[i])]
        row = val.tokens[i : i + 1].long()
        loss = expert(row[:, :-1], row[:, 1:]).loss  # the expert's mean token NLL
        torch.testing.assert_close(result.nll[i], loss * 32, rtol=1e-5, atol=1e-4)
        logits = expert(row[:, :-1]).logits[0].double()
        nll = -torch.log_softmax(logits, -1)[torch.arange(32), row[0, 1:]]
        torch.testing.assert_close(
            result.nll_after_prefix[i].double(), nll[11:].sum(), rtol=1e-5, atol=1e-4
        )
    assert result.perplexity == pytest.approx(
        float(torch.exp(result.nll.double().sum() / (32 * len(val)))), rel=1e-9
    )


def test_generate_routes_the_prompt_then_continues_it(model, val):
    prompt = val.tokens[:1, :10].long()
    out, expert = model.generate(prompt, 6, greedy=True)
    assert out.shape == (1, 16) and torch.equal(out[:, :10], prompt)
    assert expert == int(model.route(prompt, 10)[0])
    assert torch.equal(out, model.experts[expert].generate(prompt, 6, greedy=True))
    text, expert = model.generate("hello world, this is", 5, greedy=True)
    assert isinstance(text, str) and 0 <= expert < 4


def test_bad_prefixes_are_clear_errors(model, val):
    with pytest.raises(ValueError, match="prefix_len=33 is longer than the sequence"):
        model.score(val, 33)
    with pytest.raises(ValueError, match="prefix_len=1 must be an int >= 2"):
        model.route(val.tokens[:, :32], 1)
    with pytest.raises(ValueError, match="prompt must be >= 2 tokens"):
        model.generate(val.tokens[:1, :1].long(), 3)


def test_a_missing_expert_folder_is_a_clear_error(model_copy):
    shutil.rmtree(model_copy / "experts" / "expert-02")
    with pytest.raises(FileNotFoundError, match=r"expert 2's folder .* is missing: train it with"):
        SmallTalkLM.from_pretrained(model_copy)


def test_an_expert_of_another_shard_is_refused(model_copy):
    info = model_copy / "experts" / "expert-01" / "expert.json"
    record = json.loads(info.read_text())
    record["source"] = "shards:0123456789abcdef"
    info.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="expert 1 was trained on another shard"):
        SmallTalkLM.from_pretrained(model_copy)


def test_retrained_routers_make_the_shard_stale(model_copy):
    from verger.smalltalk.routers import new_model, router_dir

    router = new_model(SmallTalkLM.from_pretrained(model_copy).routers[0].config, seed=99)
    router.save_pretrained(router_dir(model_copy, 0))
    with pytest.raises(ValueError, match="shards was made by other routers"):
        SmallTalkLM.from_pretrained(model_copy)


def test_inference_benchmark_times_every_path_against_the_dense_model(trained_folder):
    from verger.smalltalk.bench import inference_benchmark

    out = inference_benchmark(
        trained_folder, rows=16, prefix_lens=(8, 0), device=torch.device("cpu"), repeats=1
    )
    assert out["inference_rows"] == 16
    for prefix in ("8", "full", "12"):  # the asked prefixes and the config's (12)
        ratio = out[f"inference_time_ratio_vs_dense_prefix{prefix}"]
        seconds = out[f"inference_seconds_mixture_prefix{prefix}"]
        assert ratio == pytest.approx(seconds / out["inference_seconds_dense"])
        assert out[f"routing_time_fraction_prefix{prefix}"] > 0
    assert out["routing_time_fraction"] == out["routing_time_fraction_prefix12"]
