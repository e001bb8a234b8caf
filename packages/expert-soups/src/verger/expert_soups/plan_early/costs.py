"""Cost accounts of the "Plan Early" methods, from verger-core's analytic FLOP counts.

Every figure is matmul FLOPs (2 per multiply-add; training = 3x forward), the convention of
``verger.core.nn.flops_per_token`` and of ``torch.utils.flop_counter`` (the tests check the
accounts against the counter within 2%). A soup's training step adds its weighted sums:
forward ``2 n P`` per mixed tensor of P elements (``2 out in n r`` for rank-r experts),
backward twice that; the coefficient network is a few thousand FLOPs and is left out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from verger.core.nn import TransformerConfig, flops_per_token
from verger.expert_soups.config import SoupConfig
from verger.expert_soups.soup import SoupOfExperts


def lm_parameters(config: TransformerConfig) -> int:
    """Parameters of a ``TransformerLM`` of ``config`` (a tied weight once), no allocation."""
    return sum(s.numel() for s in SoupOfExperts.shared_parameter_shapes(config).values())


def lm_train_flops(config: TransformerConfig, tokens: int) -> float:
    """Training FLOPs (forward + backward) of a ``TransformerLM`` on ``tokens`` tokens."""
    return float(flops_per_token(config, config.max_seq_len, training=True)) * tokens


def lm_forward_flops(config: TransformerConfig, tokens: int) -> float:
    """Forward FLOPs of a ``TransformerLM`` on ``tokens`` tokens (windows of max_seq_len)."""
    return float(flops_per_token(config, config.max_seq_len, training=False)) * tokens


def mixing_flops(config: SoupConfig, *, training: bool) -> float:
    """FLOPs of one theta(h) (every weighted sum); training adds the backward (2x)."""
    shapes = SoupOfExperts.shared_parameter_shapes(config.model)
    forward = 0.0
    for name in SoupOfExperts.expert_parameter_names(config):
        shape = shapes[name]
        numel = shape.numel()
        if config.expert_rank is not None and len(shape) == 2:
            forward += 2.0 * numel * config.n_experts * config.expert_rank
        else:
            forward += 2.0 * numel * config.n_experts
    return 3 * forward if training else forward


def soup_train_flops(config: SoupConfig, *, tokens: int, instantiations: int) -> float:
    """A soup's training FLOPs: the model on ``tokens`` plus ``instantiations`` theta(h)."""
    return lm_train_flops(config.model, tokens) + instantiations * mixing_flops(
        config, training=True
    )


@dataclass(frozen=True)
class CostAccount:
    """What one method costs to serve domains.

    Pretraining is ``pretrain_flops_shared`` once plus ``pretrain_flops_per_domain`` for
    each domain (SLM-is trains a model per target; SLM-d fine-tunes its teacher per
    target); ``specialize_flops_per_domain`` is the fine-tune (and its extras); inference is
    ``inference_params`` and ``inference_flops_per_token``; ``in_domain_tokens`` is the
    specialist data used.
    """

    method: str
    pretrain_flops_shared: float
    pretrain_flops_per_domain: float
    specialize_flops_per_domain: float
    inference_params: int
    inference_flops_per_token: float
    in_domain_tokens: int

    def per_domain_flops(self) -> float:
        """FLOPs spent for each new domain (the paper counts all of it as specialization)."""
        return self.pretrain_flops_per_domain + self.specialize_flops_per_domain

    def total_flops(self, n_domains: int) -> float:
        """C(N) = C_shared + N * C_per_domain."""
        if n_domains < 0:
            raise ValueError(f"n_domains={n_domains} must be >= 0")
        return self.pretrain_flops_shared + n_domains * self.per_domain_flops()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
