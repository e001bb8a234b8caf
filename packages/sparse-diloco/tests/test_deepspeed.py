"""DeepSpeed ZeRO as an island's inner engine equals the plain torch island (2 gloo ranks)."""

from dataclasses import replace

import pytest
import torch

from verger.core.distributed import run_multiprocess
from verger.core.testing import assert_close
from verger.sparse_diloco import DiLoCoConfig, SubsetPlan
from verger.sparse_diloco.partial import PartialLinear, build_worker_model, merge_slices
from verger.sparse_diloco.runner import TrainSpec, train_run
from verger.sparse_diloco.toy import ToyData, toy_loss, toy_model


def test_standalone_slices_match_views():
    """A standalone slice trains exactly like the view-based one once merged."""
    model = toy_model(0)
    plan = SubsetPlan.mlp_slices(model, 4)
    batch = ToyData(seed=0).batch(0, 0)
    models = [build_worker_model(model, plan, 1, standalone=s) for s in (False, True)]
    assert any(isinstance(m, PartialLinear) and m.standalone for m in models[1].modules())
    for m in models:
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1)
        for _ in range(2):
            toy_loss(m, batch).backward()
            opt.step()
            opt.zero_grad()
        merge_slices(m)
    view_state, standalone_state = (m.state_dict() for m in models)
    for name, value in view_state.items():
        if not name.endswith("trainable"):
            assert_close(standalone_state[name], value, rtol=1e-6, name=name)
    assert not torch.equal(view_state["blocks.0.mlp.w_up.weight"], model.blocks[0].mlp.w_up.weight)


def _torch_vs_deepspeed(spec: TrainSpec, stage: int) -> dict:
    import sys

    import deepspeed.comm  # noqa: F401  (loads the submodule patched below)
    import torch.distributed as dist

    # Skip compiling DeepSpeed's CPU shared-memory all-reduce op (only a speed-up over gloo;
    # the first build takes minutes on a busy 2-core machine), as verger-core's tests do.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from verger.core.distributed.deepspeed import zero_stage
    from verger.sparse_diloco.deepspeed_island import DeepSpeedDiLoCo

    stages: list[int] = []
    make_worker = DeepSpeedDiLoCo.make_worker

    def spy(self: DeepSpeedDiLoCo, k: int):  # records that ZeRO really ran each worker
        worker = make_worker(self, k)
        stages.append(zero_stage(self.engines[k]))
        return worker

    DeepSpeedDiLoCo.make_worker = spy  # type: ignore[method-assign]
    torch.set_num_threads(1)
    plain = train_run(spec, island_group=dist.group.WORLD)
    zero = train_run(replace(spec, inner_engine="deepspeed", zero_stage=stage))
    return {"plain": plain, "zero": zero, "stages": stages}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_zero_island_equals_torch_island(stage):
    pytest.importorskip("deepspeed")
    spec = TrainSpec(
        task="toy",
        plan="mlp",
        config=DiLoCoConfig(num_workers=2, inner_steps=3, inner_lr=3e-3, inner_warmup=2),
        rounds=2,
    )
    sim = train_run(spec)  # one process: the island's batch halves average to the full batch
    ranks = run_multiprocess(_torch_vs_deepspeed, 2, spec, stage, timeout=280)
    for r in ranks:
        assert r["stages"] == [stage, stage]  # one ZeRO engine per worker
        for n, p in r["plain"]["params"].items():
            assert_close(r["zero"]["params"][n], p, rtol=1e-5, name=n)
            assert_close(p, sim["params"][n], rtol=1e-5, name=n)
        assert not torch.equal(r["zero"]["params"][n], toy_model(0).state_dict()[n])
        assert r["zero"]["bytes_sent"] == r["plain"]["bytes_sent"]
        zl = [h["val_loss"] for h in r["zero"]["history"]]
        pl = [h["val_loss"] for h in r["plain"]["history"]]
        assert zl == pytest.approx(pl, rel=1e-5)


def test_deepspeed_engine_validation():
    with pytest.raises(ValueError, match="inner_engine="):
        TrainSpec(inner_engine="fsdp")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainSpec(inner_engine="deepspeed", checkpoint_dir="ckpt")
