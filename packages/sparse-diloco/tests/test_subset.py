"""SubsetPlan: exact coverage, counts m[i] (brute force), validation, fragments."""

import pytest
import torch

from verger.sparse_diloco import Selection, SubsetPlan
from verger.sparse_diloco.toy import toy_model


def brute_counts(plan: SubsetPlan, name: str) -> torch.Tensor:
    total = torch.zeros(plan.shapes[name], dtype=torch.int64)
    for k in range(plan.num_workers):
        sel = plan.selection(k, name)
        if sel is not None:
            total += sel.mask(plan.shapes[name])
    return total


@pytest.mark.parametrize(
    "workers,slices,overlap", [(4, 4, 0.0), (8, 4, 0.0), (4, 4, 0.25), (3, 3, 0.1)]
)
def test_mlp_slices_counts_are_exact(workers, slices, overlap):
    model = toy_model(hidden=30)
    plan = SubsetPlan.mlp_slices(model, workers, num_slices=slices, overlap=overlap)
    for name in plan.names:
        assert torch.equal(plan.count_mask(name), brute_counts(plan, name)), name
    assert plan.coverage() == 1.0
    gate = plan.count_mask("blocks.0.mlp.w_gate.weight")
    down = plan.count_mask("blocks.0.mlp.w_down.weight")
    assert torch.equal(gate[:, 0], down[0, :])  # a hidden unit's row and column agree
    if overlap == 0.0:
        assert (gate == workers // slices).all()  # disjoint slices, each repeated W/k times
    else:
        assert gate.max() > gate.min() >= 1
    # every non-MLP tensor is trained by every worker ("shared")
    assert (plan.count_mask("inp.weight") == workers).all()


def test_one_quarter_mlp_trains_a_quarter_of_each_mlp():
    model = toy_model(hidden=32)
    plan = SubsetPlan.mlp_slices(model, 4)
    for k in range(4):
        sel = plan.selection(k, "blocks.1.mlp.w_up.weight")
        assert (sel.dim, sel.start, sel.stop) == (0, 8 * k, 8 * k + 8)
        sel = plan.selection(k, "blocks.1.mlp.w_down.weight")
        assert (sel.dim, sel.start, sel.stop) == (1, 8 * k, 8 * k + 8)


def test_frozen_others_and_uncovered_checks():
    model = toy_model()
    plan = SubsetPlan.mlp_slices(model, 4, others="frozen")
    assert (plan.count_mask("out.weight") == 0).all()
    assert plan.coverage() < 1.0
    with pytest.raises(ValueError, match="trained by no worker"):
        plan.check_coverage()
    with pytest.raises(ValueError, match="trained by no worker"):
        SubsetPlan.from_predicates(model, [lambda n, p: "inp" in n])


def test_predicates_plan_counts():
    model = toy_model()
    preds = [lambda n, p: "blocks.0" in n or "inp" in n, lambda n, p: "blocks.0" not in n]
    plan = SubsetPlan.from_predicates(model, preds)
    for name in plan.names:
        assert torch.equal(plan.count_mask(name), brute_counts(plan, name))
    assert (plan.count_mask("inp.weight") == 2).all()
    assert (plan.count_mask("blocks.0.mlp.w_up.weight") == 1).all()


def test_validation_messages():
    model = toy_model()
    with pytest.raises(ValueError, match="num_workers"):
        SubsetPlan.full(model, 0)
    with pytest.raises(ValueError, match="overlap"):
        SubsetPlan.mlp_slices(model, 4, overlap=1.5)
    with pytest.raises(ValueError, match="others"):
        SubsetPlan.mlp_slices(model, 4, others="sometimes")
    shapes = {n: p.shape for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="outside shape"):
        SubsetPlan(shapes, [{"inp.weight": Selection(0, 0, 99)}], allow_uncovered=True)
    with pytest.raises(ValueError, match="not a model parameter"):
        SubsetPlan(shapes, [{"nope": Selection()}], allow_uncovered=True)
    with pytest.raises(ValueError, match="start < stop"):
        Selection(0, 3, 3)


def test_fragments_partition_in_order():
    plan = SubsetPlan.full(toy_model(depth=4), 2)
    for f in (1, 2, 3, 4):
        frags = plan.fragments(f)
        assert len(frags) == f
        assert [n for g in frags for n in g] == plan.names
