"""DiLoCo engine vs the masked reference; memory structure of partial workers; validation."""

import pytest
import torch

from verger.core.testing import assert_close
from verger.sparse_diloco import (
    DiLoCo,
    DiLoCoConfig,
    PartialLinear,
    SubsetPlan,
    build_worker_model,
    reference_diloco,
)
from verger.sparse_diloco.engine import inner_state_numel
from verger.sparse_diloco.toy import ToyData, toy_loss, toy_model

CFG = dict(num_workers=4, inner_steps=6, inner_lr=3e-3, inner_warmup=2, grad_clip=0.5)


def run_engine(plan, config, rounds=3, seed=0):
    model = toy_model(seed)
    engine = DiLoCo(model, plan, config, loss_fn=toy_loss, data=ToyData(seed=seed))
    engine.train(rounds)
    return engine


def masks_of(plan):
    return [
        {
            n: (
                plan.selection(k, n).mask(s)
                if plan.selection(k, n)
                else torch.zeros(s, dtype=torch.bool)
            )
            for n, s in plan.shapes.items()
        }
        for k in range(plan.num_workers)
    ]


def assert_models_close(a, b, rtol):
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert_close(p.detach(), q.detach(), rtol=rtol, name=n)


@pytest.mark.parametrize("fragments", [1, 3])
def test_full_plan_equals_plain_diloco(fragments):
    config = DiLoCoConfig(**CFG, num_fragments=fragments)
    plan = SubsetPlan.full(toy_model(), 4)
    engine = run_engine(plan, config)
    ref = reference_diloco(
        toy_model(),
        config,
        loss_fn=toy_loss,
        data=ToyData(),
        rounds=3,
        fragments=plan.fragments(fragments),
    )
    assert_models_close(engine.model, ref, 1e-6)
    assert engine.rounds_done == 3 and engine.syncs == 3 * fragments


def test_slices_covering_everything_equal_plain_diloco():
    """Every worker trains all hidden units through PartialLinear (the custom backward)."""
    config = DiLoCoConfig(**CFG)
    plan = SubsetPlan.mlp_slices(toy_model(), 4, num_slices=1)
    assert isinstance(build_worker_model(toy_model(), plan, 0).blocks[0].mlp.w_gate, PartialLinear)
    engine = run_engine(plan, config)
    ref = reference_diloco(toy_model(), config, loss_fn=toy_loss, data=ToyData(), rounds=3)
    assert_models_close(engine.model, ref, 1e-6)


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(overlap=0.2), dict(others="frozen"), dict(num_slices=2)]
)
def test_partial_updates_equal_masked_reference(kwargs):
    config = DiLoCoConfig(**CFG)
    plan = SubsetPlan.mlp_slices(toy_model(), 4, **kwargs)
    engine = run_engine(plan, config)
    ref = reference_diloco(
        toy_model(), config, loss_fn=toy_loss, data=ToyData(), rounds=3, masks=masks_of(plan)
    )
    assert_models_close(engine.model, ref, 1e-6)
    if kwargs.get("others") == "frozen":  # untrained tensors never move
        assert torch.equal(engine.model.inp.weight, toy_model().inp.weight)


def test_partial_streaming_equals_masked_reference():
    config = DiLoCoConfig(**CFG, num_fragments=2)
    plan = SubsetPlan.mlp_slices(toy_model(), 4)
    engine = run_engine(plan, config, rounds=2)
    ref = reference_diloco(
        toy_model(),
        config,
        loss_fn=toy_loss,
        data=ToyData(),
        rounds=2,
        masks=masks_of(plan),
        fragments=plan.fragments(2),
    )
    assert_models_close(engine.model, ref, 1e-6)


