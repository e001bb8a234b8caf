"""Which coordinates each worker trains: `Selection` (one tensor) and `SubsetPlan` (all of them).

A worker trains, for every parameter, either nothing, the whole tensor, or one contiguous range
of indices along one dimension (hidden units of an MLP: rows of ``w_gate``/``w_up``, columns of
``w_down``). Ranges keep the trained part a strided *view* of the full weight, so the worker
needs no copy, and make the per-coordinate counts m[i] a vector along that dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Row-sliced and column-sliced linears of a SwiGLU MLP (verger.core's `SwiGLU` names).
DEFAULT_MLP_LAYOUT: tuple[tuple[str, ...], tuple[str, ...]] = (("w_gate", "w_up"), ("w_down",))
OTHERS_POLICIES = ("shared", "frozen")


@dataclass(frozen=True)
class Selection:
    """The trained part of one tensor: all of it (``dim=None``) or ``[start, stop)`` along ``dim``."""

    dim: int | None = None
    start: int = 0
    stop: int = 0

    def __post_init__(self) -> None:
        if self.dim is not None and not 0 <= self.start < self.stop:
            raise ValueError(
                f"Selection range [{self.start}, {self.stop}) must satisfy 0 <= start < stop"
            )

    @property
    def is_whole(self) -> bool:
        return self.dim is None

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The selected part of ``tensor`` as a view (no copy)."""
        if self.dim is None:
            return tensor
        return tensor.narrow(self.dim, self.start, self.stop - self.start)

    def shape(self, full: torch.Size | Sequence[int]) -> torch.Size:
        shape = list(full)
        if self.dim is not None:
            shape[self.dim] = self.stop - self.start
        return torch.Size(shape)

    def numel(self, full: torch.Size | Sequence[int]) -> int:
        return math.prod(self.shape(full))

    def mask(self, full: torch.Size | Sequence[int]) -> torch.Tensor:
        """A boolean mask of the full shape, True on the selected coordinates (tests, reference)."""
        m = torch.zeros(tuple(full), dtype=torch.bool)
        self.view(m).fill_(True)
        return m


WorkerAssignment = dict[str, Selection]  # parameter name -> selection; absent = frozen


