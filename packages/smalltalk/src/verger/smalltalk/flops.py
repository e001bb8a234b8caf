"""FLOP accounting: the routers' share of training and of inference.

Matmul FLOPs from :func:`verger.core.nn.flops_per_token` (2 per multiply-add, training = 3x
the forward, attention over the full context as the FLOP counter counts it). A prefix of
``M`` tokens is a forward over ``M - 1`` positions (it predicts ``x_2..x_M``).

Training (the whole mixture): the routers' EM training steps, their EM scoring passes and
the sharding pass, against the experts' training steps. Inference (per sequence of
``seq_len`` tokens): ``E`` routers over the prefix, against one expert over the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from verger.core.nn import TransformerConfig
from verger.core.nn.flops import flops_per_token


@dataclass(frozen=True)
class FlopAccount:
    """Totals in FLOPs and the two fractions the benchmark reports."""

    router_training: int  # EM steps of all routers
    router_em_scoring: int  # every router scoring every EM sequence, every round
    router_sharding: int  # every router scoring every training sequence once
    expert_training: int  # all experts' training steps
    dense_training: int  # the dense baseline's training steps
    routing_per_sequence: int  # E routers over one prefix
    expert_per_sequence: int  # one expert over one sequence

    @property
    def router_total(self) -> int:
        return self.router_training + self.router_em_scoring + self.router_sharding

    @property
    def router_train_fraction(self) -> float:
        """Routers' training-time FLOPs over the experts' training FLOPs."""
        return self.router_total / self.expert_training

    @property
    def router_inference_fraction(self) -> float:
        """Routing FLOPs over the chosen expert's FLOPs, per sequence."""
        return self.routing_per_sequence / self.expert_per_sequence

    @property
    def mixture_vs_dense_training(self) -> float:
        """(experts + routers) / dense training FLOPs (1 + the routers' overhead when the
        dense baseline trains on the same tokens)."""
        return (self.expert_training + self.router_total) / self.dense_training


def prefix_forward_flops(config: TransformerConfig, prefix_len: int) -> int:
    """Forward FLOPs of scoring one prefix of ``prefix_len`` tokens."""
    positions = prefix_len - 1
    return positions * flops_per_token(config, positions, training=False)


def account(
    *,
    router: TransformerConfig,
    expert: TransformerConfig,
    num_experts: int,
    seq_len: int,
    prefix_len: int,
    router_steps: int,
    router_batch_size: int,
    em_rounds: int,
    em_sequences: int,
    train_sequences: int,
    expert_steps: list[int],
    dense_steps: int,
    batch_size: int,
    inference_prefix_len: int | None = None,
) -> FlopAccount:
    """The FLOPs of one SmallTalk run (see the module docstring).

    ``router_steps`` counts each router's EM steps (``em_rounds x em_steps_per_round``);
    ``expert_steps`` lists each expert's steps; ``inference_prefix_len`` defaults to
    ``prefix_len``.
    """
    m = prefix_len - 1
    router_train = (
        num_experts
        * router_steps
        * router_batch_size
        * m
        * flops_per_token(router, m, training=True)
    )
    score_one = prefix_forward_flops(router, prefix_len)
    expert_tokens = batch_size * seq_len * flops_per_token(expert, seq_len, training=True)
    inference_m = inference_prefix_len if inference_prefix_len is not None else prefix_len
    return FlopAccount(
        router_training=router_train,
        router_em_scoring=num_experts * em_rounds * em_sequences * score_one,
        router_sharding=num_experts * train_sequences * score_one,
        expert_training=sum(expert_steps) * expert_tokens,
        dense_training=dense_steps * expert_tokens,
        routing_per_sequence=num_experts * prefix_forward_flops(router, inference_m),
        expert_per_sequence=seq_len * flops_per_token(expert, seq_len, training=False),
    )
