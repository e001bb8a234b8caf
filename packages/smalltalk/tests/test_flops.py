"""The FLOP accounting against torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from verger.core.bench import count_flops
from verger.core.nn.flops import flops_per_token
from verger.core.testing import tiny_config
from verger.smalltalk.flops import account, prefix_forward_flops
from verger.smalltalk.routers import new_model
from verger.smalltalk.scoring import prefix_scores


def test_prefix_scoring_flops_match_the_counter():
    config = tiny_config(fused=False)
    router = new_model(config, seed=0)
    ids = torch.randint(0, 61, (3, 20))
    with sdpa_kernel(SDPBackend.MATH):  # the counter sees the math attention's matmuls
        counted = count_flops(lambda: prefix_scores(router, ids, 17))
    assert counted == pytest.approx(3 * prefix_forward_flops(config, 17), rel=0.02)


def test_training_step_flops_match_the_counter():
    config = tiny_config(fused=False)
    model = new_model(config, seed=0)
    ids = torch.randint(0, 61, (4, 33))

    def step():
        model(ids[:, :-1], ids[:, 1:]).loss.backward()

    with sdpa_kernel(SDPBackend.MATH):
        counted = count_flops(step)
    assert counted == pytest.approx(4 * 32 * flops_per_token(config, 32), rel=0.02)


def test_the_fractions_add_up():
    router, expert = tiny_config(d_model=8, n_heads=2, mlp_hidden=16), tiny_config()
    acc = account(
        router=router,
        expert=expert,
        num_experts=4,
        seq_len=64,
        prefix_len=16,
        router_steps=10,
        router_batch_size=8,
        em_rounds=2,
        em_sequences=100,
        train_sequences=1000,
        expert_steps=[50, 50, 50, 50],
        dense_steps=200,
        batch_size=8,
    )
    fwd = prefix_forward_flops(router, 16)
    assert acc.router_training == 4 * 10 * 8 * 15 * flops_per_token(router, 15)
    assert acc.router_em_scoring == 4 * 2 * 100 * fwd
    assert acc.router_sharding == 4 * 1000 * fwd
    assert acc.expert_training == acc.dense_training == 200 * 8 * 64 * flops_per_token(expert, 64)
    assert acc.router_train_fraction == pytest.approx(acc.router_total / acc.expert_training)
    assert acc.mixture_vs_dense_training == pytest.approx(1 + acc.router_train_fraction)
    assert acc.router_inference_fraction == pytest.approx(
        4 * fwd / (64 * flops_per_token(expert, 64, training=False))
    )
