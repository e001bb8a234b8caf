"""torchft's own DiLoCo on a `TrainSpec`: the peer our torchft engine must agree with.

`torchft_diloco_main` trains one replica group with ``torchft.local_sgd.DiLoCo`` wrapped
around the same inner AdamW (learning rate, betas, weight decay, warm-up, gradient clipping)
and the same outer Nesterov SGD, with the same ``sync_every`` (H) and the same batches
``data.batch(worker, step)``: plain DiLoCo, what `TorchFTDiLoCo` computes with
``SubsetPlan.full``. ``fragments=F > 1`` runs torchft's Streaming DiLoCo with the
parameters cut into our `SubsetPlan.fragments` (one fragment synced every H/F steps, the
fragment index being the torchft step modulo F, as in `DiLoCo`'s schedule).

Settings that make the two comparable: ``init_sync=False`` (torchft would otherwise replace
every replica's model by the first replica's at the first sync: the same values here, since
every group builds the model from the seed, but it also copies the inner optimizer),
``fragment_sync_delay=0`` and ``fragment_update_alpha=0`` (no counterpart in this package).
The gradients are averaged by a gloo all-reduce (summation order chosen by gloo) where our
engine sums the payloads in worker order: equal bits with two groups, a last-bit
difference possible with three.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from verger.sparse_diloco.runner import TrainSpec, get_task, torchft_main
from verger.sparse_diloco.torchft_engine import TorchFTOptions


def _fragment_modules(model: nn.Module, fragments: list[list[str]]) -> list[nn.Module]:
    """Modules holding exactly the parameters of each fragment (torchft syncs modules)."""
    params = dict(model.named_parameters())
    modules = []
    for names in fragments:
        holder = nn.Module()
        for i, name in enumerate(names):
            holder.register_parameter(f"p{i}", params[name])
        modules.append(holder)
    return modules


def torchft_diloco_main(
    spec: TrainSpec, options: TorchFTOptions, *, fragments: int = 1
) -> dict[str, Any]:
    """Train replica group ``options.worker`` with ``torchft.local_sgd.DiLoCo``.

    Runs ``spec.rounds`` rounds (``spec.rounds * fragments`` fragment syncs); returns the
    final parameters and the validation loss.
    """
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo as TorchftDiLoCo

    c = spec.config
    worker = options.worker
    assert worker is not None
    torch.manual_seed(spec.seed)
    task = get_task(spec.task, spec.seed, spec.task_options)
    model = task.model
    plan = spec.make_plan(model)
    inner = torch.optim.AdamW(
        model.parameters(),
        lr=c.worker_inner_lr(plan.trained_fraction(worker)),
        betas=c.inner_betas,
        weight_decay=c.inner_weight_decay,
        foreach=False,
    )
    warm = c.inner_warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(
        inner, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
    )
    groups = plan.fragments(fragments)
    modules = _fragment_modules(model, groups)
    outers = [
        torch.optim.SGD(
            m.parameters(), lr=c.outer_lr, momentum=c.outer_momentum, nesterov=c.nesterov
        )
        for m in modules
    ]
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=options.timeout_s)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=None,
        state_dict=None,
        min_replica_size=options.min_workers,
        use_async_quorum=False,  # torchft's DiLoCo needs the synchronous quorum
        replica_id=f"torchft_diloco_{fragments}_{worker}",
        lighthouse_addr=options.lighthouse,
        store_addr="127.0.0.1",
        store_port=store.port,
        rank=0,
        world_size=1,
        hostname=options.hostname or "127.0.0.1",
        init_sync=False,
        timeout=timeout,
        quorum_timeout=timedelta(seconds=options.quorum_timeout_s),
        connect_timeout=timedelta(seconds=options.connect_timeout_s),
    )
    params = list(model.parameters())
    step = 0
    try:
        with TorchftDiLoCo(manager, modules, inner, outers, sync_every=c.inner_steps) as diloco:
            while manager.current_step() < spec.rounds * len(groups):
                loss = task.loss_fn(model, task.data.batch(worker, step))
                loss.backward()
                if c.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, c.grad_clip, foreach=False)
                inner.step()  # torchft's hook syncs a fragment every H/F steps
                schedule.step()
                inner.zero_grad(set_to_none=True)
                step += 1
        # the global parameters are torchft's backups of each fragment's last synced value
        # (with streaming, the model itself holds local values for the other fragments)
        backups = [fragment.original_parameters for fragment in diloco._fragments]
        global_params = {
            name: backups[f][f"p{i}"].detach().cpu().clone()
            for f, names in enumerate(groups)
            for i, name in enumerate(names)
        }
    finally:
        manager.shutdown(wait=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(global_params[name])
    return {"params": global_params, "val_loss": task.evaluate(model), "inner_steps": step}


def peer_main(
    spec: TrainSpec, options: TorchFTOptions, *, streaming: int = 2, **_: Any
) -> dict[str, Any]:
    """One replica group trains ``spec`` with our engine, then with torchft's DiLoCo.

    Then once more with torchft's Streaming DiLoCo over ``streaming`` fragments (compare it
    with the simulator's ``num_fragments=streaming`` run). The runs share the lighthouse of
    ``options``; each waits for the previous run's managers to stop heartbeating, so that
    its quorums do not wait for them.
    """
    ours = torchft_main(spec, options)
    time.sleep(2.0)
    theirs = torchft_diloco_main(replace(spec), options)
    time.sleep(2.0)
    streamed = torchft_diloco_main(replace(spec), options, fragments=streaming)
    return {"ours": ours, "torchft": theirs, "torchft_streaming": streamed}
