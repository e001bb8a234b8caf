"""The settings of ``demo`` and ``bench``: one validated dataclass each (``verger.core.settings``).

Each field is declared once with its default, its ``--quick`` value, its bounds and its help;
the command line derives ``--<field>`` flags from them and the run folder records them in
``run.json``, so a ``--resume`` with other settings is refused with the differences listed.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from verger.core.settings import Settings, SettingsError, option

__all__ = ["ATTENTIONS", "BenchSettings", "DemoSettings", "describe_machine"]

ATTENTIONS = ("softmax", "linear", "improved_clustered")


def _distinct(name: str, values: tuple[object, ...]) -> None:
    if not values:
        raise SettingsError(f"{name}=() must name at least one value")
    if len(set(values)) != len(values):
        raise SettingsError(f"{name}={values!r} names a value twice")


@dataclass(kw_only=True)
class DemoSettings(Settings):
    """``demo``: byte-level LMs with softmax, linear and improved clustered attention trained
    alike on the embedded corpus; validation loss, throughput, generation cost per token."""

    steps: int = option(
        800, quick=60, at_least=2, help="training steps per model (>= 2: throughput is a median)"
    )
    attentions: tuple[str, ...] = option(
        ATTENTIONS, choices=ATTENTIONS, help="attentions to train, comma separated"
    )
    seq_len: int = option(256, quick=128, at_least=16, help="training sequence length")
    batch_size: int = option(16, quick=8, at_least=1, help="sequences per step")
    corpus_bytes: int = option(
        2_000_000, quick=300_000, at_least=10_000, help="corpus bytes per domain (docs, code)"
    )
    contexts: tuple[int, ...] = option(
        (256, 1024, 4096, 8192),
        quick=(128, 1024),
        at_least=1,
        help="prompt lengths at which generation is timed (increasing)",
    )
    val_batches: int = option(32, quick=8, at_least=1, help="validation batches per model")
    generation_tokens: int = option(
        32, quick=8, at_least=1, identity=False, help="timed tokens per generation context"
    )
    checkpoint_every: int | None = option(
        None,
        at_least=0,
        identity=False,
        help="steps between checkpoints (0: at the end only; none: a quarter of the run, >= 10)",
    )

    def validate(self) -> None:
        _distinct("attentions", self.attentions)
        if list(self.contexts) != sorted(set(self.contexts)):
            raise SettingsError(f"contexts={self.contexts!r} must be distinct and increasing")

    def every(self) -> int:
        """Steps between checkpoints (the default: a quarter of the run, at least 10)."""
        return (
            self.checkpoint_every if self.checkpoint_every is not None else max(10, self.steps // 4)
        )


@dataclass(kw_only=True)
class BenchSettings(Settings):
    """``bench``: speed, memory and FLOP efficiency against torch SDPA, and clustered attention
    accuracy against exact softmax. On a CPU ``--device`` the CPU sweep, on CUDA the GPU one."""

    repeats: int = option(5, quick=2, at_least=1, help="timed repeats per candidate")
    sizes: tuple[int, ...] = option(
        (1024, 4096, 16384, 65536),
        quick=(1024, 4096, 16384),
        at_least=64,
        help="sequence lengths of the causal sweep (CPU)",
    )
    long_n: int = option(
        16384,
        at_least=64,
        help="length of the non-causal, clustered, memory (and a quarter of it) and FLOP sections",
    )
    flops_n: int = option(
        16384, quick=4096, at_least=64, help="length of the FLOP-efficiency section"
    )
    generation_contexts: tuple[int, ...] = option(
        (1024, 16384), at_least=1, help="two context lengths of the generation section"
    )
    generation_tokens: int = option(
        256, quick=64, at_least=1, help="timed tokens per generation context"
    )
    gpu_sizes: tuple[int, ...] = option(
        (1024, 8192, 32768), at_least=64, help="sequence lengths of the CUDA sweep"
    )
    accuracy: bool = option(True, help="the clustered attention accuracy section (issue 28)")
    lm_steps: int = option(
        400, quick=60, at_least=2, help="steps of the softmax LM whose q, k, v the accuracy uses"
    )
    qkv: Path | None = option(
        None, help="a demo run's model_qkv.pt to use instead of training the LM here"
    )

    def validate(self) -> None:
        _distinct("sizes", self.sizes)
        _distinct("gpu_sizes", self.gpu_sizes)
        if len(self.generation_contexts) != 2 or not (
            self.generation_contexts[0] < self.generation_contexts[1]
        ):
            raise SettingsError(
                f"generation_contexts={self.generation_contexts!r} must be two increasing lengths"
            )
        if self.qkv is not None and not self.qkv.is_file():
            raise SettingsError(f"qkv={str(self.qkv)!r} is not a file (a demo's model_qkv.pt)")


def describe_machine(device: torch.device) -> str:
    """The machine a figure was measured on, in words (the device actually used)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"{torch.cuda.get_device_name(index)} ({device})"
    return (
        f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads ({device})"
    )


def _cpu_name() -> str:
    try:  # Linux names the model; platform.processor() often says only "x86_64"
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"
