"""Learning-rate schedules of an FP-then-QAT run, built on verger-core's WSD schedule.

A run of ``total_steps`` spends the last ``round(f * total_steps)`` steps in QAT (f is the
QAT fraction). Two shapes (Dremov et al., 2025):

- ``fused=False`` (the baseline): the FP phase is a complete warmup-stable-decay run (its
  own cooldown over ``cooldown_fraction`` of the FP steps), then QAT warms up again
  (``qat_warmup_steps``) to ``qat_lr_ratio`` times the peak and decays over
  ``cooldown_fraction`` of the QAT steps.
- ``fused=True`` (cooldown & QAT fusion): no FP cooldown; QAT starts at the peak LR and the
  decay happens inside QAT. The decay is the one a plain WSD run of ``total_steps`` would
  end with (``cooldown_fraction`` of all steps), or the whole QAT phase when that is
  shorter: with f >= ``cooldown_fraction`` a fused run is the FP run's own WSD schedule
  with fake quantization switched on at step ``(1 - f) * total_steps``. (The paper does not
  publish its cooldown lengths; this is our choice.)

Both switch fake quantization on at the same step and see the same batches. Every run
shares its first ``branch_step`` steps with the *trunk*, a warmup followed by a constant
peak LR (:func:`trunk_lr`): a sweep trains the trunk once and branches every run from its
checkpoint at that step (the start of the FP cooldown, or the switch when fused).
"""

from __future__ import annotations

from dataclasses import dataclass

from verger.core.train import wsd_schedule
from verger.core.validation import finite_number, flag, integer, one_of, probability

COOLDOWNS = ("linear", "1-sqrt", "cosine")


def check_fraction(name: str, value: object) -> float:
    """A QAT fraction: the share of tokens spent in QAT, a finite number in [0, 1]."""
    return probability(name, value)


def trunk_lr(step: int, warmup_steps: int) -> float:
    """The shared FP prefix: linear warmup (as verger-core's schedules), then 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


@dataclass(kw_only=True, frozen=True)
class QATSchedule:
    """LR multiplier and fake-quant switch of one FP-then-QAT run (see the module doc)."""

    total_steps: int
    qat_fraction: float
    fused: bool = False
    warmup_steps: int = 0
    cooldown_fraction: float = 0.2
    cooldown: str = "1-sqrt"
    qat_warmup_steps: int = 0
    qat_lr_ratio: float = 1.0
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        integer("total_steps", self.total_steps, at_least=1)
        check_fraction("qat_fraction", self.qat_fraction)
        flag("fused", self.fused)
        integer("warmup_steps", self.warmup_steps, at_least=0)
        integer("qat_warmup_steps", self.qat_warmup_steps, at_least=0)
        probability("cooldown_fraction", self.cooldown_fraction, open_right=True)
        one_of("cooldown", self.cooldown, COOLDOWNS)
        finite_number("qat_lr_ratio", self.qat_lr_ratio, above=0.0)
        probability("min_ratio", self.min_ratio)
        if self.fused and self.qat_lr_ratio != 1.0:
            raise ValueError(
                "qat_lr_ratio applies to the unfused schedule: fused QAT starts at the peak"
            )
        if self.warmup_steps > self.branch_step and self.qat_steps < self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} does not fit before the branch point "
                f"{self.branch_step}: the trunk must finish its warmup before any run branches"
            )

    # --------------------------------------------------------------- phases
    @property
    def qat_steps(self) -> int:
        return round(self.qat_fraction * self.total_steps)

    @property
    def switch_step(self) -> int:
        """The first step trained with fake quantization on."""
        return self.total_steps - self.qat_steps

    @property
    def fp_cooldown_steps(self) -> int:
        if self.fused and self.qat_steps > 0:
            return 0
        return round(self.cooldown_fraction * self.switch_step)

    @property
    def qat_cooldown_steps(self) -> int:
        if self.fused:  # the whole run's WSD cooldown, inside QAT (all of QAT if shorter)
            return min(self.qat_steps, round(self.cooldown_fraction * self.total_steps))
        return round(self.cooldown_fraction * self.qat_steps)

    @property
    def branch_step(self) -> int:
        """The last step shared with the trunk (warmup + constant peak)."""
        return self.switch_step - self.fp_cooldown_steps

    # --------------------------------------------------------------- LR
    def lr(self, step: int) -> float:
        """LR multiplier (of the FP peak) for optimizer step ``step`` (0-based)."""
        integer("step", step, at_least=0)
        step = min(step, self.total_steps - 1)  # a scheduler steps once past the end
        if step < self.switch_step:
            return self._fp_lr(step)
        return self._qat_lr(step - self.switch_step)

    def fake_quant_on(self, step: int) -> bool:
        return step >= self.switch_step

    def _fp_lr(self, step: int) -> float:
        n = self.switch_step
        f = wsd_schedule(
            n,
            warmup_steps=min(self.warmup_steps, self.branch_step),
            cooldown_fraction=self.fp_cooldown_steps / n,
            cooldown=self.cooldown,  # type: ignore[arg-type]
            min_ratio=self.min_ratio,
        )
        return f(step)

    def _qat_lr(self, qstep: int) -> float:
        n = self.qat_steps
        if self.switch_step == 0:  # QAT from scratch: the run's own warmup
            warmup = self.warmup_steps
        else:
            warmup = 0 if self.fused else self.qat_warmup_steps
        cooldown = self.qat_cooldown_steps
        warmup = max(0, min(warmup, n - cooldown))
        f = wsd_schedule(
            n,
            warmup_steps=warmup,
            cooldown_fraction=cooldown / n,
            cooldown=self.cooldown,  # type: ignore[arg-type]
            min_ratio=self.min_ratio,
        )
        return self.qat_lr_ratio * f(qstep)

    def trunk_lr(self, step: int) -> float:
        return trunk_lr(step, self.warmup_steps)
