"""The scaling law: S and f*(S) closed forms, recovery of known constants from noisy
synthetic records, bootstrap and leave-one-out, the planner, plots, bad input."""

import math

import numpy as np
import pytest

from verger.qat_scaling import (
    FittedLaw,
    LawParams,
    PlanError,
    fit_fraction_constant,
    fit_law,
    leave_one_out,
    load_law,
    optimal_fraction,
    plan,
    predict_loss,
    save_law,
    tokens_per_parameter_byte,
)
from verger.qat_scaling.law import NAMES

TRUE = dict(
    E=1.2, A=40.0, alpha=0.35, B_D=60.0, beta=0.3, theta=0.3, kappa=0.6, phi=2.0, chi=0.7,
    psi=0.1, omega=0.6, lam=0.5, mu=0.4, nu=0.05, xi=0.4, rho=0.2,
)  # fmt: skip
TRUE_PARAMS = LawParams.from_dict(TRUE)


def synthetic_records(
    noise, seed, sizes=(3e4, 1e5, 3e5, 1e6), budgets=(1e6, 3e6, 1e7, 3e7), bits=(1, 2, 4, 8)
):
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        for d in budgets:
            loss = float(predict_loss(TRUE_PARAMS, n, d, 0.0, 0))
            out.append(dict(n_params=n, tokens=d, qat_fraction=0.0, bits=None, val_loss=loss * (1 + noise * rng.standard_normal())))  # fmt: skip
            for b in bits:
                for f in np.arange(1, 10) / 10:
                    loss = float(predict_loss(TRUE_PARAMS, n, d, f, b))
                    out.append(dict(n_params=n, tokens=d, qat_fraction=float(f), bits=b, val_loss=loss * (1 + noise * rng.standard_normal())))  # fmt: skip
    return out


def test_tokens_per_parameter_byte_and_the_paper_fraction_rule():
    assert tokens_per_parameter_byte(8e9, 1e9, 4) == 16.0
    # DETAILS.md's check of a = 6.7297: S = 1e2, 1e3, 1e4 -> 0.23, 0.38, 0.48
    assert [round(optimal_fraction(s), 2) for s in (1e2, 1e3, 1e4)] == [0.23, 0.38, 0.48]
    assert optimal_fraction(math.e**2, a=2.0) == pytest.approx(math.exp(-1.0))
    s = np.geomspace(5, 1e5, 12)
    f = [optimal_fraction(x, 6.7297) for x in s]
    assert fit_fraction_constant(s, f) == pytest.approx(6.7297, abs=1e-3)
    with pytest.raises(ValueError, match="s_total"):
        optimal_fraction(0.5)
    with pytest.raises(ValueError, match="S must be"):
        fit_fraction_constant([1.0, 10.0], [0.1, 0.2])


def test_the_law_has_the_published_form():
    p = TRUE_PARAMS.as_dict()
    n, d, f, b = 2e5, 5e6, 0.3, 4
    s = d / (n * b / 8)
    want = (
        p["E"] + p["A"] / n ** p["alpha"] + p["B_D"] / d ** p["beta"]
        + p["theta"] * 2 ** (-p["kappa"] * b)
        + p["phi"] * 2 ** (-p["chi"] * b) / (n ** p["psi"] * (f * s) ** p["omega"])
        + p["lam"] * 2 ** (-p["mu"] * b) / (n ** p["nu"] * ((1 - f) * s) ** p["xi"] * (f * s) ** p["rho"])
    )  # fmt: skip
    assert float(predict_loss(TRUE_PARAMS, n, d, f, b)) == pytest.approx(want, rel=1e-12)
    fp = p["E"] + p["A"] / n ** p["alpha"] + p["B_D"] / d ** p["beta"]
    assert float(predict_loss(TRUE_PARAMS, n, d, 0.0, 0)) == pytest.approx(fp, rel=1e-12)
    with pytest.raises(ValueError, match="0 < qat_fraction < 1"):
        predict_loss(TRUE_PARAMS, n, d, 1.0, 4)


