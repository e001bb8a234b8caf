"""FP-then-QAT schedules: the shared trunk, the two cooldown placements, validation."""

import pytest

from verger.core.train import wsd_schedule
from verger.qat_scaling import QATSchedule


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("f", [0.0, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_every_run_follows_the_trunk_until_its_branch_point(fused, f):
    s = QATSchedule(
        total_steps=200, qat_fraction=f, fused=fused, warmup_steps=10, qat_warmup_steps=5
    )
    assert s.switch_step == 200 - round(f * 200)
    assert all(s.lr(i) == s.trunk_lr(i) for i in range(s.branch_step))
    assert s.fake_quant_on(s.switch_step) if f > 0 else not s.fake_quant_on(199)
    assert not s.fake_quant_on(s.switch_step - 1) or s.switch_step == 0
    assert s.lr(199) == 0.0  # every run ends cooled down


def test_unfused_cools_down_before_qat_then_warms_up_again():
    s = QATSchedule(
        total_steps=100, qat_fraction=0.3, warmup_steps=5, cooldown_fraction=0.2, qat_warmup_steps=4
    )
    assert s.switch_step == 70 and s.fp_cooldown_steps == 14 and s.branch_step == 56
    fp = wsd_schedule(70, warmup_steps=5, cooldown_fraction=0.2, cooldown="1-sqrt")
    assert [s.lr(i) for i in range(70)] == [fp(i) for i in range(70)]  # a complete WSD FP run
    assert s.lr(69) == 0.0
    assert [s.lr(70 + i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]  # QAT warms up again
    qat = wsd_schedule(30, warmup_steps=4, cooldown_fraction=0.2, cooldown="1-sqrt")
    assert [s.lr(70 + i) for i in range(30)] == [qat(i) for i in range(30)]


def test_fused_starts_qat_at_the_peak_and_decays_inside_qat():
    s = QATSchedule(
        total_steps=100, qat_fraction=0.3, fused=True, warmup_steps=5, cooldown_fraction=0.2
    )
    assert s.branch_step == s.switch_step == 70 and s.fp_cooldown_steps == 0
    assert all(s.lr(i) == 1.0 for i in range(5, 80))  # no FP cooldown, QAT at the peak
    # with f >= cooldown_fraction, the fused run is the plain WSD run over all steps
    whole = wsd_schedule(100, warmup_steps=5, cooldown_fraction=0.2, cooldown="1-sqrt")
    assert [s.lr(i) for i in range(100)] == [whole(i) for i in range(100)]
    short = QATSchedule(total_steps=100, qat_fraction=0.1, fused=True, cooldown_fraction=0.2)
    assert short.qat_cooldown_steps == 10 and short.lr(89) == 1.0 and short.lr(90) < 1.0


def test_fused_and_unfused_runs_have_the_same_steps_and_switch():
    for f in (0.1, 0.25, 0.6):
        a = QATSchedule(total_steps=400, qat_fraction=f, warmup_steps=20)
        b = QATSchedule(total_steps=400, qat_fraction=f, fused=True, warmup_steps=20)
        assert (a.total_steps, a.switch_step, a.qat_steps) == (
            b.total_steps,
            b.switch_step,
            b.qat_steps,
        )


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(qat_fraction=1.5), "qat_fraction"),
        (dict(qat_fraction=-0.1), "qat_fraction"),
        (dict(qat_fraction=float("nan")), "qat_fraction"),
        (dict(qat_fraction="0.5"), "qat_fraction"),
        (dict(total_steps=0), "total_steps"),
        (dict(cooldown="step"), "cooldown"),
        (dict(cooldown_fraction=1.0), "cooldown_fraction"),
        (dict(fused=True, qat_lr_ratio=0.5), "qat_lr_ratio"),
        (dict(warmup_steps=90, qat_fraction=0.5), "warmup_steps"),
    ],
)
def test_bad_schedules_are_clear_errors(fields, match):
    base = dict(total_steps=100, qat_fraction=0.3)
    with pytest.raises(ValueError, match=match):
        QATSchedule(**{**base, **fields})