class SubsetPlan:
    """A fixed subset of coordinates per worker, with coverage checks and counts m[i].

    ``shapes`` lists every parameter of the model (name -> shape, in model order);
    ``assignments[k]`` maps the names worker ``k`` trains to their `Selection`. Tensors no
    worker trains keep their initial value (m[i] = 0); pass ``allow_uncovered=True`` to accept
    that, otherwise construction raises ``ValueError`` naming the first uncovered tensor.
    """

    def __init__(
        self,
        shapes: Mapping[str, torch.Size | Sequence[int]],
        assignments: Sequence[Mapping[str, Selection]],
        *,
        allow_uncovered: bool = False,
    ) -> None:
        if len(assignments) < 1:
            raise ValueError("assignments must list at least one worker")
        self.shapes: dict[str, torch.Size] = {n: torch.Size(s) for n, s in shapes.items()}
        self.assignments: list[WorkerAssignment] = [dict(a) for a in assignments]
        for k, assignment in enumerate(self.assignments):
            for name, sel in assignment.items():
                if name not in self.shapes:
                    raise ValueError(f"assignments[{k}] names {name!r}, not a model parameter")
                if not isinstance(sel, Selection):
                    raise TypeError(f"assignments[{k}][{name!r}] must be a Selection")
                if sel.dim is not None:
                    shape = self.shapes[name]
                    if not 0 <= sel.dim < len(shape) or sel.stop > shape[sel.dim]:
                        raise ValueError(
                            f"assignments[{k}][{name!r}] = {sel} is outside shape {tuple(shape)}"
                        )
        self._counts = {name: self._count(name) for name in self.shapes}
        self._subset_counts: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self.allow_uncovered = allow_uncovered
        if not allow_uncovered:
            self.check_coverage()

    # ---- construction helpers -------------------------------------------------------------
    @classmethod
    def full(cls, model: nn.Module, num_workers: int) -> SubsetPlan:
        """Every worker trains every parameter: plain DiLoCo."""
        _check_workers(num_workers)
        shapes = _shapes(model)
        return cls(shapes, [dict.fromkeys(shapes, Selection()) for _ in range(num_workers)])

    @classmethod
    def from_predicates(
        cls,
        model: nn.Module,
        predicates: Sequence[Callable[[str, torch.Tensor], bool]],
        *,
        allow_uncovered: bool = False,
    ) -> SubsetPlan:
        """Whole tensors: worker ``k`` trains the parameters where ``predicates[k](name, p)``."""
        params = dict(model.named_parameters())
        assignments = [
            {n: Selection() for n, p in params.items() if pred(n, p)} for pred in predicates
        ]
        return cls(_shapes(model), assignments, allow_uncovered=allow_uncovered)

    @classmethod
    def mlp_slices(
        cls,
        model: nn.Module,
        num_workers: int,
        *,
        num_slices: int | None = None,
        overlap: float = 0.0,
        others: str = "shared",
        layout: tuple[tuple[str, ...], tuple[str, ...]] = DEFAULT_MLP_LAYOUT,
    ) -> SubsetPlan:
        """The paper's "1/k MLP": worker ``w`` trains hidden-unit slice ``w % k`` of every MLP.

        ``num_slices`` (k) defaults to ``num_workers``. ``overlap`` widens each slice by that
        fraction of the hidden size (so neighbouring workers share units). ``others`` says what
        happens to every non-MLP tensor (attention, embeddings, norms): ``"shared"`` (every
        worker trains it) or ``"frozen"`` (no worker does; it keeps its initial value).
        ``layout`` names the row-sliced and column-sliced ``nn.Linear`` children of an MLP.
        """
        _check_workers(num_workers)
        k = num_workers if num_slices is None else num_slices
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"num_slices={num_slices!r} must be a positive int")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap={overlap!r} must be in [0, 1)")
        if others not in OTHERS_POLICIES:
            raise ValueError(f"others={others!r} must be one of {OTHERS_POLICIES}")
        sliced = _find_mlps(model, layout)
        if not sliced:
            raise ValueError(
                f"no MLP with linear children {layout} found in the model; pass layout=..."
            )
        shapes = _shapes(model)
        assignments: list[WorkerAssignment] = []
        for w in range(num_workers):
            assignment: WorkerAssignment = {}
            for name, (dim, hidden) in sliced.items():
                if hidden < k:
                    raise ValueError(f"{name}: {hidden} hidden units cannot make {k} slices")
                start, stop = _slice_range(w % k, k, hidden, overlap)
                assignment[name] = Selection(dim, start, stop)
            if others == "shared":
                assignment.update({n: Selection() for n in shapes if n not in sliced})
            assignments.append(assignment)
        return cls(shapes, assignments, allow_uncovered=others == "frozen" or num_workers < k)

    # ---- queries --------------------------------------------------------------------------
    @property
    def num_workers(self) -> int:
        return len(self.assignments)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def selection(self, worker: int, name: str) -> Selection | None:
        """Worker ``worker``'s selection of ``name``, or None when it keeps it frozen."""
        return self.assignments[worker].get(name)

    def counts(self, name: str, workers: Iterable[int] | None = None) -> torch.Tensor:
        """m[i] for parameter ``name``, as a float tensor broadcastable to its shape.

        ``workers``: count only these workers (e.g. those whose pseudo-gradients reached an
        outer step of a fault-tolerant run); None counts all of them.
        """
        if workers is None:
            return self._counts[name]
        chosen = tuple(sorted(set(workers)))
        if any(not 0 <= k < self.num_workers for k in chosen):
            raise ValueError(f"workers={list(chosen)} must be in [0, {self.num_workers})")
        if chosen == tuple(range(self.num_workers)):
            return self._counts[name]
        key = (name, chosen)
        if key not in self._subset_counts:
            self._subset_counts[key] = self._count(name, chosen)
        return self._subset_counts[key]

    def count_mask(self, name: str) -> torch.Tensor:
        """m[i] expanded to the full shape (int64): the brute-force form, for tests and reports."""
        return self._counts[name].expand(self.shapes[name]).to(torch.int64)

    def trained_numel(self, worker: int) -> int:
        return sum(sel.numel(self.shapes[n]) for n, sel in self.assignments[worker].items())

    def total_numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def trained_fraction(self, worker: int) -> float:
        return self.trained_numel(worker) / max(1, self.total_numel())

    def coverage(self) -> float:
        """The fraction of coordinates trained by at least one worker."""
        covered = sum(int((self.count_mask(n) > 0).sum()) for n in self.shapes)
        return covered / max(1, self.total_numel())

    def check_coverage(self) -> None:
        """Raise ``ValueError`` naming the first tensor with a coordinate no worker trains."""
        for name in self.shapes:
            uncovered = int((self.count_mask(name) == 0).sum())
            if uncovered:
                raise ValueError(
                    f"{uncovered} coordinate(s) of {name!r} are trained by no worker; fix the "
                    "plan or pass allow_uncovered=True to keep them at their initial value"
                )

    def fragments(self, num_fragments: int) -> list[list[str]]:
        """Split the parameters, in model order, into contiguous groups of similar size."""
        if not isinstance(num_fragments, int) or not 1 <= num_fragments <= len(self.shapes):
            raise ValueError(
                f"num_fragments={num_fragments!r} must be an int in [1, {len(self.shapes)}]"
            )
        sizes = [math.prod(s) for s in self.shapes.values()]
        total, acc = sum(sizes), 0
        groups: list[list[str]] = [[] for _ in range(num_fragments)]
        for i, name in enumerate(self.shapes):
            # Place by the midpoint of the tensor in the cumulative size, then keep every group
            # non-empty by taking at least one tensor per remaining group.
            g = min(num_fragments - 1, int((acc + sizes[i] / 2) * num_fragments / total))
            remaining = len(self.shapes) - i
            empty_after = sum(1 for grp in groups[g + 1 :] if not grp)
            if remaining <= empty_after:
                g = next(j for j in range(num_fragments) if not groups[j])
            groups[g].append(name)
            acc += sizes[i]
        return [g for g in groups if g]

    def summary(self) -> dict[str, float]:
        """Figures for reports: trained fraction per worker (mean), coverage, overlap."""
        fractions = [self.trained_fraction(k) for k in range(self.num_workers)]
        return {
            "trained_fraction_mean": sum(fractions) / len(fractions),
            "coverage": self.coverage(),
        }

    def _count(self, name: str, workers: Iterable[int] | None = None) -> torch.Tensor:
        shape = self.shapes[name]
        chosen = range(self.num_workers) if workers is None else workers
        sels = [self.assignments[k][name] for k in chosen if name in self.assignments[k]]
        dims = {s.dim for s in sels if s.dim is not None}
        if len(dims) > 1:
            raise ValueError(f"{name!r} is sliced along several dims {sorted(dims)}")
        if not dims:
            return torch.full([1] * len(shape), float(len(sels)))
        (dim,) = dims
        view_shape = [1] * len(shape)
        view_shape[dim] = shape[dim]
        counts = torch.zeros(shape[dim])
        for s in sels:
            if s.dim is None:
                counts += 1
            else:
                counts[s.start : s.stop] += 1
        return counts.view(view_shape)


