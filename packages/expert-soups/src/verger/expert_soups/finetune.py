"""The short fine-tune every specialist gets: a few AdamW steps on the in-domain sample.

One function for every method of both papers, so "the same fine-tune" is literally the same
code and settings: random windows of the sample, constant learning rate, optional early
stopping on a held-out tail of the sample (never on the test data), optional distillation
from a teacher's next-token distributions (SLM-d). Steps run through verger-core's
``TrainLoop.train_step`` (clipping, NaN/inf stop).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from verger.core.nn import TransformerLM
from verger.core.train import LoopConfig, TrainLoop
from verger.core.validation import finite_number, integer
from verger.expert_soups.domains import pack


@dataclass(kw_only=True)
class FineTuneSettings:
    """``steps`` AdamW steps of ``batch_size`` windows at a constant ``lr``.

    ``holdout_fraction > 0`` keeps that tail of the sample aside, evaluates it every
    ``eval_every`` steps and returns the best state (early stopping; the paper fine-tunes
    at a third of the pretraining rate with early stopping). ``distill_weight`` mixes the
    teacher's soft targets into the loss when a teacher is given (SLM-d).
    """

    steps: int = 40
    lr: float = 1e-3
    batch_size: int = 16
    holdout_fraction: float = 0.0
    eval_every: int = 10
    distill_weight: float = 0.5
    grad_clip: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        integer("FineTuneSettings.steps", self.steps, at_least=0)
        finite_number("FineTuneSettings.lr", self.lr, above=0)
        integer("FineTuneSettings.batch_size", self.batch_size, at_least=1)
        frac = finite_number("FineTuneSettings.holdout_fraction", self.holdout_fraction, at_least=0)
        if frac >= 0.5:
            raise ValueError(
                f"FineTuneSettings.holdout_fraction={self.holdout_fraction!r} must be in [0, 0.5)"
            )
        integer("FineTuneSettings.eval_every", self.eval_every, at_least=1)
        w = finite_number("FineTuneSettings.distill_weight", self.distill_weight, at_least=0)
        if w > 1:
            raise ValueError(
                f"FineTuneSettings.distill_weight={self.distill_weight!r} must be in [0, 1]"
            )
        if self.grad_clip is not None:
            finite_number("FineTuneSettings.grad_clip", self.grad_clip, above=0)
        integer("FineTuneSettings.seed", self.seed, at_least=0)


@dataclass
class FineTuneResult:
    """The fine-tuned copy and what it cost: tokens trained on (student forward+backward),
    tokens evaluated for early stopping (forward) and tokens the teacher saw (forward)."""

    model: TransformerLM
    steps: int
    best_step: int
    train_tokens: int
    eval_tokens: int
    teacher_tokens: int


@torch.no_grad()
def _dev_loss(model: nn.Module, windows: tuple[torch.Tensor, torch.Tensor]) -> float:
    # From the logits: the fused loss spends an extra lm_head matmul even under no_grad
    # (verger-core 0.2), which would make early stopping dearer than a forward pass.
    model.eval()
    logits = model(windows[0]).logits.float()
    loss = float(F.cross_entropy(logits.flatten(0, 1), windows[1].flatten()))
    model.train()
    return loss


def _distill_loss(
    student: nn.Module, teacher: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], weight: float
) -> torch.Tensor:
    inputs, targets = batch
    # one lm_head pass for both terms (a fused model would otherwise compute it twice)
    log_probs = F.log_softmax(student(inputs).logits.float(), dim=-1)
    with torch.no_grad():
        soft = F.softmax(teacher(inputs).logits.float(), dim=-1)
    hard = F.nll_loss(log_probs.flatten(0, 1), targets.flatten(), ignore_index=-100)
    soft_ce = -(soft * log_probs).sum(-1).mean()
    return (1 - weight) * hard + weight * soft_ce


def fine_tune(
    model: TransformerLM,
    tokens: torch.Tensor,
    settings: FineTuneSettings,
    *,
    device: torch.device | str = "cpu",
    teacher: TransformerLM | None = None,
) -> FineTuneResult:
    """Fine-tune a copy of ``model`` on the 1-D in-domain ``tokens`` (``model`` is untouched)."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.is_floating_point():
        raise TypeError("tokens must be a 1-D integer tensor (the in-domain sample)")
    if tokens.numel() < 2:
        raise ValueError(f"the in-domain sample has {tokens.numel()} tokens; need at least 2")
    device = torch.device(device)
    seq_len = model.config.max_seq_len
    student = copy.deepcopy(model).to(device)
    n_dev = int(tokens.numel() * settings.holdout_fraction)
    train = pack(tokens[: tokens.numel() - n_dev], seq_len)
    dev: tuple[torch.Tensor, torch.Tensor] | None = None
    if n_dev >= 2:
        dev_set = pack(tokens[tokens.numel() - n_dev :], seq_len)
        dev_x, dev_y = dev_set.batch(torch.arange(len(dev_set)))
        dev = (dev_x.to(device), dev_y.to(device))
    if teacher is not None:
        teacher = teacher.to(device).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=settings.lr, betas=(0.9, 0.95))
    weight = settings.distill_weight

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if teacher is None:
            return m(batch[0], batch[1]).loss
        return _distill_loss(m, teacher, batch, weight)

    loop = TrainLoop(
        student,
        opt,
        config=LoopConfig(max_steps=max(1, settings.steps), grad_clip=settings.grad_clip),
        loss_fn=loss_fn,
        show_progress=False,
    )
    gen = torch.Generator().manual_seed(settings.seed)
    best_loss = _dev_loss(student, dev) if dev is not None else float("inf")
    best_state, best_step = copy.deepcopy(student.state_dict()), 0
    eval_tokens = dev[1].numel() if dev is not None else 0
    window_tokens = settings.batch_size * seq_len
    for step in range(1, settings.steps + 1):
        picks = torch.randint(len(train), (settings.batch_size,), generator=gen)
        loop.train_step([tuple(t.to(device) for t in train.batch(picks))])
        if dev is not None and (step % settings.eval_every == 0 or step == settings.steps):
            loss = _dev_loss(student, dev)
            eval_tokens += dev[1].numel()
            if loss < best_loss:
                best_loss, best_step = loss, step
                best_state = copy.deepcopy(student.state_dict())
    if dev is not None:
        student.load_state_dict(best_state)
    else:
        best_step = settings.steps
    student.eval()
    return FineTuneResult(
        model=student,
        steps=settings.steps,
        best_step=best_step,
        train_tokens=settings.steps * window_tokens,
        eval_tokens=eval_tokens,
        teacher_tokens=settings.steps * window_tokens if teacher is not None else 0,
    )
