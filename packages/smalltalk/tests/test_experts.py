"""Expert jobs: their data order, DDP inside one job, exact resume after SIGKILL, and
bit-identical results whether or not the other experts train at the same time."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from verger.core.distributed import run_multiprocess
from verger.smalltalk.config import SmallTalkConfig
from verger.smalltalk.experts import EpochSampler, expert_folder, train_expert
from verger.smalltalk.jobs import expert_command, run_jobs
from verger.smalltalk.toy import synthetic_sets


def _weights(folder, expert):
    return load_file(str(expert_folder(folder, expert) / "model" / "model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_epochs_visit_every_sequence_once_and_ranks_split_the_batch():
    data = synthetic_sets(per_language=5)["train"]  # 20 sequences
    halves = [EpochSampler(data, 8, seed=3, rank=r, world=2) for r in range(2)]
    state = halves[0].state_dict()
    full = EpochSampler(data, 8, seed=3)
    for _ in range(4):
        x, _ = next(full)
        a, b = next(halves[0])[0], next(halves[1])[0]
        assert torch.equal(torch.stack([a, b], dim=1).reshape(8, -1), x)  # rows rank::world
    halves[0].load_state_dict(state)  # resume replays the same stream
    assert torch.equal(next(halves[0])[0], next(EpochSampler(data, 8, seed=3, rank=0, world=2))[0])
    counts = torch.zeros(20)
    order = EpochSampler(data, 20, seed=0)
    rows = order.order.clone()
    next(order)
    counts[rows] += 1
    assert bool((counts == 1).all())  # one epoch = a permutation
    with pytest.raises(ValueError, match="batch_size=8 must be divisible by the job's 3 ranks"):
        EpochSampler(data, 8, seed=0, world=3)


def _ddp_rank(folder: str, out: str) -> dict:
    result = train_expert(folder, 0, out=out, show_progress=False)
    return {"world": result.world_size, "group": torch.distributed.get_world_size()}


def test_a_job_on_two_ranks_trains_like_one(model_copy, tmp_path):
    out = tmp_path / "ddp"
    ranks = run_multiprocess(_ddp_rank, 2, str(model_copy), str(out), timeout=300)
    assert [r["world"] for r in ranks] == [2, 2]  # the job's world: its own ranks only
    single = _weights(model_copy, 0)
    double = load_file(str(out / "model" / "model.safetensors"))
    for key in single:  # same global batches; only the order of the gradient sums differs
        torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=1e-5)


def _fresh_model_folder(model_copy):
    shutil.rmtree(model_copy / "experts")
    return model_copy


def test_a_killed_expert_job_resumes_exactly(model_copy, tmp_path):
    folder = _fresh_model_folder(model_copy)
    config = SmallTalkConfig.load(folder).replace(expert_steps=80, checkpoint_every=5)
    config.save(folder)
    reference = tmp_path / "reference"
    train_expert(folder, 2, out=reference, show_progress=False)
    cmd = expert_command(folder, 2, device="cpu", threads=1)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = expert_folder(folder, 2) / "checkpoints"
    deadline = time.monotonic() + 240
    while not any(checkpoints.glob("step-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no cleanup at all
    proc.wait()
    assert any(checkpoints.glob("step-*")), "the job never wrote a checkpoint"
    assert not (expert_folder(folder, 2) / "model").exists()  # it did not finish
    cmd = expert_command(folder, 2, device="cpu", threads=1)
    assert "--resume" in cmd  # the unfinished run is continued, not restarted
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert _same(_weights(folder, 2), load_file(str(reference / "model" / "model.safetensors")))


@pytest.mark.slow  # five processes: about a minute on 2 busy cores
def test_an_expert_trains_the_same_alone_or_beside_the_others(model_copy, tmp_path):
    together = _fresh_model_folder(model_copy)
    alone = tmp_path / "alone"
    shutil.copytree(together, alone)
    commands = {str(e): expert_command(together, e, threads=1) for e in range(4)}
    run_jobs(commands, logs=tmp_path / "logs-together", parallel=4)
    run_jobs({"1": expert_command(alone, 1, threads=1)}, logs=tmp_path / "logs-alone", parallel=1)
    assert _same(_weights(together, 1), _weights(alone, 1))
    assert not _same(_weights(together, 0), _weights(together, 1))  # experts do differ


def test_job_errors_are_clear(model_copy):
    with pytest.raises(ValueError, match="expert=7 does not exist: this mixture has num_experts=4"):
        train_expert(model_copy, 7)
    shutil.rmtree(model_copy / "shards")
    with pytest.raises(FileNotFoundError, match="not sharded yet"):
        train_expert(model_copy, 0)
    with pytest.raises(ValueError, match="engine='fsdp' must be one of"):
        train_expert(model_copy, "dense", engine="fsdp")


def test_a_failing_job_stops_the_launcher_with_its_output(tmp_path):
    from verger.smalltalk.jobs import JobError

    bad = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    start = time.monotonic()
    with pytest.raises(JobError, match="job bad exited with code 3; last output: boom"):
        run_jobs({"slow": slow, "bad": bad}, logs=tmp_path, parallel=2)
    assert time.monotonic() - start < 30  # the slow job was stopped, not waited for


@pytest.mark.slow
def test_deepspeed_zero2_job_trains_and_resumes(model_copy, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    run_multiprocess(_deepspeed_rank, 2, str(model_copy), str(out), 2, timeout=600)
    weights = load_file(str(out / "model" / "model.safetensors"))
    single = _weights(model_copy, 0)
    for key in single:
        torch.testing.assert_close(weights[key], single[key], rtol=1e-4, atol=1e-5)


def _deepspeed_rank(folder: str, out: str, stage: int) -> None:
    train_expert(folder, 0, out=out, engine="deepspeed", zero_stage=stage, show_progress=False)
