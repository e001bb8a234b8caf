"""The specification: DiLoCo with coordinate masks, written as plainly as possible.

Every worker is a full copy of the model trained with full gradients and a full AdamW; its
gradients are multiplied by its mask and its frozen coordinates are put back after each step.
This is slow and memory-hungry on purpose: it is what `DiLoCo` must equal (tests), with none
of its machinery (views, custom backward, payload encoding, transports).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from verger.sparse_diloco.config import DiLoCoConfig
from verger.sparse_diloco.engine import BatchSource, LossFn


def reference_diloco(
    model: nn.Module,
    config: DiLoCoConfig,
    *,
    loss_fn: LossFn,
    data: BatchSource,
    rounds: int,
    masks: list[dict[str, torch.Tensor]] | None = None,
    fragments: list[list[str]] | None = None,
) -> nn.Module:
    """Train a copy of ``model`` for ``rounds`` rounds; return the global model.

    ``masks[k][name]`` (bool, full shape) marks what worker k trains; None = everything.
    ``fragments`` lists the parameter groups synced in turn (default: one group of all).
    """
    W, H = config.num_workers, config.inner_steps
    global_model = copy.deepcopy(model)
    anchor = dict(global_model.named_parameters())
    names = list(anchor)
    if masks is None:
        masks = [{n: torch.ones_like(p, dtype=torch.bool) for n, p in anchor.items()}] * W
    counts = {n: torch.stack([m[n] for m in masks]).to(torch.float32).sum(0) for n in names}
    fragments = fragments or [names]
    total = sum(p.numel() for p in anchor.values())
    lrs = [config.worker_inner_lr(sum(int(m[n].sum()) for n in names) / total) for m in masks]
    locals_ = [copy.deepcopy(global_model) for _ in range(W)]
    opts = [
        torch.optim.AdamW(
            m.parameters(),
            lr=lrs[k],
            betas=config.inner_betas,
            weight_decay=config.inner_weight_decay,
            foreach=False,
        )
        for k, m in enumerate(locals_)
    ]
    warm = config.inner_warmup
    steps = [0] * W
    momentum = {n: torch.zeros_like(p) for n, p in anchor.items()}
    interval = H // len(fragments)
    for sync_index in range(rounds * len(fragments)):
        for k in range(W):
            params = dict(locals_[k].named_parameters())
            for _ in range(interval):
                for group in opts[k].param_groups:
                    group["lr"] = lrs[k] * (min(1.0, (steps[k] + 1) / warm) if warm else 1)
                loss = loss_fn(locals_[k], data.batch(k, steps[k]))
                loss.backward()
                with torch.no_grad():
                    grads = {n: _grad(p) for n, p in params.items()}
                    for n, g in grads.items():
                        g.mul_(masks[k][n])
                    if config.grad_clip is not None:
                        norm = sum(float((g.double() ** 2).sum()) for g in grads.values()) ** 0.5
                        scale = min(1.0, config.grad_clip / (norm + 1e-6))
                        for g in grads.values():
                            g.mul_(scale)
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                with torch.no_grad():  # frozen coordinates always equal the anchor
                    for n, p in params.items():
                        p.copy_(torch.where(masks[k][n], p, anchor[n]))
                steps[k] += 1
        group_names = fragments[sync_index % len(fragments)]
        with torch.no_grad():
            for n in group_names:
                delta = torch.zeros_like(anchor[n])
                for k in range(W):
                    delta += masks[k][n] * (anchor[n] - dict(locals_[k].named_parameters())[n])
                g = delta / counts[n].clamp_min(1.0) * config.outer_scale(counts[n])
                mu = config.outer_momentum
                momentum[n].mul_(mu).add_(g)
                step = g + mu * momentum[n] if config.nesterov else momentum[n]
                anchor[n].sub_(config.outer_lr * step)
                for k in range(W):
                    dict(locals_[k].named_parameters())[n].copy_(anchor[n])
    return global_model


def _grad(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        raise RuntimeError("reference_diloco: a parameter got no gradient from loss_fn")
    return p.grad
