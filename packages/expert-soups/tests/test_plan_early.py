"""Plan Early: importance sampling, projected networks, the mixture's routing, FLOP accounts
against the FLOP counter, reproducible grid records, budgets and the planner."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2
from torch.nn.attention import SDPBackend, sdpa_kernel

from verger.core.bench import count_flops
from verger.core.nn import TransformerLM
from verger.expert_soups.finetune import FineTuneSettings
from verger.expert_soups.plan_early import (
    METHODS,
    Budgets,
    GridSpec,
    MethodContext,
    MethodSettings,
    SLMMixture,
    SLMProjected,
    Target,
    cost_crossover,
    get_method,
    group_clusters,
    importance_sampler,
    importance_weights,
    plan,
    read_records,
    resampled_histogram,
    route,
    run_grid,
    summarize,
)
from verger.expert_soups.plan_early.grid import make_targets
from verger.expert_soups.workbench import DataSettings, Workbench


def _settings(**kw):
    fields = dict(
        slm_size="nano", llm_size="micro", pretrain_steps=3, batch_size=4, warmup_steps=1,
        pn_experts=2, pn_embedding=4, pn_groups=2, mix_experts=2,
        finetune=FineTuneSettings(steps=2, batch_size=2, holdout_fraction=0.25, eval_every=1),
    )  # fmt: skip
    fields.update(kw)
    return MethodSettings(**fields)


def test_importance_weights_closed_form():
    generic = torch.tensor([0.5, 0.3, 0.2])
    specific = torch.tensor([0.1, 0.0, 0.9])
    w = importance_weights(specific, generic)
    torch.testing.assert_close(w, torch.tensor([0.2, 0.0, 4.5], dtype=torch.float64))
    torch.testing.assert_close(resampled_histogram(w, generic), specific)
    with pytest.raises(ValueError, match="no generic data"):
        importance_weights(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="simplex"):
        importance_weights(torch.tensor([0.5, 0.6, 0.0]), generic)


def test_importance_sampled_stream_has_the_target_histogram(tiny_bench):
    clusters = tiny_bench.clusters
    generic = clusters.natural_weights()
    target = torch.tensor([0.7, 0.0, 0.3])
    w = importance_weights(target, generic)
    assert torch.allclose(w * generic.double(), target.double() * (w * generic.double()).sum())
    sampler = importance_sampler(clusters, target, batch_size=50, seed=0)
    counts = np.zeros(3)
    for _ in range(60):
        counts += np.bincount(sampler.sample()[2].numpy(), minlength=3)
    assert counts[1] == 0
    expected = 3000 * target.numpy()[[0, 2]]
    stat = ((counts[[0, 2]] - expected) ** 2 / expected).sum()
    assert stat < chi2.ppf(0.999, 1)


def test_projected_network_with_one_cluster_is_a_plain_model(tiny_bench):
    one = Workbench.from_corpus(
        tiny_bench.corpus, DataSettings(n_clusters=1, seq_len=16, val_windows=4)
    )
    ctx = MethodContext(one, _settings())
    method = SLMProjected()
    soup = method.soup(ctx)
    assert soup.config.n_domains == 1
    targets = make_targets(one, ["a", "c"], 64, seed=0)
    outcomes = [method.specialize(ctx, t) for t, _ in targets]
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    for outcome in outcomes:
        base = outcome.base
        assert type(base) is TransformerLM and base.config == ctx.slm
        with torch.no_grad():
            assert torch.equal(base(ids).logits, soup(ids, h=[1.0]).logits)
        assert outcome.account.inference_params == base.num_parameters()
    # every target gets the same model: the one cluster's instantiation
    a, c = (o.base.state_dict() for o in outcomes)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_mixture_routes_targets_to_their_dominant_group():
    centroids = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.0, 10.1]])
    groups = group_clusters(centroids, np.ones(4), 2, seed=0)
    assert groups[0] == groups[1] != groups[2] == groups[3]
    h = torch.tensor([0.3, 0.3, 0.4, 0.0])  # the largest cluster (2) is not in the top group
    assert route(h, groups, 2) == groups[0]
    assert route(torch.tensor([0.0, 0.1, 0.5, 0.4]), groups, 2) == groups[2]
    assert list(group_clusters(centroids, np.ones(4), 4)) == [0, 1, 2, 3]


def test_mixture_specializes_the_routed_expert(tiny_bench):
    ctx = MethodContext(tiny_bench, _settings(mix_experts=3))
    method = SLMMixture()
    for target, _ in make_targets(tiny_bench, ["a", "b", "c"], 64, seed=0):
        outcome = method.specialize(ctx, target)
        expert = route(target.h, method.groups(ctx), 3)
        assert outcome.base is method.expert(ctx, expert)
    assert sum(method.expert_steps(ctx)) == ctx.settings.pretrain_steps


@pytest.mark.parametrize("method", METHODS)
def test_flop_accounts_match_the_flop_counter(tiny_bench, method):
    ctx = MethodContext(tiny_bench, _settings())
    m = get_method(method)
    target = make_targets(tiny_bench, ["b"], 64, seed=0)[0][0]
    outcome = {}
    with sdpa_kernel(SDPBackend.MATH):  # attention as matmuls, as the analytic count has it
        counted_pretrain = count_flops(lambda: m.pretrain(ctx))
        counted_per_domain = count_flops(lambda: outcome.setdefault("o", m.specialize(ctx, target)))
    account = outcome["o"].account
    if method == "slm_d" or method != "slm_is":  # its shared pretraining is the SLM's and the LLM's
        assert counted_pretrain == pytest.approx(account.pretrain_flops_shared, rel=0.02)
    else:
        assert counted_pretrain == 0 and account.pretrain_flops_shared == 0
    assert counted_per_domain == pytest.approx(account.per_domain_flops(), rel=0.02)
    assert account.in_domain_tokens == 64
    assert account.inference_flops_per_token > 0


def test_same_seed_same_records_and_resume(tiny_bench, tmp_path):
    spec = GridSpec(methods=("slm", "slm_is", "slm_pn"), sample_tokens=(48, 96), targets=("a",))
    first = run_grid(spec, tiny_bench, _settings(), tmp_path / "one", show_progress=False)
    second = run_grid(spec, tiny_bench, _settings(), tmp_path / "two", show_progress=False)
    assert len(first) == 6 and first == second
    assert {r["method"] for r in first} == {"slm", "slm_is", "slm_pn"}
    # kill the last write midway: the torn line is dropped and only that cell reruns
    path = tmp_path / "one" / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:20])
    assert len(read_records(path)) == 5
    again = run_grid(spec, tiny_bench, _settings(), tmp_path / "one", show_progress=False)
    assert again == first
    other_seed = run_grid(
        dataclasses.replace(spec, seeds=(1,)), tiny_bench, _settings(), tmp_path / "three",
        show_progress=False,
    )  # fmt: skip
    assert [r["loss_specialized"] for r in other_seed] != [r["loss_specialized"] for r in first]


def test_bad_budgets_are_clear_errors():
    ok = dict(
        pretrain_flops=1e12, specialize_flops=1e9, inference_params=30_000, in_domain_tokens=4096
    )
    with pytest.raises(ValueError, match="pretrain_flops"):
        Budgets(**{**ok, "pretrain_flops": -1.0})
    with pytest.raises(ValueError, match="in_domain_tokens=0"):
        Budgets(**{**ok, "in_domain_tokens": 0})
    with pytest.raises(ValueError, match="specialize_flops"):
        Budgets(**{**ok, "specialize_flops": math.nan})
    with pytest.raises(ValueError, match="more than the inference budget"):
        Budgets(**ok).check_model(120_000, what="the SLM")
    with pytest.raises(ValueError, match="sample_tokens holds 0"):
        GridSpec(sample_tokens=(0,))
    with pytest.raises(ValueError, match="methods"):
        GridSpec(methods=("slm", "moe"))
    with pytest.raises(ValueError, match="pn_groups"):
        _settings(batch_size=5, pn_groups=2)


def _record(method, loss, shared, per_domain, params=1000, tokens=100):
    return {
        "method": method, "target": "x", "sample_tokens": tokens, "seed": 0,
        "loss_pretrained": loss + 1, "loss_specialized": loss,
        "pretrain_flops_shared": shared, "pretrain_flops_per_domain": per_domain,
        "specialize_flops_per_domain": 10.0, "inference_params": params,
        "inference_flops_per_token": 1.0, "in_domain_tokens": tokens,
    }  # fmt: skip


def test_planner_ranks_feasible_methods_and_explains_the_rest():
    records = [
        _record("slm", 2.0, shared=1000, per_domain=0),
        _record("llm", 1.5, shared=1000, per_domain=0, params=5000),
        _record("slm_is", 1.8, shared=0, per_domain=1000),
        _record("slm_pn", 1.9, shared=3000, per_domain=0),
    ]
    budgets = Budgets(
        pretrain_flops=2000, specialize_flops=5000, inference_params=1000, in_domain_tokens=100
    )
    rows = plan(records, budgets, n_domains=4)
    assert [r.method for r in rows] == ["slm_is", "slm", "llm", "slm_pn"]
    assert [r.feasible for r in rows] == [True, True, False, False]
    assert "inference budget" in rows[2].reasons[0] and "pretraining" in rows[3].reasons[0]
    assert rows[0].total_flops == 4 * 1010
    too_little = plan(records, dataclasses.replace(budgets, in_domain_tokens=50), n_domains=1)
    assert not any(r.feasible for r in too_little)
    # C_is(N) = 1010 N, C_pn(N) = 3000 + 10 N: equal at N = 3, SLM-is dearer from N = 4
    assert cost_crossover(summarize(records), sample_tokens=100) == 4


def test_targets_carry_their_histogram(tiny_bench):
    ((target, mixture),) = make_targets(tiny_bench, ["c"], 80, seed=0)
    assert isinstance(target, Target) and mixture == {"c": 1.0}
    assert target.sample_tokens.numel() == 80
    assert float(target.h.max()) == 1.0  # one topic, one cluster