def test_frozen_parameters_have_no_grad_and_no_optimizer_state():
    config = DiLoCoConfig(**CFG)
    plan = SubsetPlan.mlp_slices(toy_model(hidden=32), 4, others="frozen")
    engine = DiLoCo(toy_model(hidden=32), plan, config, loss_fn=toy_loss, data=ToyData())
    worker = engine.workers[1]
    loss = toy_loss(worker.model, ToyData().batch(1, 0))
    loss.backward()
    mlp = worker.model.blocks[0].mlp
    assert mlp.w_gate.weight.grad is None and not mlp.w_gate.weight.requires_grad
    assert mlp.w_gate.trainable.grad.shape == (8, 16)  # a quarter of 32 hidden units
    assert mlp.w_down.trainable.grad.shape == (16, 8)
    assert worker.model.inp.weight.grad is None and worker.model.out.weight.grad is None
    grads = sum(p.grad.numel() for p in worker.model.parameters() if p.grad is not None)
    assert grads == plan.trained_numel(1)
    worker.optimizer.zero_grad()
    engine.inner_step(worker)
    sizes = inner_state_numel(worker)
    assert sizes["trainable"] == plan.trained_numel(1)
    assert sizes["optimizer_state"] == 2 * plan.trained_numel(1)  # exp_avg + exp_avg_sq
    assert plan.trained_numel(1) < 0.3 * plan.total_numel()


def test_partial_linear_gradients_match_autograd_slice():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 10, bias=True)
    x = torch.randn(3, 5, 6, requires_grad=True)
    for dim, (a, b) in [(0, (2, 7)), (1, (1, 4))]:
        from verger.sparse_diloco import Selection

        part = PartialLinear(torch.nn.Linear(6, 10), Selection(dim, a, b))
        with torch.no_grad():
            part.weight.copy_(lin.weight)
            part.bias.copy_(lin.bias)
        y_ref = lin(x)
        gy = torch.randn_like(y_ref)
        gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref, (x, lin.weight, lin.bias), gy)
        y = part(x)
        gx, gw, gb = torch.autograd.grad(y, (x, part.trainable, part.bias), gy)
        assert_close(y, y_ref, rtol=1e-6, name="out")
        assert_close(gx, gx_ref, rtol=1e-6, name="grad x")
        assert_close(gw, gw_ref.narrow(dim, a, b - a), rtol=1e-6, name="grad slice")
        assert_close(gb, gb_ref, rtol=1e-6, name="grad bias")


def test_partial_training_learns():
    config = DiLoCoConfig(**CFG)
    plan = SubsetPlan.mlp_slices(toy_model(), 4)
    engine = run_engine(plan, config, rounds=6)
    held_out = ToyData(seed=0).batch(worker=999, step=0)  # same teacher, unseen inputs
    with torch.no_grad():
        before = toy_loss(toy_model(), held_out)
        after = toy_loss(engine.model, held_out)
    assert float(after) < 0.5 * float(before)


def test_config_validation():
    with pytest.raises(ValueError, match="num_workers"):
        DiLoCoConfig(num_workers=0)
    with pytest.raises(ValueError, match="multiple of"):
        DiLoCoConfig(inner_steps=10, num_fragments=3)
    with pytest.raises(ValueError, match="compression_bits"):
        DiLoCoConfig(compression_bits=3)
    with pytest.raises(ValueError, match="outer_momentum"):
        DiLoCoConfig(outer_momentum=1.0)
    plan = SubsetPlan.full(toy_model(), 2)
    with pytest.raises(ValueError, match="num_workers"):
        DiLoCo(toy_model(), plan, DiLoCoConfig(num_workers=4), loss_fn=toy_loss, data=ToyData())


def test_partial_workers_scale_their_inner_lr():
    model = toy_model(0)
    plan = SubsetPlan.mlp_slices(model, 4)
    f = plan.trained_fraction(0)
    assert 0 < f < 1
    config = DiLoCoConfig(num_workers=4, inner_lr=1e-3)
    assert config.worker_inner_lr(f) == pytest.approx(1e-3 / f**0.5)
    assert config.worker_inner_lr(1.0) == 1e-3  # DiLoCo workers are unaffected
    engine = DiLoCo(model, plan, config, loss_fn=toy_loss, data=ToyData())
    assert engine.workers[0].optimizer.param_groups[0]["initial_lr"] == config.worker_inner_lr(f)
    none = DiLoCoConfig(num_workers=4, inner_lr=1e-3, partial_lr_scaling="none")
    assert none.worker_inner_lr(f) == 1e-3
    with pytest.raises(ValueError, match="partial_lr_scaling="):
        DiLoCoConfig(partial_lr_scaling="linear")


