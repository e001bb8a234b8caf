"""The EM loop: purity on distinct languages, never an empty expert, exact resume, and the
score exchange as the only traffic between routers (4 processes, bytes counted)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from verger.core.distributed import run_multiprocess
from verger.smalltalk.data import SequenceSet
from verger.smalltalk.exchange import ProcessGroupExchange
from verger.smalltalk.metrics import routing_purity
from verger.smalltalk.routers import (
    _RouterState,
    em_batch,
    em_order,
    initial_assignment,
    load_routers,
    read_history,
    train_routers,
)
from verger.smalltalk.scoring import score_matrix
from verger.smalltalk.sharding import load_shard_index
from verger.smalltalk.toy import synthetic_sets, toy_config, write_model_folder


def test_routing_recovers_distinct_synthetic_languages(trained_folder):
    config = toy_config()
    history = read_history(trained_folder)["history"]
    assert history[0]["purity"] < 0.8  # the random start does not know the languages
    assert history[-1]["purity"] > 0.9  # fresh sequences of the last round
    assert load_shard_index(trained_folder).manifest["purity"] > 0.9  # the whole training set
    val = SequenceSet.load(trained_folder / "data" / "validation.safetensors")
    routers = load_routers(trained_folder, config.num_experts)
    routes = score_matrix(routers, val.tokens, config.prefix_len).argmax(dim=1)
    assert routing_purity(routes, val.domains, 4, 4)["purity"] > 0.9  # held out, no capacities


def test_every_round_fills_every_expert(trained_folder, tmp_path):
    for row in read_history(trained_folder)["history"]:
        assert row["shard_sizes"] == [32, 32, 32, 32]
    # one language only: nothing to tell apart, and still no expert is ever left empty
    sets = synthetic_sets(num_languages=1, per_language=103)
    config = toy_config(em_rounds=2, em_steps_per_round=2, em_sequences=None)
    write_model_folder(tmp_path, config, sets)
    result = train_routers(config, sets["train"], tmp_path, vocab_size=257, show_progress=False)
    for row in result.history:
        assert row.shard_sizes == [26, 26, 26, 25]


def test_routers_train_on_their_own_prefixes_of_fresh_sequences_each_round(tmp_path, monkeypatch):
    seen = []
    real = _RouterState.train_round

    def spy(self, prefixes, *args, **kwargs):
        seen.append(prefixes.clone())
        return real(self, prefixes, *args, **kwargs)

    monkeypatch.setattr(_RouterState, "train_round", spy)
    sets = synthetic_sets(per_language=24)  # 96 training sequences
    config = toy_config(em_rounds=3, em_steps_per_round=2, em_sequences=32)
    write_model_folder(tmp_path, config, sets)
    result = train_routers(config, sets["train"], tmp_path, vocab_size=257, show_progress=False)
    order = em_order(config, sets["train"], 0)
    batches = [em_batch(order, 32, r) for r in range(4)]
    assert len(set(torch.cat(batches[:3]).tolist())) == 96  # rounds 1-3: disjoint, fresh rows
    assert torch.equal(result.pool, batches[3])  # the last reassignment scored new rows again
    prefixes = sets["train"].tokens[:, : config.prefix_len]
    first = initial_assignment(32, 4, 0)
    assert len(seen) == 3 * 4  # every round, every router
    for e in range(4):  # round 1: each router on the prefixes of its random balanced part
        assert torch.equal(seen[e], prefixes[batches[0][first == e]])
    for r in (1, 2):  # later rounds: the routers split the round's fresh rows, 8 each
        parts = seen[4 * r : 4 * r + 4]
        assert [len(p) for p in parts] == [8, 8, 8, 8]
        got = sorted(map(tuple, torch.cat(parts).tolist()))
        assert got == sorted(map(tuple, prefixes[batches[r]].tolist()))


def test_em_resumes_exactly_after_a_stop(tmp_path):
    sets = synthetic_sets(per_language=24)
    config = toy_config(em_rounds=3, em_steps_per_round=4, em_sequences=32)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for folder in (whole, cut):
        write_model_folder(folder, config, sets)
    full = train_routers(config, sets["train"], whole, vocab_size=257, show_progress=False)
    # the same run stopped after round 2 (its checkpoint), then continued to round 3
    first = config.replace(em_rounds=2)
    train_routers(first, sets["train"], cut, vocab_size=257, show_progress=False)
    again = train_routers(config, sets["train"], cut, vocab_size=257, show_progress=False)
    assert [h.round for h in again.history] == [1, 2, 3]
    assert torch.equal(again.assignment, full.assignment)
    assert again.exchange == full.exchange  # the resumed run still counts rounds 1-2
    for e in range(4):
        a, b = full.routers[e].state_dict(), again.routers[e].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


# --- 4 router processes: only the scores cross, and they agree with the local run ------------


def _router_rank(folder: str) -> dict:
    """One router per rank; every collective call is recorded."""
    calls = []
    real = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def spy(name):
        def wrapped(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            calls.append((name, [tuple(t.shape) for t in tensors], [str(t.dtype) for t in tensors]))
            return real[name](*args, **kwargs)

        return wrapped

    for name in real:
        setattr(dist, name, spy(name))
    try:
        sets = synthetic_sets(per_language=24)
        config = toy_config(em_rounds=3, em_steps_per_round=4, em_sequences=32)
        exchange = ProcessGroupExchange(score_dtype=config.score_dtype)
        result = train_routers(
            config, sets["train"], folder, vocab_size=257, exchange=exchange, show_progress=False
        )
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    rank = exchange.owned()[0]
    return {
        "rank": rank,
        "assignment": result.assignment,
        "history": [h.shard_sizes for h in result.history],
        "router": result.routers[rank].state_dict(),
        "counter": exchange.counter.as_dict(),
        "calls": calls,
    }


_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "barrier",
)


def test_routers_in_four_processes_exchange_only_scores(tmp_path):
    folder = tmp_path / "dist"
    sets = synthetic_sets(per_language=24)
    config = toy_config(em_rounds=3, em_steps_per_round=4, em_sequences=32)
    write_model_folder(folder, config, sets)
    ranks = run_multiprocess(_router_rank, 4, str(folder), timeout=300)
    local_folder = tmp_path / "local"
    write_model_folder(local_folder, config, sets)
    local = train_routers(config, sets["train"], local_folder, vocab_size=257, show_progress=False)
    for out in ranks:
        # every collective any rank called: one all_gather of 32 fp32 scores per round
        assert out["calls"] == [("all_gather", [(32,)], ["torch.float32"])] * 3
        assert torch.equal(out["assignment"], local.assignment)  # same scores, same solver
        assert out["history"] == [h.shard_sizes for h in local.history]
        state = local.routers[out["rank"]].state_dict()
        assert all(torch.equal(out["router"][k], state[k]) for k in state)
    payload = sum(out["counter"]["all_gather_payload_bytes"] for out in ranks)
    assert payload == local.exchange["all_gather_payload_bytes"] == 3 * 4 * 32 * 4
    wire = sum(out["counter"]["all_gather_wire_bytes"] for out in ranks)
    assert wire == local.exchange["all_gather_wire_bytes"] == 3 * 4 * 3 * 32 * 4
    history = json.loads((folder / "routers" / "em_history.json").read_text())
    assert len(history["history"]) == 3


def test_exchange_size_must_match_the_config(tmp_path):
    from verger.smalltalk.exchange import LocalExchange

    sets = synthetic_sets(per_language=8)
    config = toy_config()
    with pytest.raises(ValueError, match="connects 3 routers, the config has num_experts=4"):
        train_routers(config, sets["train"], tmp_path, vocab_size=257, exchange=LocalExchange(3))
