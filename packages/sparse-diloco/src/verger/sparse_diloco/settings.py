"""The settings of each command, one validated dataclass each (`verger.core.settings`).

Every field is declared once with its default, its ``--quick`` value, its bounds and its
help; the command line derives ``--<field>`` flags from them and the run folder records them
in ``run.json``, so resuming with another learning rate, round count, worker count, plan or
model size is refused with the list of differing settings. ``validate`` builds the library
objects the settings feed (`DiLoCoConfig`, the model config), so a bad combination is a
usage error naming the field before any work.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from verger.core.settings import Settings, SettingsError, option
from verger.sparse_diloco.config import DiLoCoConfig
from verger.sparse_diloco.runner import TrainSpec

SIZES = ("tiny", "small", "125m", "1.3b")  # verger.sparse_diloco.lm.LM_SIZES (test-checked)


@dataclass(kw_only=True)
class RunSettings(Settings):
    """What every command trains: a byte-level LM on the embedded corpus, W DiLoCo workers."""

    size: Literal["tiny", "small", "125m", "1.3b"] = option("tiny", help="LM size")
    d_model: int | None = option(None, at_least=8, help="model width (none: the size's)")
    mlp_hidden: int | None = option(None, at_least=1, help="SwiGLU hidden units (none: the size's)")
    seq_len: int = option(64, at_least=2, help="tokens per sequence")
    batch_size: int = option(4, at_least=1, help="sequences per worker and inner step")
    val_batches: int = option(8, at_least=1, help="validation batches")
    workers: int = option(4, at_least=1, help="W: DiLoCo workers")
    inner_steps: int = option(50, quick=10, at_least=1, help="H: inner steps between syncs")
    rounds: int = option(10, quick=3, at_least=1, help="outer steps (rounds of H inner steps)")
    inner_lr: float = option(2e-3, above=0.0, help="inner AdamW peak learning rate")
    warmup: int = option(10, at_least=0, help="inner learning-rate warm-up steps")
    weight_decay: float = option(0.1, at_least=0.0, help="inner AdamW weight decay")
    grad_clip: float | None = option(1.0, above=0.0, help="inner gradient clip (none: off)")
    outer_lr: float = option(0.7, above=0.0, help="outer Nesterov SGD learning rate")
    outer_momentum: float = option(0.9, at_least=0.0, help="outer momentum, < 1")
    fragments: int = option(1, at_least=1, help="> 1: streaming DiLoCo (fragments synced in turn)")
    bits: Literal[4, 8, 32] = option(32, help="wire precision of pseudo-gradients")
    partial_lr_scaling: Literal["sqrt", "none"] = option(
        "sqrt", help="sqrt: a worker training a fraction f of the model uses inner lr / sqrt(f)"
    )
    outer_lr_scaling: Literal["sqrt_count", "none"] = option(
        "sqrt_count", help="sqrt_count: outer step of coordinate i scaled by sqrt(m[i] / W)"
    )

    def validate(self) -> None:
        self.diloco_config()  # its checks name the fields (num_workers is --workers)
        self.model_overrides()

    def diloco_config(self) -> DiLoCoConfig:
        try:
            return DiLoCoConfig(
                num_workers=self.workers,
                inner_steps=self.inner_steps,
                inner_lr=self.inner_lr,
                inner_warmup=self.warmup,
                inner_weight_decay=self.weight_decay,
                grad_clip=self.grad_clip,
                outer_lr=self.outer_lr,
                outer_momentum=self.outer_momentum,
                num_fragments=self.fragments,
                compression_bits=self.bits,
                partial_lr_scaling=self.partial_lr_scaling,
                outer_lr_scaling=self.outer_lr_scaling,
            )
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    def model_overrides(self) -> dict[str, int]:
        """TransformerConfig fields that replace the size's (checked by building the config)."""
        from verger.sparse_diloco.lm import lm_config

        model = {k: v for k, v in (("d_model", self.d_model), ("mlp_hidden", self.mlp_hidden)) if v}
        try:
            lm_config(self.size, max_seq_len=self.seq_len, **model)
        except ValueError as exc:
            raise SettingsError(f"size={self.size!r} with {model}: {exc}") from None
        return model

    def mlp_hidden_size(self) -> int:
        from verger.sparse_diloco.lm import lm_config

        return lm_config(self.size, max_seq_len=self.seq_len, **self.model_overrides()).hidden_size

    def task_options(self, device: Any) -> dict[str, Any]:
        """The ``lm`` task's options (`verger.sparse_diloco.lm.lm_task`) on ``device``."""
        return dict(
            size=self.size,
            model=self.model_overrides(),
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            val_batches=self.val_batches,
            device=str(device),
        )


