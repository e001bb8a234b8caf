"""DeepSpeed helpers: a 2-process ZeRO-2 engine round-trips full fp32 parameters (gloo, CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")


def _zero_roundtrip(stage: int) -> dict:
    import sys

    import deepspeed.comm  # noqa: F401  (loads the submodule patched below)

    ds_comm = sys.modules["deepspeed.comm.torch"]  # the attribute path resolves to torch itself

    # DeepSpeed compiles a shared-memory all-reduce op for CPU on first use (40 s to minutes
    # on a busy 2-core machine). It is only a speed-up over gloo, which this test exercises
    # anyway, so skip building it here.
    ds_comm.build_shm_op = lambda: None

    from verger.core.distributed.deepspeed import (
        build_engine,
        get_full_fp32_params,
        set_full_fp32_params,
        zero_stage,
    )

    def make_model() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))

    torch.manual_seed(0)  # the same initial weights on every rank
    model = make_model()
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    engine = build_engine(model, config, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    before = get_full_fp32_params(engine)
    new = {
        k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
        for i, (k, v) in enumerate(initial.items())
    }
    set_full_fp32_params(engine, new)
    after = get_full_fp32_params(engine)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(42))
    reference = make_model()
    reference.load_state_dict(new)
    expected = reference(x).detach()
    with torch.no_grad():
        got = engine(x)
    loss = engine(x).square().mean()
    engine.backward(loss)
    engine.step()
    stepped = get_full_fp32_params(engine)
    return {
        "stage": zero_stage(engine),
        "before_equal": all(torch.equal(before[k], initial[k]) for k in initial),
        "after_equal": all(torch.equal(after[k], new[k]) for k in new),
        "forward_err": float((got - expected).abs().max()),
        "moved": all(not torch.equal(stepped[k], new[k]) for k in new),
    }


def test_zero2_two_process_fp32_round_trip(multiprocess) -> None:
    results = multiprocess(_zero_roundtrip, 2, 2, timeout=300)
    for r in results:
        assert r["stage"] == 2
        assert r["before_equal"] and r["after_equal"]
        assert r["forward_err"] < 1e-6  # the module saw the new weights (update_lp_params)
        assert r["moved"]  # and the engine still trains after the write


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_other_zero_stages_round_trip(multiprocess, stage: int) -> None:
    results = multiprocess(_zero_roundtrip, 2, stage, timeout=300)
    for r in results:
        assert r["stage"] == stage
        assert r["before_equal"] and r["after_equal"]
        assert r["forward_err"] < 1e-6 and r["moved"]


def _subgroup_engines() -> dict:
    """World 4 = 2 data-parallel groups of 2 ranks, one ZeRO-2 engine each, different data."""
    import copy
    import sys

    import deepspeed.comm  # noqa: F401  (loads the submodule patched below)
    import torch.distributed as dist

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from verger.core.distributed import make_groups
    from verger.core.distributed.deepspeed import build_engine, get_full_fp32_params

    torch.set_num_threads(1)
    mesh = make_groups(2, 2)
    torch.manual_seed(0)  # the same initial weights everywhere
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    reference = copy.deepcopy(model)  # plain torch AdamW on the group's whole batch
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 0.05,  # clips: the norm must be the group's, not the world's
        "steps_per_print": 10**9,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = build_engine(model, config, optimizer=opt, data_parallel_group=mesh.intra_island)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for step in range(3):  # group g's batch: 4 rows, 2 per rank (rows replica::2)
        gen = torch.Generator().manual_seed(100 * mesh.island + step)
        x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 4, generator=gen)
        loss = (engine(x[mesh.replica :: 2]) - y[mesh.replica :: 2]).square().mean()
        engine.backward(loss)
        engine.step()
        ref_loss = sum((reference(x[r::2]) - y[r::2]).square().mean() for r in range(2)) / 2
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        ref_opt.step()
        ref_opt.zero_grad()
    got = get_full_fp32_params(engine)
    err = max(float((got[n] - p.detach()).abs().max()) for n, p in reference.named_parameters())
    world = [None] * dist.get_world_size()
    dist.all_gather_object(world, got["0.weight"])
    return {
        "dp": engine.dp_world_size,
        "err": err,
        "same_in_group": torch.equal(world[2 * mesh.island], world[2 * mesh.island + 1]),
        "groups_differ": not torch.equal(world[0], world[2]),
    }


def test_zero2_on_data_parallel_subgroups(multiprocess) -> None:
    """build_engine(data_parallel_group=...): two 2-rank ZeRO-2 engines train side by side."""
    results = multiprocess(_subgroup_engines, 4, timeout=300)
    for r in results:
        assert r["dp"] == 2  # sharded and averaged over the group, not the world of 4
        assert r["err"] < 1e-6  # equals plain AdamW on the group's whole batch, clipped
        assert r["same_in_group"] and r["groups_differ"]
