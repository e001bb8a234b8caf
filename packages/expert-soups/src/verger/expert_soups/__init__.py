"""verger-expert-soups: Soup-of-Experts and the "Plan Early" specialization methods.

A Soup-of-Experts is a bank of expert parameters whose linear combination theta(h) =
S + sum_j alpha_j(h) E_j is one small model; the coefficients are a learned function of the
domain weights h, so any target mixture gets its own specialist in one weighted sum.
"""

from verger.core import package_version
from verger.expert_soups.config import (
    MetaDistributionConfig,
    SoupConfig,
    check_domain_weights,
)
from verger.expert_soups.ops import weighted_sum, weighted_sum_reference
from verger.expert_soups.soup import CoefficientNet, SoupOfExperts

__version__ = package_version("verger-expert-soups")

__all__ = [
    "CoefficientNet",
    "MetaDistributionConfig",
    "SoupConfig",
    "SoupOfExperts",
    "__version__",
    "check_domain_weights",
    "weighted_sum",
    "weighted_sum_reference",
]
