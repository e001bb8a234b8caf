"""DeepSpeed helpers: build an engine, and read/write full fp32 parameters at ZeRO 0-3.

DeepSpeed is optional (``pip install deepspeed``); it is imported only when these functions
run. On CPU it works with gloo and without IPEX/oneCCL; its first run compiles a small shared
memory op (~40 s, then cached). Pass a torch optimizer object to avoid building fused Adam.

Writing parameters: at ZeRO-1/2 the optimizer holds the fp32 master copy and the module holds
low-precision (or aliased) copies; after ``safe_set_full_fp32_param`` the module copies must
be refreshed with ``engine.optimizer.update_lp_params()`` or the next forward pass uses stale
weights. ZeRO-3 has no such call: the module partitions are rewritten inside
``deepspeed.zero.GatheredParameters``. :func:`set_full_fp32_params` does both for you.

Data parallelism over a sub-group (``build_engine(..., data_parallel_group=group)``): DeepSpeed
takes its groups from a Megatron-style ``mpu`` object; :class:`DataParallelMPU` is the pure
data-parallel one (model/tensor/pipeline parallel size 1), so ZeRO shards and averages over
``group`` only and several engines (e.g. one per island of a larger world) train in parallel.
DeepSpeed keeps the last ``mpu`` in a module global (``deepspeed.utils.groups.mpu``), so a
process should hold engines of one data-parallel group at a time; `build_engine` without a
group resets the global that an earlier ``DataParallelMPU`` left there.
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


class DataParallelMPU:
    """The ``mpu`` interface DeepSpeed queries, for pure data parallelism over ``group``.

    Model (tensor) and pipeline parallelism have size 1; their group is a one-rank group
    holding only this process (DeepSpeed all-reduces some norms over it unguarded, so it must
    not be ``None``, which would mean the whole world). The one-rank group is made with
    ``use_local_synchronization=True`` so that no other rank has to take part.
    """

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        if group is None or group is dist.group.WORLD:
            raise ValueError("DataParallelMPU needs a process group (a sub-group of the world)")
        if dist.get_rank(group) < 0:
            raise ValueError(
                f"rank {dist.get_rank()} is not a member of the data-parallel group "
                f"{dist.get_process_group_ranks(group)}"
            )
        self.group = group
        self.ranks = list(dist.get_process_group_ranks(group))
        self.model_group = _own_rank_group()

    def get_data_parallel_group(self) -> Any:
        return self.group

    def get_data_parallel_world_size(self) -> int:
        return len(self.ranks)

    def get_data_parallel_rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(self.group)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.ranks)

    def get_model_parallel_group(self) -> Any:
        return self.model_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_group(self) -> Any:
        return self.model_group


_OWN_RANK_GROUP: dict[int, Any] = {}


def _own_rank_group() -> Any:
    """A process group holding only this rank (created once per process)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    if rank not in _OWN_RANK_GROUP:
        _OWN_RANK_GROUP[rank] = dist.new_group([rank], use_local_synchronization=True)
    return _OWN_RANK_GROUP[rank]


def build_engine(
    model: torch.nn.Module,
    config: Mapping[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    data_parallel_group: Any = None,
) -> Any:
    """``deepspeed.initialize`` with a config dict; returns the engine.

    Joins the existing process group (e.g. one made by :func:`init_distributed` or
    ``run_multiprocess``), or asks DeepSpeed to create one (gloo on CPU, NCCL on GPU).
    ``config`` needs at least ``train_micro_batch_size_per_gpu`` (or ``train_batch_size``);
    ``zero_optimization.stage`` selects ZeRO 0-3. ``data_parallel_group``: a sub-group of the
    world (e.g. ``make_groups(...).intra_island``) to shard and average over instead of the
    whole world, passed to DeepSpeed as a :class:`DataParallelMPU`; the batch size in
    ``config`` then counts that group's ranks. ``None`` or ``dist.group.WORLD``: the world.
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
    import torch.distributed as dist
    from deepspeed.utils import groups

    mpu = None
    if data_parallel_group is not None and data_parallel_group is not dist.group.WORLD:
        mpu = DataParallelMPU(data_parallel_group)
    elif isinstance(groups.mpu, DataParallelMPU):
        groups.mpu = None  # an earlier sub-group engine's mpu must not leak into this one
    engine, _, _, _ = ds.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        model_parameters=None if optimizer is not None else model.parameters(),
        config=dict(config),
        mpu=mpu,
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
