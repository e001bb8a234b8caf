"""Training utilities: LR schedules, a small loop, exact checkpoints, metrics, progress.

- Schedules (multipliers of the peak LR): :func:`cosine_schedule`, :func:`wsd_schedule`
  (cooldown ``"linear"`` | ``"1-sqrt"`` | ``"cosine"``), :func:`constant_schedule`,
  :func:`lambda_lr`.
- :class:`TrainLoop` + :class:`LoopConfig`: accumulation, clipping, :class:`NonFiniteLossError`.
- :class:`Checkpointer`: atomic safetensors + optimizer/scheduler/RNG/data-position state.
- :class:`MetricsLogger`: JSONL (+ TensorBoard when installed); :func:`progress` (tqdm).
- Atomic writes: :func:`atomic_write_json`, :func:`atomic_write_text`, :func:`atomic_path`.
"""

from verger.core.files import (
    atomic_directory,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from verger.core.progress import progress, progress_bar
from verger.core.runtime import seed_everything
from verger.core.train.checkpoint import (
    Checkpoint,
    Checkpointer,
    CheckpointError,
    rng_state,
    set_rng_state,
)
from verger.core.train.loop import (
    LoopConfig,
    NonFiniteLossError,
    StepStats,
    TrainLoop,
    default_loss,
)
from verger.core.train.metrics import MetricsLogger, read_metrics
from verger.core.train.schedules import (
    constant_schedule,
    cosine_schedule,
    lambda_lr,
    wsd_schedule,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Checkpointer",
    "LoopConfig",
    "MetricsLogger",
    "NonFiniteLossError",
    "StepStats",
    "TrainLoop",
    "atomic_directory",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "constant_schedule",
    "cosine_schedule",
    "default_loss",
    "lambda_lr",
    "progress",
    "progress_bar",
    "read_metrics",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "wsd_schedule",
]
