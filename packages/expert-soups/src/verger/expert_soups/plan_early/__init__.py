""" "Need a Small Specialized Language Model? Plan Early!": methods, costs and a planner.

Six ways to a small specialist (SLM, LLM, SLM-d, SLM-is, SLM-pn, SLM-mix) as pretrain and
specialize steps, their cost accounts (pretraining FLOPs once or per domain, specialization
FLOPs, inference parameters and FLOPs per token, in-domain tokens), the resumable grid of
records, and :func:`plan`, which ranks the methods for four budgets and a number of domains.
"""

from verger.expert_soups.plan_early.budgets import Budgets
from verger.expert_soups.plan_early.costs import (
    CostAccount,
    lm_forward_flops,
    lm_parameters,
    lm_train_flops,
    mixing_flops,
    soup_train_flops,
)
from verger.expert_soups.plan_early.grid import GridSpec, make_targets, read_records, run_grid
from verger.expert_soups.plan_early.importance import (
    importance_sampler,
    importance_weights,
    resampled_histogram,
)
from verger.expert_soups.plan_early.methods import (
    LLM,
    METHODS,
    SLM,
    Method,
    MethodContext,
    MethodSettings,
    Outcome,
    SLMDistilled,
    SLMImportance,
    SLMMixture,
    SLMProjected,
    Target,
    get_method,
)
from verger.expert_soups.plan_early.planner import (
    MethodSummary,
    PlanRow,
    cost_crossover,
    cost_curves,
    plan,
    plot_costs,
    plot_loss_vs_cost,
    summarize,
)
from verger.expert_soups.plan_early.routing import group_clusters, group_mass, route

__all__ = [
    "LLM",
    "METHODS",
    "SLM",
    "Budgets",
    "CostAccount",
    "GridSpec",
    "Method",
    "MethodContext",
    "MethodSettings",
    "MethodSummary",
    "Outcome",
    "PlanRow",
    "SLMDistilled",
    "SLMImportance",
    "SLMMixture",
    "SLMProjected",
    "Target",
    "cost_crossover",
    "cost_curves",
    "get_method",
    "group_clusters",
    "group_mass",
    "importance_sampler",
    "importance_weights",
    "lm_forward_flops",
    "lm_parameters",
    "lm_train_flops",
    "make_targets",
    "mixing_flops",
    "plan",
    "plot_costs",
    "plot_loss_vs_cost",
    "read_records",
    "resampled_histogram",
    "route",
    "run_grid",
    "soup_train_flops",
    "summarize",
]
