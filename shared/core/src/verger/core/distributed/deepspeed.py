"""DeepSpeed helpers: build an engine, and read/write full fp32 parameters at ZeRO 0-3.

DeepSpeed is optional (``pip install deepspeed``); it is imported only when these functions
run. On CPU it works with gloo and without IPEX/oneCCL; its first run compiles a small shared
memory op (~40 s, then cached). Pass a torch optimizer object to avoid building fused Adam.

Writing parameters: at ZeRO-1/2 the optimizer holds the fp32 master copy and the module holds
low-precision (or aliased) copies; after ``safe_set_full_fp32_param`` the module copies must
be refreshed with ``engine.optimizer.update_lp_params()`` or the next forward pass uses stale
weights. ZeRO-3 has no such call: the module partitions are rewritten inside
``deepspeed.zero.GatheredParameters``. :func:`set_full_fp32_params` does both for you.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from verger.core.distributed.env import is_initialized


def _deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as exc:
        raise ImportError(
            "verger.core.distributed.deepspeed needs DeepSpeed: pip install deepspeed"
        ) from exc
    return deepspeed


def build_engine(
    model: torch.nn.Module,
    config: Mapping[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
) -> Any:
    """``deepspeed.initialize`` with a config dict; returns the engine.

    Joins the existing process group (e.g. one made by :func:`init_distributed` or
    ``run_multiprocess``), or asks DeepSpeed to create one (gloo on CPU, NCCL on GPU).
    ``config`` needs at least ``train_micro_batch_size_per_gpu`` (or ``train_batch_size``);
    ``zero_optimization.stage`` selects ZeRO 0-3.
    """
    ds = _deepspeed()
    if not isinstance(config, Mapping):
        raise TypeError(
            f"config must be a dict (DeepSpeed JSON config), got {type(config).__name__}"
        )
    if "train_micro_batch_size_per_gpu" not in config and "train_batch_size" not in config:
        raise ValueError(
            "config needs 'train_micro_batch_size_per_gpu' or 'train_batch_size' "
            "(DeepSpeed refuses to start without a batch size)"
        )
    stage = int(dict(config.get("zero_optimization", {})).get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"config['zero_optimization']['stage']={stage} must be 0, 1, 2 or 3")
    if not is_initialized():
        ds.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if optimizer is None and "optimizer" not in config:
        raise ValueError(
            "pass optimizer=torch.optim.AdamW(...) (or an 'optimizer' config section); a torch "
            "optimizer object avoids compiling DeepSpeed's fused Adam"
        )
    engine, _, _, _ = ds.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        model_parameters=None if optimizer is not None else model.parameters(),
        config=dict(config),
    )
    return engine


def zero_stage(engine: Any) -> int:
    """The ZeRO stage of ``engine`` (0 when ZeRO is off)."""
    return int(engine.zero_optimization_stage())


def get_full_fp32_params(engine: Any) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) fp32 copies of every parameter, on CPU, by name.

    Collective at ZeRO-3 (every rank must call it). At ZeRO 0 without mixed precision the
    module parameters are the fp32 master weights and are copied directly.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        value = safe_get_full_fp32_param(param)
        if value is None:  # no ZeRO/mixed-precision mapping: the parameter is the master copy
            value = param.detach()
        out[name] = value.detach().to("cpu", torch.float32).clone()
    return out


def set_full_fp32_params(engine: Any, values: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the fp32 master weights of the named parameters and refresh the module copies.

    Names are those of ``engine.module.named_parameters()``; an unknown name raises
    ``KeyError`` listing valid ones; a shape mismatch raises ``ValueError``. Collective at
    ZeRO-3 (every rank must call it with the same values).
    """
    from deepspeed.utils import safe_set_full_fp32_param

    params = dict(engine.module.named_parameters())
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise KeyError(f"unknown parameter name(s) {unknown[:5]}; valid: {sorted(params)[:10]}...")
    for name, param in params.items():
        if name not in values:
            continue
        value = values[name]
        full_shape = tuple(getattr(param, "ds_shape", param.shape))
        if tuple(value.shape) != full_shape:
            raise ValueError(
                f"values[{name!r}] has shape {tuple(value.shape)}, expected {full_shape}"
            )
        if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
            safe_set_full_fp32_param(param, value.to(param.device, torch.float32))
        else:
            with torch.no_grad():
                param.copy_(value.to(param.device, param.dtype))
    stage = zero_stage(engine)
    if stage in (1, 2) and hasattr(engine.optimizer, "update_lp_params"):
        engine.optimizer.update_lp_params()
    elif stage == 3:
        # ZeRO-3 keeps the module's partitions apart from the fp32 master partitions and has
        # no update_lp_params: write them through the public gather/re-partition context.
        ds = _deepspeed()
        written = [(params[name], values[name]) for name in params if name in values]
        gathered = ds.zero.GatheredParameters([p for p, _ in written], modifier_rank=0)
        with gathered, torch.no_grad():
            for param, value in written:
                param.data.copy_(value.to(param.device, param.dtype).reshape(param.shape))