def test_fit_recovers_known_constants_and_the_optimal_fraction():
    records = synthetic_records(noise=0.001, seed=0)
    law = fit_law(records, starts=8, seed=0)
    got = law.params.as_dict()
    for name in ("E", "A", "B_D", "theta"):
        assert got[name] == pytest.approx(TRUE[name], rel=0.08), name
    for name in ("alpha", "beta", "kappa", "omega", "mu"):
        assert got[name] == pytest.approx(TRUE[name], abs=0.05), name
    # the penalty constants trade off against each other; their predictions do not
    rng = np.random.default_rng(7)
    n, d = (
        np.exp(rng.uniform(np.log(3e4), np.log(1e6), 200)),
        np.exp(rng.uniform(np.log(1e6), np.log(3e7), 200)),
    )
    f, b = rng.uniform(0.1, 0.9, 200), rng.choice([1, 2, 4, 8], 200)
    rel = law.predict(n, d, f, b) / predict_loss(TRUE_PARAMS, n, d, f, b) - 1
    assert np.abs(rel).max() < 0.003
    for n, d, b in [(1e5, 3e6, 4), (1e6, 1e7, 2), (3e4, 3e7, 8), (3e5, 1e6, 1), (5e5, 5e6, 4)]:
        f_true = FittedLaw(TRUE_PARAMS, law.free, 0.0, 0).optimal_fraction(n, d, b)
        assert law.optimal_fraction(n, d, b) == pytest.approx(f_true, abs=0.02), (n, d, b)


def test_bootstrap_intervals_and_leave_one_out_error():
    records = synthetic_records(
        noise=0.003, seed=1, sizes=(5e4, 2e5, 5e5), budgets=(2e6, 6e6, 2e7), bits=(2, 4)
    )
    law = fit_law(records, starts=4, bootstrap=12, seed=0)
    assert len(law.bootstrap) == 12 and law.free["alpha"] and law.free["kappa"]
    lo, hi = law.interval(2e5, 6e6, 0.4, 4)
    truth = float(predict_loss(TRUE_PARAMS, 2e5, 6e6, 0.4, 4))
    assert lo < hi and lo - 0.01 < truth < hi + 0.01
    intervals = law.param_intervals()
    assert set(intervals) == {
        "E",
        "A",
        "alpha",
        "B_D",
        "beta",
        "theta",
        "kappa",
        "phi",
        "chi",
        "psi",
        "omega",
        "lam",
        "mu",
        "nu",
        "xi",
        "rho",
    }
    assert all(low <= high for _, low, high in intervals.values())
    loo = leave_one_out(records[:40], starts=2)
    assert loo["n"] == 40
    mean_loss = np.mean([r["val_loss"] for r in records[:40]])
    assert loo["rmse"] < 0.01 * mean_loss  # about the noise (0.3%), not the loss scale


def test_unidentifiable_parameters_are_held_at_zero():
    records = [r for r in synthetic_records(0.0, 0, sizes=(1e5,), budgets=(1e6, 1e7), bits=(4,))]
    law = fit_law(records, starts=2)
    assert not law.free["alpha"] and not law.free["psi"] and not law.free["kappa"]
    got = law.params.as_dict()
    assert got["A"] == 0.0 and got["alpha"] == 0.0 and got["kappa"] == 0.0
    rel = law.predict(1e5, 1e7, 0.35, 4) / predict_loss(TRUE_PARAMS, 1e5, 1e7, 0.35, 4) - 1
    assert abs(float(rel)) < 0.002


def test_the_optimal_fraction_stays_within_the_fitted_fractions(tmp_path):
    records = [
        r
        for r in synthetic_records(0.0, 0, sizes=(1e5,), budgets=(1e6, 1e7), bits=(4,))
        if r["bits"] is None or 0.3 <= r["qat_fraction"] <= 0.6
    ]
    law = fit_law(records, starts=2)
    assert law.f_range == pytest.approx((0.3, 0.6))
    unbounded = FittedLaw(law.params, law.free, 0.0, 0)  # searches all of (0, 1)
    for d in (1e6, 1e7, 1e9):
        f = law.optimal_fraction(1e5, d, 4)
        assert 0.3 <= f <= 0.6
        assert f == pytest.approx(
            min(max(unbounded.optimal_fraction(1e5, d, 4), 0.3), 0.6), abs=0.01
        )
    again = load_law(save_law(law, tmp_path / "law.json"))
    assert again.f_range == law.f_range and again.to_dict() == law.to_dict()