def test_count_scaled_outer_step_equals_masked_reference():
    config = DiLoCoConfig(**CFG, outer_lr_scaling="sqrt_count", partial_lr_scaling="none")
    plan = SubsetPlan.mlp_slices(toy_model(), 4, overlap=0.2)  # m[i] in {1, 2, 4}
    engine = run_engine(plan, config)
    ref = reference_diloco(
        toy_model(), config, loss_fn=toy_loss, data=ToyData(), rounds=3, masks=masks_of(plan)
    )
    assert_models_close(engine.model, ref, 1e-6)
    unscaled = run_engine(
        plan, DiLoCoConfig(**CFG, partial_lr_scaling="none", outer_lr_scaling="none")
    )
    mlp = "blocks.0.mlp.w_up.weight"
    assert not torch.equal(unscaled.model.get_parameter(mlp), engine.model.get_parameter(mlp))
    scale = config.outer_scale(torch.tensor([1.0, 2.0, 4.0]))
    assert torch.allclose(scale, torch.tensor([0.5, 0.5**0.5, 1.0]))  # sqrt(m / W), W = 4
    with pytest.raises(ValueError, match="outer_lr_scaling="):
        DiLoCoConfig(outer_lr_scaling="linear")


def test_plan_for_a_model_of_other_shapes_is_refused_before_training():
    plan = SubsetPlan.mlp_slices(toy_model(hidden=32), 4)  # same names, other MLP width
    with pytest.raises(ValueError, match=r"'blocks.0.mlp.w_gate.weight' has shape \(64, 16\)"):
        DiLoCo(toy_model(hidden=64), plan, DiLoCoConfig(**CFG), loss_fn=toy_loss, data=ToyData())
    with pytest.raises(ValueError, match="names or shapes"):
        build_worker_model(toy_model(hidden=64), plan, 0)


def test_a_worker_with_nothing_to_train_is_refused_by_name():
    plan = SubsetPlan.from_predicates(toy_model(), [lambda n, p: True, lambda n, p: False])
    config = DiLoCoConfig(num_workers=2, inner_steps=2)
    with pytest.raises(ValueError, match=r"worker\(s\) \[1\] train no parameter"):
        DiLoCo(toy_model(), plan, config, loss_fn=toy_loss, data=ToyData())


def test_streaming_sync_moves_only_its_fragment_even_with_stale_grads():
    """Gradients left on the global model (a user's sanity-check backward) are not applied."""
    model = toy_model()
    toy_loss(model, ToyData().batch(99, 0)).backward()
    plan = SubsetPlan.mlp_slices(model, 4)
    engine = DiLoCo(
        model, plan, DiLoCoConfig(**CFG, num_fragments=2), loss_fn=toy_loss, data=ToyData()
    )
    for worker in engine.workers.values():
        engine.inner_step(worker)
    first, second = engine.fragments
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.sync(first)
    for n in second:  # not synced: bit-identical
        assert torch.equal(model.get_parameter(n), before[n]), n
    assert all(not torch.equal(model.get_parameter(n), before[n]) for n in first)


def test_island_share_needs_equal_rows_per_rank():
    """Averaging per-rank mean gradients equals the batch gradient only for equal shares."""
    plan = SubsetPlan.full(toy_model(), 4)
    engine = DiLoCo(
        toy_model(), plan, DiLoCoConfig(**CFG), loss_fn=toy_loss, data=ToyData(batch_size=15)
    )
    engine.island_size = 2  # as if the worker were an island of 2 ranks
    with pytest.raises(ValueError, match="divisible by 2"):
        engine.inner_step(engine.workers[0])


