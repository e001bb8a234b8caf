"""The four budgets of "Plan Early": generic pretraining, specialization, inference, data."""

from __future__ import annotations

from dataclasses import dataclass

from verger.core.validation import finite_number, integer


@dataclass(kw_only=True)
class Budgets:
    """What a specialist may cost, per the paper's four variables.

    - ``pretrain_flops``: generic pretraining, paid once and shared by every domain.
    - ``specialize_flops``: per target domain (fine-tuning; for SLM-is its whole targeted
      pretraining, for SLM-d the teacher's fine-tune and distillation).
    - ``inference_params``: the largest model that may be served (parameters).
    - ``in_domain_tokens``: the specialist data available per domain.
    """

    pretrain_flops: float
    specialize_flops: float
    inference_params: int
    in_domain_tokens: int

    def __post_init__(self) -> None:
        finite_number("Budgets.pretrain_flops", self.pretrain_flops, above=0)
        finite_number("Budgets.specialize_flops", self.specialize_flops, above=0)
        integer("Budgets.inference_params", self.inference_params, at_least=1)
        if isinstance(self.in_domain_tokens, int) and self.in_domain_tokens == 0:
            raise ValueError(
                "Budgets.in_domain_tokens=0: every method specializes on in-domain data; "
                "give at least one token"
            )
        integer("Budgets.in_domain_tokens", self.in_domain_tokens, at_least=1)

    def check_model(self, parameters: int, *, what: str = "the model") -> None:
        """Raise ``ValueError`` when ``parameters`` exceed the inference budget."""
        if parameters > self.inference_params:
            raise ValueError(
                f"{what} has {parameters:,} parameters, more than the inference budget "
                f"inference_params={self.inference_params:,}"
            )
