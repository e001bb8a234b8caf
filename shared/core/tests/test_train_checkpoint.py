"""Checkpointer: exact round trip, clear errors on damaged files, safety against kills."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from verger.core.train import Checkpointer, CheckpointError, cosine_schedule, lambda_lr

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import ToyLM, ToyStream


def _trained(steps: int = 3) -> tuple[ToyLM, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = ToyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = lambda_lr(opt, cosine_schedule(10, warmup_steps=2))
    data = ToyStream()
    for _ in range(steps):
        x, y = next(data)
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def test_round_trip_restores_everything(tmp_path) -> None:
    model, opt, sched = _trained()
    ckpt = Checkpointer(tmp_path)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt.save(3, model=model, optimizer=opt, scheduler=sched, extra={"data": {"pos": 7}})
    expected = (random.random(), np.random.rand(), torch.rand(1))

    model2, opt2, sched2 = _trained(steps=0)
    got = ckpt.load_latest(model=model2, optimizer=opt2, scheduler=sched2)
    assert got is not None and got.step == 3 and got.extra == {"data": {"pos": 7}}
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n
    assert model2.head.weight.data_ptr() == model2.embed.weight.data_ptr()  # still tied
    assert sched2.state_dict() == sched.state_dict()
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


def test_keep_prunes_old_checkpoints_and_latest_points_to_newest(tmp_path) -> None:
    model, _, _ = _trained(0)
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, model=model)
    assert ckpt.steps() == [2, 3] and ckpt.latest_step() == 3
    assert Checkpointer(tmp_path / "none").load_latest(model=model) is None


def test_a_new_timeline_replaces_later_checkpoints(tmp_path) -> None:
    """A save never prunes itself: higher steps of an earlier run are the stale ones."""
    model, _, _ = _trained(0)
    old_run = Checkpointer(tmp_path, keep=2)
    for step in (4, 6):
        old_run.save(step, model=model)
    fresh, _, _ = _trained(2)  # a fresh run (other weights) in the same folder
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(2, model=fresh)
    assert ckpt.steps() == [2] and ckpt.latest_step() == 2
    restored = ToyLM()
    ckpt.load(model=restored)
    assert all(torch.equal(a, b) for a, b in zip(restored.parameters(), fresh.parameters()))
    ckpt.save(3, model=fresh)
    assert ckpt.steps() == [2, 3]

    forked = Checkpointer(tmp_path / "fork", keep=None)  # keep-all still drops the old future
    for step in (1, 2, 3, 4):
        forked.save(step, model=model)
    forked.load(2, model=model)
    forked.save(3, model=fresh)
    assert forked.steps() == [1, 2, 3] and forked.latest_step() == 3


def test_missing_and_corrupt_files_name_the_file(tmp_path) -> None:
    model, opt, _ = _trained(1)
    ckpt = Checkpointer(tmp_path, keep=None)
    ckpt.save(1, model=model, optimizer=opt)
    folder = ckpt.save(2, model=model, optimizer=opt)

    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(
        CheckpointError, match=r"step-00000002.model\.safetensors is corrupt.*delete"
    ):
        ckpt.load(model=model)
    (folder / "state.pt").write_bytes(b"PK\x03\x04torn")
    with pytest.raises(CheckpointError, match=r"state\.pt is corrupt"):
        ckpt.load(optimizer=opt)
    (folder / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"state\.pt is missing"):
        ckpt.load(optimizer=opt)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").load(model=model)
    assert ckpt.load(1, model=model, optimizer=opt).step == 1  # the older one is still fine


def test_killed_save_leaves_previous_checkpoint(tmp_path) -> None:
    """A process killed (os._exit, no cleanup) in the middle of a save loses nothing."""
    script = textwrap.dedent(
        f"""
        import os, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import verger.core.train.checkpoint as ck
        from _train_helpers import ToyLM
        model = ToyLM()
        c = ck.Checkpointer({str(tmp_path)!r})
        c.save(1, model=model)
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            with open(f, "wb") as fh:
                fh.write(b"partial")
            os._exit(9)  # like SIGKILL: no finally blocks, no cleanup
        ck.torch.save = dying_save
        c.save(2, model=model)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    ckpt = Checkpointer(tmp_path)
    assert ckpt.steps() == [1] and ckpt.latest_step() == 1
    assert ckpt.load(model=ToyLM()).step == 1
    ToyStream()  # helper import sanity
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers  # the torn temporary folder is there, ignored...
    ckpt.save(3, model=ToyLM())
    assert not [
        p for p in tmp_path.iterdir() if p.name.startswith(".step-00000002")
    ]  # ...and swept
    assert os.path.isdir(tmp_path / "step-00000003")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_cuda_restores_the_rng(tmp_path) -> None:
    """``map_location="cuda"`` moves the saved RNG tensors too; torch only takes CPU ones."""
    torch.cuda.init()
    model, opt, sched = _trained()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, model=model, optimizer=opt, scheduler=sched)
    expected = torch.rand(4), torch.rand(4, device="cuda")
    ckpt.load(model=model.cuda(), map_location="cuda")
    got = torch.rand(4), torch.rand(4, device="cuda")
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def test_a_model_of_another_size_is_one_clear_error(tmp_path) -> None:
    from verger.core.nn import TransformerLM
    from verger.core.testing import tiny_config
    from verger.core.train import Checkpointer, CheckpointError

    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, model=TransformerLM(tiny_config()))
    ckpt.load(model=TransformerLM(tiny_config()))  # same shape: fine (tied head included)
    with pytest.raises(
        CheckpointError,
        match=r"another shape \(blocks\.0\.attn\.k_proj\.weight \[32, 32\] saved, \[48, 48\] now.*\(\+17 more\)",
    ):
        ckpt.load(model=TransformerLM(tiny_config(d_model=48)))
    with pytest.raises(CheckpointError, match=r"not saved: blocks\.2\."):
        ckpt.load(model=TransformerLM(tiny_config(n_layers=3)))
