"""Partial workers on verger.core's TransformerLM: structure, real memory savings, training."""

import torch

from verger.core.bench import measure_peak_memory
from verger.core.nn import TransformerLM
from verger.core.testing import tiny_config
from verger.sparse_diloco import DiLoCo, DiLoCoConfig, PartialLinear, SubsetPlan
from verger.sparse_diloco.engine import inner_state_numel


class Batches:
    def batch(self, worker, step):
        gen = torch.Generator().manual_seed(worker * 1000 + step)
        start = torch.randint(0, 61, (4, 1), generator=gen)
        stride = torch.randint(1, 4, (4, 1), generator=gen)
        seq = (start + stride * torch.arange(17)) % 61  # predictable from two tokens
        return seq[:, :-1], seq[:, 1:]


def lm_loss(model, batch):
    return model(batch[0], targets=batch[1]).loss


def make(plan_kind):
    torch.manual_seed(0)
    model = TransformerLM(tiny_config(mlp_hidden=96))
    plan = SubsetPlan.full(model, 4) if plan_kind == "full" else SubsetPlan.mlp_slices(model, 4)
    config = DiLoCoConfig(num_workers=4, inner_steps=5, inner_lr=1e-2)
    return DiLoCo(model, plan, config, loss_fn=lm_loss, data=Batches()), plan


def test_lm_quarter_mlp_worker_structure():
    engine, plan = make("mlp")
    worker = engine.workers[2]
    mlp = worker.model.blocks[1].mlp
    assert isinstance(mlp.w_gate, PartialLinear) and isinstance(mlp.w_down, PartialLinear)
    assert (mlp.w_up.selection.start, mlp.w_up.selection.stop) == (48, 72)
    engine.inner_step(worker)
    sizes = inner_state_numel(worker)
    assert sizes["trainable"] == plan.trained_numel(2)
    assert sizes["optimizer_state"] == 2 * plan.trained_numel(2)
    # attention and embeddings are shared-trainable; MLP weights keep no full-size grad
    assert worker.model.blocks[0].attn.q_proj.weight.requires_grad
    assert all(b.mlp.w_gate.weight.grad is None for b in worker.model.blocks)


def test_lm_partial_worker_allocates_less_by_the_frozen_state():
    peaks, fractions = {}, {}
    for kind in ("full", "mlp"):
        engine, plan = make(kind)

        def run(engine=engine):
            worker = engine.make_worker(1)
            for _ in range(2):
                engine.inner_step(worker)

        peaks[kind] = measure_peak_memory(run, device="cpu")
        fractions[kind] = plan.trained_numel(1)
    # exp_avg + exp_avg_sq (fp32) of the untrained coordinates are never allocated (their
    # gradients neither, but at the peak only part of a step's gradients are alive)
    saved = 2 * 4 * (fractions["full"] - fractions["mlp"])
    assert peaks["full"] - peaks["mlp"] >= 0.9 * saved, (peaks, saved)


def test_lm_partial_training_reduces_loss():
    engine, _ = make("mlp")
    batch = Batches().batch(99, 0)
    with torch.no_grad():
        before = float(lm_loss(engine.model, batch))
    engine.train(4)
    with torch.no_grad():
        after = float(lm_loss(engine.model, batch))
    assert after < before - 0.5
