"""balanced_assign: capacities, optimality against brute force and the exact solver, errors."""

import numpy as np
import pytest
import torch

from verger.smalltalk.assign import (
    balanced_assign,
    balanced_capacities,
    solve_balanced,
)
from verger.smalltalk.reference import brute_force_assign, greedy_assign_reference


def _counts(experts, num_experts):
    return np.bincount(np.asarray(experts), minlength=num_experts)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("method", ["exact", "fast"])
def test_optimal_on_small_cases_against_brute_force(seed, method):
    rng = np.random.default_rng(seed)
    n, num_experts = int(rng.integers(2, 8)), int(rng.integers(2, 4))
    scores = rng.normal(size=(n, num_experts)) * rng.choice([0.1, 1.0, 50.0])
    if seed % 3 == 0:  # ties
        scores = rng.integers(0, 3, size=(n, num_experts)).astype(float)
    capacity = [int(c) for c in rng.integers(0, n, size=num_experts)]
    while sum(capacity) < n:
        capacity[int(rng.integers(num_experts))] += 1
    best, _ = brute_force_assign(scores, capacity)
    result = solve_balanced(scores, capacity, method=method)
    experts = result.experts.numpy()
    assert (_counts(experts, num_experts) <= capacity).all()
    assert result.total == pytest.approx(best, abs=1e-9)
    assert result.total == pytest.approx(scores[np.arange(n), experts].sum(), abs=1e-12)
    assert result.upper_bound == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize(
    ("kind", "n", "num_experts"),
    [
        ("gauss", 400, 4),
        ("clustered", 600, 8),
        ("dominant", 300, 4),
        ("ties", 500, 6),
        ("gauss", 160, 32),
    ],
)
def test_fast_matches_the_exact_optimum(kind, n, num_experts):
    rng = np.random.default_rng(n + num_experts)
    scores = rng.normal(size=(n, num_experts))
    if kind == "clustered":  # log-likelihood-like: a shared offset per row, a bonus for one expert
        scores = scores * 3 - 200 + rng.normal(size=(n, 1)) * 40
        scores[np.arange(n), rng.integers(0, num_experts, n)] += 6
    elif kind == "dominant":  # every row prefers expert 0: capacities decide everything
        scores[:, 0] += 5
    elif kind == "ties":
        scores = rng.integers(0, 3, size=(n, num_experts)).astype(float)
    capacity = balanced_capacities(n, num_experts)
    exact = solve_balanced(scores, capacity, method="exact")
    fast = solve_balanced(scores, capacity, method="fast")
    greedy = solve_balanced(scores, capacity, method="greedy")
    for result in (exact, fast, greedy):
        assert (_counts(result.experts, num_experts) == capacity).all()
    assert fast.total == pytest.approx(exact.total, rel=1e-12, abs=1e-9)
    # the certificate: the dual bound of the fast solver is the optimum
    assert fast.upper_bound == pytest.approx(exact.total, rel=1e-12, abs=1e-9)
    assert fast.relative_gap < 1e-12
    assert greedy.total <= exact.total + 1e-9


def test_spare_room_is_used_only_where_it_pays():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(50, 3))
    scores[:, 2] += 3  # everyone wants expert 2, which has room for 40
    capacity = [20, 20, 40]
    exact = solve_balanced(scores, capacity, method="exact")
    fast = solve_balanced(scores, capacity, method="fast")
    assert fast.total == pytest.approx(exact.total, abs=1e-9)
    assert fast.upper_bound == pytest.approx(exact.total, abs=1e-9)
    assert (_counts(fast.experts, 3) <= capacity).all()
    assert _counts(fast.experts, 3)[2] == 40


@pytest.mark.parametrize("seed", range(6))
def test_vectorized_greedy_is_the_papers_sequential_rule(seed):
    rng = np.random.default_rng(seed)
    n, num_experts = 300, int(rng.integers(2, 7))
    scores = np.round(rng.normal(size=(n, num_experts)), 1)  # ties in order and in choice
    capacity = balanced_capacities(n, num_experts)
    if seed % 2:
        capacity = [c + 5 for c in capacity]
    got = balanced_assign(scores, capacity, method="greedy").numpy()
    assert (got == greedy_assign_reference(scores, capacity)).all()


def test_degenerate_scores_leave_no_expert_empty():
    # one expert explains everything far better; balanced capacities still fill every expert
    scores = torch.zeros(103, 4)
    scores[:, 1] = 100.0
    for method in ("exact", "fast", "greedy"):
        experts = balanced_assign(scores, balanced_capacities(103, 4), method=method)
        assert _counts(experts, 4).tolist() == [26, 26, 26, 25]


def test_auto_picks_exact_for_small_and_fast_for_large(monkeypatch):
    import verger.smalltalk.assign as assign

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(64, 4))
    assert solve_balanced(scores, 16).method == "exact"
    monkeypatch.setattr(assign, "AUTO_EXACT_ENTRIES", 10)
    result = solve_balanced(scores, 16)
    assert result.method == "fast"
    assert result.total == pytest.approx(solve_balanced(scores, 16, method="exact").total)


def test_inputs_are_accepted_as_torch_or_numpy_and_capacity_as_int_or_list():
    scores = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]], dtype=torch.float16)
    assert balanced_assign(scores, 2).tolist() == [1, 0, 1]
    assert balanced_assign(scores.double().numpy(), [1, 2]).tolist() == [1, 0, 1]
    assert balanced_assign(scores, torch.tensor([3, 0])).tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("scores", "capacity", "error", "match"),
    [
        (np.zeros((4, 1)), 4, ValueError, "E >= 2"),
        (np.zeros((5, 2)), 2, ValueError, "hold 4 sequences but there are N=5"),
        (np.zeros((5, 2)), [4, 0], ValueError, "hold 4 sequences"),
        (np.zeros((5, 2)), [4, -1], ValueError, "must be >= 0"),
        (np.zeros((5, 2)), [5], ValueError, "must hold 2 ints"),
        (np.zeros((5, 2)), 2.5, TypeError, "capacity must be an int"),
        (np.zeros((5, 2)), True, TypeError, "capacity must be an int"),
        (np.zeros((0, 2)), 2, ValueError, "no rows"),
        (np.zeros(5), 5, ValueError, r"must be \[N, E\]"),
        (np.array([[0.0, np.nan]]), 1, ValueError, "NaN or inf"),
        (np.zeros((2, 2), dtype=np.int64), 1, TypeError, "floating point"),
        ([[0.0, 1.0]], 1, TypeError, "torch.Tensor or numpy array"),
    ],
)
def test_bad_input_is_a_clear_error(scores, capacity, error, match):
    with pytest.raises(error, match=match):
        balanced_assign(scores, capacity)


def test_bad_method_and_exact_size_limit(monkeypatch):
    import verger.smalltalk.assign as assign

    with pytest.raises(ValueError, match="method='nope' must be one of"):
        balanced_assign(np.zeros((2, 2)), 1, method="nope")
    monkeypatch.setattr(assign, "EXACT_MAX_ENTRIES", 10)
    with pytest.raises(ValueError, match="use method='fast'"):
        balanced_assign(np.zeros((8, 2)), 4, method="exact")


def test_balanced_capacities():
    assert balanced_capacities(10, 4) == [3, 3, 2, 2]
    assert balanced_capacities(8, 4) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="num_experts=1 must be an int >= 2"):
        balanced_capacities(10, 1)