def _check_workers(num_workers: int) -> None:
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"num_workers={num_workers!r} must be a positive int")


def _shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in model.named_parameters()}


def _slice_range(index: int, k: int, hidden: int, overlap: float) -> tuple[int, int]:
    start, stop = round(index * hidden / k), round((index + 1) * hidden / k)
    stop = stop + math.ceil(overlap * hidden)
    if stop > hidden:  # keep the range contiguous: shift it left instead of wrapping
        start, stop = max(0, start - (stop - hidden)), hidden
    return start, stop


def _find_mlps(
    model: nn.Module, layout: tuple[tuple[str, ...], tuple[str, ...]]
) -> dict[str, tuple[int, int]]:
    """name of each sliceable weight -> (dim along which hidden units lie, hidden size)."""
    rows, cols = layout
    found: dict[str, tuple[int, int]] = {}
    for prefix, module in model.named_modules():
        found_children = [getattr(module, c, None) for c in (*rows, *cols)]
        children = [c for c in found_children if isinstance(c, nn.Linear)]
        if len(children) != len(found_children):
            continue
        hidden = {c.out_features for c in children[: len(rows)]}
        hidden |= {c.in_features for c in children[len(rows) :]}
        if len(hidden) != 1:
            raise ValueError(f"{prefix}: MLP linears disagree on the hidden size {hidden}")
        (h,) = hidden
        base = f"{prefix}." if prefix else ""
        for c in rows:
            found[f"{base}{c}.weight"] = (0, h)
        for c in cols:
            found[f"{base}{c}.weight"] = (1, h)
    return found


def iter_selected(
    plan: SubsetPlan, worker: int, names: Iterable[str]
) -> Iterable[tuple[str, Selection]]:
    """(name, selection) for the tensors of ``names`` that ``worker`` trains, in order."""
    for name in names:
        sel = plan.selection(worker, name)
        if sel is not None:
            yield name, sel