@dataclass(kw_only=True)
class DemoSettings(RunSettings):
    """``demo``: W gloo worker processes, DiLoCo vs "1/W MLP" partial updates on the same data."""

    d_model: int | None = option(192, at_least=8, help="model width (none: the size's)")
    mlp_hidden: int | None = option(768, at_least=1, help="SwiGLU hidden units (none: the size's)")
    seq_len: int = option(32, at_least=2, help="tokens per sequence")
    batch_size: int = option(2, at_least=1, help="sequences per worker and inner step")
    val_batches: int = option(32, at_least=1, help="validation batches")
    inner_steps: int = option(20, quick=10, at_least=1, help="H: inner steps between syncs")
    rounds: int = option(16, quick=8, at_least=1, help="outer steps (rounds of H inner steps)")


@dataclass(kw_only=True)
class BenchSettings(DemoSettings):
    """``bench``: partial updates vs DiLoCo (FLOPs, memory, step time, loss, bytes), and the
    torchft figures (step time vs a process group, a killed worker's run vs a clean one)."""

    step_repeats: int = option(30, quick=10, at_least=1, help="timed inner steps per variant")
    torchft: bool = option(True, help="measure the torchft figures (needs the [torchft] extra)")
    torchft_rounds: int = option(
        16, quick=6, at_least=2, help="rounds of the torchft runs (3 workers)"
    )


@dataclass(kw_only=True)
class TrainSettings(RunSettings):
    """``train``: one run, simulated, one worker per rank under torchrun, or on torchft."""

    plan: Literal["full", "mlp"] = option("mlp", help="full = DiLoCo; mlp = 1/k MLP slices")
    num_slices: int | None = option(None, at_least=1, help="k of '1/k MLP' (none: W)")
    overlap: float = option(0.0, at_least=0.0, help="slice widening, a fraction of hidden, < 1")
    others: Literal["shared", "frozen"] = option(
        "shared", help="non-MLP tensors: trained by every worker, or by none"
    )
    inner_engine: Literal["torch", "deepspeed"] = option(
        "torch", help="deepspeed: each worker a ZeRO island (under torchrun)"
    )
    zero_stage: Literal[1, 2] = option(2, help="ZeRO stage of the deepspeed inner engine")
    engine: Literal["auto", "torchft"] = option(
        "auto",
        help="auto: simulated workers, or one per rank under torchrun; torchft: "
        "fault-tolerant replica groups (extra [torchft])",
    )
    lighthouse: str | None = option(
        None, identity=False, help="torchft lighthouse URL (none: $TORCHFT_LIGHTHOUSE)"
    )
    worker: int | None = option(
        None,
        at_least=0,
        help="torchft: this replica group's worker (none: $REPLICA_GROUP_ID, else every "
        "group on this host with a local lighthouse)",
    )
    min_workers: int = option(
        1, at_least=1, identity=False, help="torchft: groups a sync needs to commit"
    )
    quorum_timeout: float = option(
        600.0, above=0.0, identity=False, help="torchft: seconds a quorum request may wait"
    )
    checkpoint_dir: Path | None = option(
        None, help="worker checkpoints (none: <out>/checkpoints, resumed with --resume)"
    )
    eval_every: int = option(1, at_least=1, identity=False, help="rounds between validations")

    def validate(self) -> None:
        super().validate()
        if self.overlap >= 1:
            raise SettingsError(f"overlap={self.overlap!r} must be < 1")
        hidden = self.mlp_hidden_size()
        slices = self.num_slices or self.workers
        if self.plan == "mlp" and slices > hidden:
            raise SettingsError(
                f"num_slices={slices} must be <= the MLP hidden size {hidden} "
                f"(size={self.size!r}): each slice needs a hidden unit"
            )
        folder = self.checkpoint_dir
        if folder is not None and folder.exists() and not folder.is_dir():
            raise SettingsError(f"checkpoint_dir={str(folder)!r} is a file; give a folder")
        if self.engine == "torchft":
            if importlib.util.find_spec("torchft") is None:
                raise SettingsError(
                    "engine='torchft' needs torchft: pip install verger-sparse-diloco[torchft]"
                )
            if self.fragments != 1:
                raise SettingsError("engine='torchft' syncs whole rounds: use fragments=1")
            if self.inner_engine != "torch":
                raise SettingsError("engine='torchft' trains with inner_engine='torch'")
            if self.worker is not None and self.worker >= self.workers:
                raise SettingsError(f"worker={self.worker} must be < workers={self.workers}")
        elif self.worker is not None:
            raise SettingsError("worker= is a torchft setting: add --engine torchft")

    def train_spec(self, device: Any, checkpoint_dir: Path | None, seed: int) -> TrainSpec:
        return TrainSpec(
            task="lm",
            task_options=self.task_options(device),
            plan=self.plan,
            num_slices=self.num_slices,
            overlap=self.overlap,
            others=self.others,
            config=self.diloco_config(),
            rounds=self.rounds,
            seed=seed,
            checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
            eval_every=self.eval_every,
            inner_engine=self.inner_engine,
            zero_stage=self.zero_stage,
        )
