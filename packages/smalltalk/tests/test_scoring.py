"""Prefix scoring against the position-by-position reference; exchange byte counts."""

import pytest
import torch

from verger.core.testing import tiny_config
from verger.smalltalk.exchange import LocalExchange
from verger.smalltalk.reference import prefix_log_likelihood_reference, route_reference
from verger.smalltalk.routers import new_model
from verger.smalltalk.scoring import prefix_scores, score_matrix


@pytest.mark.parametrize("fused", [False, True])
def test_prefix_scores_match_the_reference(fused):
    model = new_model(tiny_config(fused=fused), seed=1).eval()
    tokens = torch.randint(0, 61, (5, 20), generator=torch.Generator().manual_seed(0))
    got = prefix_scores(model, tokens, 9, batch_size=2)
    want = torch.tensor(
        [prefix_log_likelihood_reference(model, row, 9) for row in tokens], dtype=torch.float64
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    # only the first M tokens count: changing a later token changes nothing
    changed = tokens.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 61
    assert torch.equal(prefix_scores(model, changed, 9), prefix_scores(model, tokens, 9))


def test_batching_does_not_change_scores_and_columns_are_routers():
    routers = [new_model(tiny_config(), seed=s).eval() for s in range(3)]
    tokens = torch.randint(0, 61, (7, 16), generator=torch.Generator().manual_seed(1))
    full = score_matrix(routers, tokens, 16, batch_size=7)
    assert full.shape == (7, 3)
    torch.testing.assert_close(score_matrix(routers, tokens, 16, batch_size=3), full)
    for r, router in enumerate(routers):
        torch.testing.assert_close(full[:, r], prefix_scores(router, tokens, 16))
    best = full.argmax(dim=1)
    for i in range(7):
        assert int(best[i]) == route_reference(routers, tokens[i], 16)


def test_scoring_errors_are_clear():
    model = new_model(tiny_config(), seed=0)
    tokens = torch.randint(0, 61, (3, 10))
    with pytest.raises(ValueError, match="prefix of 11 tokens is longer than the sequences"):
        prefix_scores(model, tokens, 11)
    with pytest.raises(ValueError, match="prefix_len=1 must be an int >= 2"):
        prefix_scores(model, tokens, 1)
    with pytest.raises(TypeError, match="integer ids"):
        prefix_scores(model, tokens.float(), 4)
    with pytest.raises(ValueError, match=r"\[N > 0, length\]"):
        prefix_scores(model, tokens[:0], 4)


def test_local_exchange_counts_an_all_gather_and_rounds_to_the_wire_precision():
    scores = torch.randn(100, 4, dtype=torch.float64) * 100
    exchange = LocalExchange(4, score_dtype="float16")
    got = exchange.gather(scores)
    assert got.dtype == torch.float32
    assert torch.equal(got, scores.half().float())
    counts = exchange.counter.as_dict()
    assert counts["all_gather_calls"] == 4  # one per router
    assert counts["all_gather_payload_bytes"] == 4 * 100 * 2  # N fp16 scores per router
    assert counts["all_gather_wire_bytes"] == 4 * 3 * 100 * 2  # ring: (E - 1) x N each
    with pytest.raises(ValueError, match=r"must be \[N, 4\]"):
        exchange.gather(scores[:, :3])
    with pytest.raises(ValueError, match="score_dtype='int8'"):
        LocalExchange(4, score_dtype="int8")
    with pytest.raises(ValueError, match="num_experts=1"):
        LocalExchange(1)