def test_fit_rejects_bad_records():
    with pytest.raises(ValueError, match="no records"):
        fit_law([])
    with pytest.raises(ValueError, match="bits=5"):
        fit_law([dict(n_params=1e5, tokens=1e6, qat_fraction=0.5, bits=5, val_loss=3.0)])
    with pytest.raises(ValueError, match="cannot constrain"):
        fit_law(synthetic_records(0.0, 0)[:5])


def _true_law():
    free = dict.fromkeys(NAMES, True)
    boot = [LawParams.from_dict({**TRUE, "E": TRUE["E"] * k}) for k in (0.98, 1.0, 1.02)]
    return FittedLaw(TRUE_PARAMS, free, 0.0, 0, bootstrap=boot)


def test_plan_picks_the_best_bits_and_fraction_under_a_memory_budget():
    law = _true_law()
    result = plan(law, memory_bytes=5e4, tokens=2e7, bits=(1, 2, 4, 8))
    brute = []
    for b in (1, 2, 4, 8):
        n = int(8 * 5e4 / b)
        losses = predict_loss(TRUE_PARAMS, n, 2e7, np.linspace(0.01, 0.99, 99), b)
        brute.append((float(losses.min()), b))
    best_loss, best_bits = min(brute)
    assert result.bits == best_bits
    assert result.predicted_loss <= best_loss + 1e-9
    assert {c.bits for c in result.candidates} == {1, 2, 4, 8}
    assert 0 < result.qat_fraction < 1
    lo, hi = result.interval
    assert lo < result.predicted_loss < hi  # E scaled by 0.98 / 1.02 in the bootstrap
    fixed = plan(law, n_params=1e5, flops=6 * 1e5 * 1e7, bits=(2, 4))
    assert all(c.n_params == 1e5 and c.tokens == pytest.approx(1e7) for c in fixed.candidates)


def test_a_plan_no_candidate_fits_is_a_clear_error():
    law = _true_law()
    with pytest.raises(PlanError, match="no candidate bit width fits"):
        plan(law, memory_bytes=1e3, tokens=1e7, min_params=1e5)
    with pytest.raises(PlanError, match="S > 1"):
        plan(law, n_params=1e6, tokens=1e5, bits=(8,))
    with pytest.raises(ValueError, match="exactly one of memory_bytes or n_params"):
        plan(law, memory_bytes=1e4, n_params=1e5, tokens=1e6)
    with pytest.raises(ValueError, match="exactly one of tokens or flops"):
        plan(law, n_params=1e5)
    with pytest.raises(ValueError, match="bits=5"):
        plan(law, n_params=1e5, tokens=1e7, bits=(4, 5))
    with pytest.raises(ValueError, match="memory_bytes"):
        plan(law, memory_bytes=-1.0, tokens=1e7)


def test_loss_surface_plot_renders(tmp_path):
    from verger.qat_scaling.plots import plot_loss_surface, plot_optimal_fractions

    law = _true_law()
    result = plan(law, memory_bytes=5e4, tokens=2e7, bits=(2, 4, 8))
    fig = plot_loss_surface(law, result)
    fig.savefig(tmp_path / "surface.png")
    groups = [dict(s_total=s, measured=0.3, predicted=0.35, bits=4) for s in (10.0, 100.0)]
    plot_optimal_fractions(groups, a=3.0).savefig(tmp_path / "fractions.png")
    assert (tmp_path / "surface.png").stat().st_size > 10_000
    assert (tmp_path / "fractions.png").stat().st_size > 5_000


def test_loss_surface_plot_draws_an_interval_that_excludes_the_estimate(tmp_path):
    """A bootstrap percentile interval may lie wholly above (or below) the full-data estimate;
    the plot used matplotlib's errorbar, which refuses the negative extent that gives."""
    import dataclasses

    from verger.qat_scaling.plots import plot_loss_surface

    law = _true_law()
    result = plan(law, memory_bytes=5e4, tokens=2e7, bits=(2, 4, 8))
    above = (result.predicted_loss + 0.01, result.predicted_loss + 0.05)
    best = dataclasses.replace(result.best, interval=above)
    candidates = [best if c is result.best else c for c in result.candidates]
    shifted = dataclasses.replace(result, best=best, candidates=candidates)
    plot_loss_surface(law, shifted).savefig(tmp_path / "surface.png")
    assert (tmp_path / "surface.png").stat().st_size > 10_000
