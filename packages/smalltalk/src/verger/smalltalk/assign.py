"""Balanced assignment: give each sequence one expert, maximize the total score, respect capacities.

The problem (a transportation problem): ``scores`` is ``[N, E]`` (higher is better, e.g. the
log-likelihood of a sequence's prefix under each router) and expert ``e`` may take at most
``capacity[e]`` sequences, with ``sum(capacity) >= N``. Three solvers:

- ``"exact"``: :func:`scipy.optimize.linear_sum_assignment` on the ``N x sum(capacity)``
  matrix of capacity slots. Optimal; for small inputs (memory ``N x sum(capacity)``).
- ``"fast"``: for millions of sequences. The greedy assignment below, then cycle canceling:
  while moving sequences around a cycle of experts raises the total, do it (the best ``k``
  movers of every edge ``a -> b`` of the cycle at once, ``k`` as large as still pays; cycles
  on disjoint experts in the same pass). Expert counts never change along a cycle, so
  capacities hold. With no improving cycle left the assignment is optimal (up to a float
  tolerance), and the longest-path potentials of the ``E``-node exchange graph are optimal
  dual prices ``p``: ``g(p) = sum_i max_e (s_ie - p_e) + sum_e c_e p_e`` bounds the optimum
  from above for any ``p >= 0`` (weak duality), so every answer carries a certified gap.
  ``O(N E)`` per pass.
- ``"greedy"``: the paper's rule (SmallTalk LM, Alg. 1): sequences in order of their best
  score, most confident first, each to its best expert that is not yet full.

``"auto"`` is exact while the slot matrix stays small, else fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

METHODS = ("auto", "exact", "fast", "greedy")
EXACT_MAX_ENTRIES = 25_000_000  # N x slots of the exact solver's cost matrix (200 MB float64)
AUTO_EXACT_ENTRIES = 1_000_000  # "auto" is exact below this (well under a second)
_TOL = 1e-12  # relative to the largest |score|: gains below it are float noise


@dataclass(frozen=True)
class Assignment:
    """A feasible assignment and what is known about its optimality.

    ``experts``: int64 ``[N]``; ``total``: the sum of the chosen scores; ``upper_bound``:
    an upper bound on the optimal total (``total`` itself for the exact solver, the dual
    bound ``g(prices)`` for the fast one, None for greedy); ``prices``: the fast solver's
    dual prices (the optimal ones when it finished).
    """

    experts: torch.Tensor
    total: float
    upper_bound: float | None
    method: str
    prices: np.ndarray | None = None

    @property
    def gap(self) -> float | None:
        """``upper_bound - total`` (>= 0): how far from optimal the total can be, at most."""
        return None if self.upper_bound is None else max(0.0, self.upper_bound - self.total)

    @property
    def relative_gap(self) -> float | None:
        """:attr:`gap` relative to ``|total|``."""
        gap = self.gap
        return None if gap is None else gap / max(abs(self.total), 1e-300)


def balanced_capacities(n: int, num_experts: int) -> list[int]:
    """Capacities summing to exactly ``n``, differing by at most one: every expert gets at
    least ``n // num_experts`` sequences, so none is empty when ``n >= num_experts``."""
    for name, value, low in (("n", n, 0), ("num_experts", num_experts, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"balanced_capacities: {name}={value!r} must be an int >= {low}")
    base, extra = divmod(n, num_experts)
    return [base + (1 if e < extra else 0) for e in range(num_experts)]


def _check(scores: object, capacity: object) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(scores, torch.Tensor):
        if not scores.is_floating_point():
            raise TypeError(f"balanced_assign: scores must be floating point, got {scores.dtype}")
        array = scores.detach().to("cpu", torch.float64).numpy()
    elif isinstance(scores, np.ndarray):
        if not np.issubdtype(scores.dtype, np.floating):
            raise TypeError(f"balanced_assign: scores must be floating point, got {scores.dtype}")
        array = scores.astype(np.float64, copy=False)
    else:
        raise TypeError(
            f"balanced_assign: scores must be a torch.Tensor or numpy array, got "
            f"{type(scores).__name__}"
        )
    if array.ndim != 2:
        raise ValueError(f"balanced_assign: scores must be [N, E], got shape {array.shape}")
    n, num_experts = array.shape
    if num_experts < 2:
        raise ValueError(
            f"balanced_assign: scores has E={num_experts} expert column(s); a mixture needs E >= 2"
        )
    if n == 0:
        raise ValueError("balanced_assign: scores has no rows (no sequence to assign)")
    if not np.isfinite(array).all():
        raise ValueError("balanced_assign: scores hold NaN or inf; every score must be finite")
    if isinstance(capacity, bool):
        raise TypeError("balanced_assign: capacity must be an int or a sequence of E ints")
    if isinstance(capacity, int | np.integer):
        caps = np.full(num_experts, int(capacity), dtype=np.int64)
    elif isinstance(capacity, Sequence | np.ndarray | torch.Tensor):
        values = list(np.asarray(capacity).reshape(-1).tolist())
        if len(values) != num_experts or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            raise ValueError(
                f"balanced_assign: capacity={capacity!r} must hold {num_experts} ints (one per expert)"
            )
        caps = np.asarray(values, dtype=np.int64)
    else:
        raise TypeError(
            f"balanced_assign: capacity must be an int or a sequence of ints, got "
            f"{type(capacity).__name__}"
        )
    if (caps < 0).any():
        raise ValueError(f"balanced_assign: capacity={caps.tolist()} must be >= 0")
    if int(caps.sum()) < n:
        raise ValueError(
            f"balanced_assign: capacities {caps.tolist()} hold {int(caps.sum())} sequences but "
            f"there are N={n}; the capacities must sum to at least N"
        )
    return np.asfortranarray(array), caps


def solve_balanced(
    scores: torch.Tensor | np.ndarray,
    capacity: int | Sequence[int],
    *,
    method: str = "auto",
    max_cycles: int = 100_000,
) -> Assignment:
    """Assign each row of ``scores`` ``[N, E]`` to one expert within ``capacity``.

    ``capacity``: one int for every expert or ``E`` ints, summing to at least N. ``method``:
    see the module docstring. ``max_cycles`` bounds the fast solver's canceled cycles (it
    stops earlier, at the optimum; the bound says how close it got either way).
    Raises ``ValueError`` for E < 2, no rows, non-finite scores, capacities that cannot hold
    the N sequences, or an exact problem too large to hold in memory.
    """
    if method not in METHODS:
        raise ValueError(f"balanced_assign: method={method!r} must be one of {METHODS}")
    if isinstance(max_cycles, bool) or not isinstance(max_cycles, int) or max_cycles < 0:
        raise ValueError(f"balanced_assign: max_cycles={max_cycles!r} must be an int >= 0")
    array, caps = _check(scores, capacity)
    n = array.shape[0]
    caps = np.minimum(caps, n)  # room beyond N sequences is never used
    slots = int(caps.sum())
    if method == "auto":
        method = "exact" if n * slots <= AUTO_EXACT_ENTRIES else "fast"
    if method == "exact":
        if n * slots > EXACT_MAX_ENTRIES:
            raise ValueError(
                f"balanced_assign: the exact solver needs an N x slots = {n} x {slots} matrix "
                f"(> {EXACT_MAX_ENTRIES} entries); use method='fast' for large inputs"
            )
        experts = _exact(array, caps)
        total = _total(array, experts)
        return Assignment(_as_tensor(experts), total, total, "exact")
    if method == "greedy":
        experts = _greedy(array, caps, np.argsort(-array.max(axis=1), kind="stable"))
        return Assignment(_as_tensor(experts), _total(array, experts), None, "greedy")
    experts = _greedy(array, caps, np.argsort(-array.max(axis=1), kind="stable"))
    experts, prices = _cancel_cycles(array, caps, experts, max_cycles)
    bound = _dual_value(array, caps, prices)
    return Assignment(_as_tensor(experts), _total(array, experts), bound, "fast", prices)


def balanced_assign(
    scores: torch.Tensor | np.ndarray, capacity: int | Sequence[int], *, method: str = "auto"
) -> torch.Tensor:
    """The expert of each sequence (int64 ``[N]``); see :func:`solve_balanced`."""
    return solve_balanced(scores, capacity, method=method).experts


def _dual_value(array: np.ndarray, caps: np.ndarray, prices: np.ndarray) -> float:
    """``g(p)`` at ``p`` shifted to ``min(p) = 0``: still ``p >= 0``, and the shift lowers
    ``g`` by ``(sum(caps) - N) min(p) >= 0``, so the bound only tightens."""
    p = prices - prices.min()
    return float((array - p).max(axis=1).sum() + (caps * p).sum())


def _row_argmax(array: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Per row, the argmax over ``columns`` only (lowest column on ties), column by column:
    NumPy reductions along a short row axis are many times slower."""
    best = array[:, columns[0]].copy()
    arg = np.full(array.shape[0], columns[0], dtype=np.int64)
    for e in columns[1:]:
        better = array[:, e] > best
        arg[better] = e
        best = np.where(better, array[:, e], best)
    return arg


def _cancel_cycles(
    array: np.ndarray, caps: np.ndarray, experts: np.ndarray, max_cycles: int
) -> tuple[np.ndarray, np.ndarray]:
    """Improve ``experts`` by moving rows around improving cycles; returns it and the prices.

    Spare room (``sum(caps) > N``) is filled with dummy rows scoring 0 everywhere, so every
    expert is exactly full and a move into spare room is a 2-cycle with a dummy. The best
    move of every edge (``best[a, b] = max over rows i of a of s_ib - s_ia``) is recomputed
    only for the experts a pass touched.
    """
    n, num_experts = array.shape
    spare = caps - np.bincount(experts, minlength=num_experts)
    if spare.sum() > 0:
        dummies = np.zeros((int(spare.sum()), num_experts))
        array = np.asfortranarray(np.concatenate([array, dummies]))
        experts = np.concatenate([experts, np.repeat(np.arange(num_experts), spare)])
    tol = _TOL * max(1.0, float(np.abs(array).max()))
    by_row = np.ascontiguousarray(array)  # gathering rows of a column-major array is slow
    members = [np.flatnonzero(experts == a) for a in range(num_experts)]
    best = np.full((num_experts, num_experts), -np.inf)
    for a in range(num_experts):
        best[a] = _best_moves(by_row, members[a], a)
    canceled = 0
    while True:
        cycles, potentials = _disjoint_cycles(best, tol)
        if not cycles or canceled >= max_cycles:
            break
        cycles = cycles[: max_cycles - canceled]
        for cycle in cycles:
            _move_along(cycle, best, members, array, experts, tol)
        for a in {a for cycle in cycles for a in cycle}:
            members[a] = np.flatnonzero(experts == a)
            best[a] = _best_moves(by_row, members[a], a)
        canceled += len(cycles)
    return experts[:n], potentials


def _best_moves(array: np.ndarray, rows: np.ndarray, a: int) -> np.ndarray:
    """``[E]``: the best gain of moving one of ``rows`` (members of ``a``) to each expert."""
    out = np.full(array.shape[1], -np.inf)
    if rows.size:
        scores = array[rows]
        out = (scores - scores[:, a : a + 1]).max(axis=0)
        out[a] = -np.inf
    return out


def _disjoint_cycles(best: np.ndarray, tol: float) -> tuple[list[list[int]], np.ndarray]:
    """Improving cycles on disjoint sets of experts (each found among the experts the previous
    ones left), and the longest-path potentials of the whole graph when there is none."""
    cycles: list[list[int]] = []
    cycle, potentials = _improving_cycle(best, tol)
    free = np.ones(best.shape[0], dtype=bool)
    while cycle is not None:
        cycles.append(cycle)
        free[cycle] = False
        if free.sum() < 2:
            break
        rest = np.flatnonzero(free)
        sub, _ = _improving_cycle(best[np.ix_(rest, rest)], tol)
        cycle = None if sub is None else [int(rest[i]) for i in sub]
    return cycles, potentials


def _move_along(
    cycle: list[int],
    best: np.ndarray,
    members: list[np.ndarray],
    array: np.ndarray,
    experts: np.ndarray,
    tol: float,
) -> None:
    """Move the best ``k`` rows of every edge ``a -> b`` of ``cycle``, ``k`` as large as pays."""
    edges = list(zip(cycle, cycle[1:] + cycle[:1]))
    top_gain = sum(best[a, b] for a, b in edges)
    movers = []
    for a, b in edges:
        rows = members[a]
        gain = array[rows, b] - array[rows, a]
        # a row whose gain is below -(the other edges' best gains) never pays: skip sorting it
        keep = np.flatnonzero(gain > best[a, b] - top_gain)
        ranked = keep[np.argsort(-gain[keep], kind="stable")]
        movers.append((rows[ranked], gain[ranked], b))
    depth = min(len(r) for r, _, _ in movers)
    along = np.sum([g[:depth] for _, g, _ in movers], axis=0)  # non-increasing in k
    k = max(1, int(np.count_nonzero(along > tol)))
    for rows, _, b in movers:
        experts[rows[:k]] = b


def _improving_cycle(best: np.ndarray, tol: float) -> tuple[list[int] | None, np.ndarray]:
    """A cycle of experts whose best moves sum above ``tol`` (Bellman-Ford, longest paths).

    Without one, returns None and the longest-path lengths ``d`` from a virtual source:
    ``best[a, b] <= d[b] - d[a] + tol``, so prices ``p = d`` make every row's own expert
    its best price-adjusted choice (optimal dual prices).
    """
    num_experts = best.shape[0]
    dist = np.zeros(num_experts)
    pred = np.full(num_experts, -1)
    for _ in range(2 * num_experts + 1):
        cand = dist[:, None] + best
        src = cand.argmax(axis=0)
        value = cand[src, np.arange(num_experts)]
        better = value > dist + tol
        if not better.any():
            return None, dist
        dist = np.where(better, value, dist)
        pred = np.where(better, src, pred)
        for start in np.flatnonzero(better):
            cycle = _cycle_through(pred, int(start))
            if cycle is not None:
                gain = sum(best[a, b] for a, b in zip(cycle, cycle[1:] + cycle[:1]))
                if gain > tol:
                    return cycle, dist
    return None, dist  # pragma: no cover - Bellman-Ford settles or finds a cycle earlier


def _cycle_through(pred: np.ndarray, start: int) -> list[int] | None:
    """The cycle of the predecessor graph reached from ``start``, in forward order, if any."""
    seen: dict[int, int] = {}
    walk: list[int] = []
    node = start
    while node != -1 and node not in seen:
        seen[node] = len(walk)
        walk.append(node)
        node = int(pred[node])
    if node == -1:
        return None
    back = walk[seen[node] :]  # each entry's predecessor is the next one: reverse it
    return back[::-1]


def _exact(array: np.ndarray, caps: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    n = array.shape[0]
    slot_expert = np.repeat(np.arange(array.shape[1]), np.minimum(caps, n))
    rows, cols = linear_sum_assignment(array[:, slot_expert], maximize=True)
    experts = np.empty(n, dtype=np.int64)
    experts[rows] = slot_expert[cols]
    return experts


def _greedy(array: np.ndarray, caps: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Rows in ``order``, each to its best expert (by ``array``) that is not yet full.

    Vectorized by phases: while the set of full experts is fixed, every remaining row's
    choice is its argmax over the open experts; the phase ends at the row that fills an
    expert. At most E phases, each O(N E); equal to the sequential loop
    (:func:`verger.smalltalk.reference.greedy_assign_reference`).
    """
    n, num_experts = array.shape
    left = caps.astype(np.int64).copy()
    experts = np.full(n, -1, dtype=np.int64)
    pos = 0
    while pos < n:
        rest = order[pos:]
        choice = _row_argmax(array, np.flatnonzero(left > 0))[rest]
        fill_at = len(rest)
        for e in np.flatnonzero(left > 0):
            hits = np.flatnonzero(choice == e)
            if hits.size >= left[e]:
                fill_at = min(fill_at, int(hits[left[e] - 1]))
        stop = min(len(rest), fill_at + 1)
        experts[rest[:stop]] = choice[:stop]
        left -= np.bincount(choice[:stop], minlength=num_experts)
        pos += stop
    return experts


def _total(array: np.ndarray, experts: np.ndarray) -> float:
    return float(array[np.arange(array.shape[0]), experts].sum())


def _as_tensor(experts: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(experts.astype(np.int64, copy=False))
