"""The tiny LM learns: it overfits a fixed batch and learns a shift pattern and a copy task."""

import math

import pytest
import torch

from verger.core.nn import TransformerLM
from verger.core.testing import limit_torch_threads, tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    with limit_torch_threads(1):  # tiny model: extra threads only add contention
        yield


def _train(model, batches, steps, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        ids, targets = batches(step)
        loss = model(ids, targets).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_overfits_a_fixed_random_batch():
    torch.manual_seed(0)
    model = TransformerLM(tiny_config())
    data = torch.randint(0, 61, (4, 33))
    ids, targets = data[:, :-1], data[:, 1:]
    losses = _train(model, lambda _: (ids, targets), steps=150, lr=1e-2)
    assert abs(losses[0] - math.log(61)) < 0.5  # starts near uniform
    assert losses[-1] < 0.1 * losses[0], losses[::25]  # memorized 128 random tokens


def test_learns_to_copy_a_random_prefix_within_a_few_hundred_steps():
    """Each sequence repeats a fresh random 8-token prefix three times: after the first copy
    every token is predictable, but only by attending 8 positions back (an induction-style
    lookup). Loss is taken on the predictable tokens only (-100 elsewhere)."""
    torch.manual_seed(1)
    model = TransformerLM(tiny_config(d_model=64, n_heads=2, mlp_hidden=128))
    gen = torch.Generator().manual_seed(2)

    def batch(_):
        prefix = torch.randint(0, 61, (16, 8), generator=gen)
        seq = torch.cat([prefix] * 3, dim=1)
        ids, targets = seq[:, :-1], seq[:, 1:].clone()
        targets[:, :7] = -100  # the rest of the random prefix cannot be predicted
        return ids, targets

    losses = _train(model, batch, steps=300, lr=1e-2)
    start, end = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert start > 3.5 and end < 0.3, (start, end)
