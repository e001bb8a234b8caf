"""Training-step throughput and memory of CLIP vs MAE+CLIP variants, measured side by side.

Every variant runs the same batch through one full training step (forward, backward, AdamW);
``verger.core.bench.compare`` interleaves them after warm-up so a noisy machine affects all
alike. Ratios are images/s of a variant over plain CLIP in the same run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace

import torch

from verger.core.bench import compare, measure_peak_memory
from verger.maeclip.experiment import variant_config
from verger.maeclip.model import MAECLIPConfig, build_model
from verger.maeclip.towers import CaptionTokenizer

# The throughput variants: the three methods plus the FLIP-style ones (contrastive branch on a
# masked image): "flip" is CLIP with 50% patch dropout, "maeclip_masked" shares one encoder
# pass between MAE and the contrastive loss.
THROUGHPUT_VARIANTS = ("clip", "maeclip", "maeclip_masked", "flip", "mae")


def _config(base: MAECLIPConfig, name: str) -> MAECLIPConfig:
    if name == "flip":
        return replace(
            base,
            clip_weight=1.0,
            mae_weight=0.0,
            contrastive_input="masked",
            contrastive_mask_ratio=0.5,
        )
    return variant_config(base, name)


def step_function(
    config: MAECLIPConfig,
    *,
    batch_size: int,
    device: torch.device,
    amp: bool = False,
    seed: int = 0,
) -> Callable[[], None]:
    """A zero-argument closure doing one training step of ``config`` on a fixed random batch."""
    torch.manual_seed(seed)
    model = build_model(config, device=device).train()
    tokenizer = CaptionTokenizer(model.clip.context_length)
    images = torch.randn(batch_size, 3, *model.image_size, device=device)
    texts = tokenizer([f"a picture of thing number {i}" for i in range(batch_size)]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else nullcontext()
    )

    def step() -> None:
        with autocast:
            loss = model(images, texts).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure_throughput(
    base: MAECLIPConfig,
    *,
    batch_size: int,
    device: torch.device,
    variants: Sequence[str] = THROUGHPUT_VARIANTS,
    warmup: int = 2,
    repeats: int = 5,
    amp: bool = False,
    memory: bool = True,
) -> dict[str, dict[str, float]]:
    """``{variant: {"images_per_s", "step_ms", "peak_memory_mb"?}}`` for each variant."""
    steps = {
        name: step_function(_config(base, name), batch_size=batch_size, device=device, amp=amp)
        for name in variants
    }
    timings = compare(steps, warmup=warmup, repeats=repeats)
    out: dict[str, dict[str, float]] = {}
    for name, timing in timings.items():
        out[name] = {"images_per_s": batch_size / timing.median_s, "step_ms": timing.median_s * 1e3}
        if memory:
            out[name]["peak_memory_mb"] = measure_peak_memory(steps[name], device=device) / 2**20
    return out