@pytest.mark.parametrize(
    "field,value",
    [
        ("outer_lr", float("inf")),
        ("inner_lr", "1e-3"),
        ("inner_weight_decay", float("inf")),
        ("inner_betas", 0.9),
        ("inner_betas", (0.9, float("nan"))),
        ("grad_clip", float("inf")),
        ("nesterov", "yes"),
        ("inner_warmup", True),
    ],
)
def test_config_rejects_non_finite_and_mistyped_values_by_name(field, value):
    with pytest.raises(ValueError, match=f"{field}="):
        DiLoCoConfig(**{field: value})


def test_train_refuses_a_negative_round_count():
    """`engine.train(rounds=-1)` used to return [] as if it had trained."""
    engine = run_engine(SubsetPlan.full(toy_model(), 4), DiLoCoConfig(**CFG), rounds=0)
    for rounds in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"rounds=.* must be an int >= 0"):
            engine.train(rounds)


def test_a_nan_loss_stops_the_worker_with_core_error_before_its_step():
    """The inner step is verger-core's TrainLoop step: one NonFiniteLossError for every package."""
    from verger.core.train import NonFiniteLossError as CoreError
    from verger.sparse_diloco import NonFiniteLossError

    assert NonFiniteLossError is CoreError

    class NaNAt2(ToyData):
        def batch(self, worker, step):
            x, y = super().batch(worker, step)
            return (x * float("nan"), y) if step == 2 else (x, y)

    engine = DiLoCo(
        toy_model(),
        SubsetPlan.full(toy_model(), 4),
        DiLoCoConfig(**CFG),
        loss_fn=toy_loss,
        data=NaNAt2(),
    )
    worker = engine.workers[1]
    engine.inner_step(worker)
    engine.inner_step(worker)
    before = {n: p.detach().clone() for n, p in worker.model.named_parameters()}
    with pytest.raises(CoreError, match="worker 1, inner step 2: loss is nan"):
        engine.inner_step(worker)
    for n, p in worker.model.named_parameters():
        assert torch.equal(p, before[n]), n  # the optimizer did not step


def engine_with(**overrides):
    args = (
        dict(
            model=toy_model(),
            plan=SubsetPlan.full(toy_model(), 4),
            config=DiLoCoConfig(**CFG),
            loss_fn=toy_loss,
            data=ToyData(),
        )
        | overrides
    )
    model, plan, config = args.pop("model"), args.pop("plan"), args.pop("config")
    return DiLoCo(model, plan, config, **args)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(model="not a model"), "model must be a Module, got str"),
        (dict(plan=[0, 1]), "plan must be a SubsetPlan, got list"),
        (dict(config=dict(CFG)), "config must be a DiLoCoConfig, got dict"),
        (dict(loss_fn=None), "loss_fn must be callable"),
        (dict(data=[(1, 2)]), r"data must have a batch\(worker, step\) method, got list"),
        (dict(transport=object()), "transport must be a Transport"),
    ],
)
def test_engine_arguments_of_the_wrong_type_are_named(overrides, match):
    with pytest.raises(TypeError, match=match):
        engine_with(**overrides)


@pytest.mark.parametrize(
    "loss_fn,error,match",
    [
        # core's TransformerLM returns an LMOutput: the README's first quickstart did this
        (lambda m, b: {"loss": toy_loss(m, b)}, TypeError, "scalar loss tensor, got dict"),
        (lambda m, b: (m(b[0]) - b[1]) ** 2, ValueError, r"shape \(16, 4\)"),
        (lambda m, b: torch.tensor(1), ValueError, "torch.int64"),
    ],
)
def test_a_loss_fn_that_returns_no_scalar_loss_is_named_before_any_step(loss_fn, error, match):
    engine = engine_with(loss_fn=loss_fn)
    worker = engine.workers[0]
    before = {n: p.detach().clone() for n, p in worker.model.named_parameters()}
    with pytest.raises(error, match=match):
        engine.inner_step(worker)
    assert worker.step == 0
    for n, p in worker.model.named_parameters():
        assert torch.equal(p, before[n]), n
