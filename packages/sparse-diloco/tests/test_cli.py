"""The command line on the package contract: settings, run folders, clear errors, devices,
and no worker process outliving the command."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import get_args, get_type_hints

import pytest

import verger.sparse_diloco.commands as commands
from verger.core.files import FileLock
from verger.sparse_diloco.__main__ import main
from verger.sparse_diloco.lm import LM_SIZES
from verger.sparse_diloco.settings import RunSettings

# a tiny LM and run: each training round takes a fraction of a second
TINY = [
    "--d-model",
    "32",
    "--mlp-hidden",
    "64",
    "--seq-len",
    "16",
    "--batch-size",
    "2",
    "--val-batches",
    "1",
    "--workers",
    "2",
    "--inner-steps",
    "2",
    "--warmup",
    "1",
    "--device",
    "cpu",
]


def last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--workers", "0"], "workers=0 must be an int >= 1"),
        (["--inner-steps", "10", "--fragments", "3"], "must be a multiple of num_fragments=3"),
        (["--overlap", "1.5"], r"overlap=1.5 must be < 1"),
        (["--num-slices", "0"], "num_slices=0"),
        (["--rounds", "0"], "rounds=0 must be an int >= 1"),
        (["--warmup", "-1"], "warmup=-1"),
        (["--outer-lr", "inf"], "outer_lr=inf must be a finite number"),
        (["--batch-size", "0"], "batch_size=0 must be an int >= 1"),
        (["--seq-len", "x"], "'x' is not an int"),
        (["--size", "huge"], "'huge' is not one of tiny"),
        # used to fail in the middle of the run with a traceback
        (["--num-slices", "100000", "--quick"], "num_slices=100000 must be <= the MLP hidden"),
        (["--worker", "1"], "worker= is a torchft setting"),
        (["--engine", "torchft", "--fragments", "2", "--inner-steps", "4"], "fragments=1"),
    ],
)
def test_bad_train_options_exit_2_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(out), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
    assert not out.exists()  # nothing was trained or written


def test_checkpoint_dir_naming_a_file_is_a_usage_error(tmp_path, capsys):
    """It used to fail with a NotADirectoryError traceback when the first round saved."""
    file = tmp_path / "ckpt"
    file.write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "run"), "--checkpoint-dir", str(file)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "checkpoint_dir=" in err and "is a file" in err


def test_size_choices_are_the_model_sizes():
    assert set(get_args(get_type_hints(RunSettings)["size"])) == set(LM_SIZES)


@pytest.fixture
def interrupted_run(tmp_path, monkeypatch, capsys):
    """A `train` of 2 rounds stopped by Ctrl-C after its first round (checkpoint written)."""
    out = tmp_path / "run"
    real = commands._round_line

    def stop_after_first(r, figures):
        real(r, figures)
        if r == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(commands, "_round_line", stop_after_first)
    assert main(["train", "--out", str(out), "--rounds", "2", *TINY]) == 130
    monkeypatch.setattr(commands, "_round_line", real)
    assert "continue with --resume" in capsys.readouterr().err
    return out


def test_interrupted_train_resumes_from_its_checkpoint(interrupted_run, capsys):
    out = interrupted_run
    assert main(["train", "--out", str(out), "--rounds", "2", "--resume", *TINY]) == 0
    assert last_line(capsys) == f"wrote {out / 'metrics.json'}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_round"] == 1 and metrics["final_val_loss"] > 0
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["resumes"] == 1


@pytest.mark.parametrize(
    "changed,name",
    [
        (["--inner-lr", "1e-3"], "inner_lr"),
        (["--outer-lr", "0.5"], "outer_lr"),
        (["--rounds", "8"], "rounds"),
        (["--inner-steps", "5"], "inner_steps"),
        (["--d-model", "48"], "d_model"),
        (["--workers", "4"], "workers"),
        (["--plan", "full"], "plan"),
    ],
)
def test_resume_with_other_settings_is_refused_in_one_line(interrupted_run, capsys, changed, name):
    """These used to resume silently (another lr, another round count: `tokens` then dropped
    from 143 360 to 40 960) or fail deep in a tensor copy (model size, workers, plan)."""
    out = interrupted_run
    argv = ["train", "--out", str(out), "--rounds", "2", "--resume", *TINY, *changed]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{name}: " in err and "(recorded)" in err
    assert not (out / "metrics.json").exists()


def test_damaged_checkpoints_are_named_in_one_line(interrupted_run, capsys):
    out = interrupted_run
    argv = ["train", "--out", str(out), "--rounds", "2", "--resume", *TINY]
    path = out / "checkpoints" / "round_000001" / "global.pt"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "cannot read checkpoint file" in err and "global.pt" in err
    assert "Traceback" not in err
    setup = out / "checkpoints" / "setup.json"
    setup.write_text("{garbage")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "setup.json" in err and "damaged" in err and "Traceback" not in err


@pytest.fixture
def finished_run(tmp_path, capsys):
    out = tmp_path / "done"
    assert main(["train", "--out", str(out), "--rounds", "1", *TINY]) == 0
    capsys.readouterr()
    return out


def test_a_finished_run_is_reported_not_rerun(finished_run, capsys):
    """It used to train nothing and rewrite metrics.json with "final_val_loss": null."""
    out = finished_run
    before = (out / "metrics.json").read_text()
    assert json.loads(before)["final_val_loss"] > 0
    assert main(["train", "--out", str(out), "--rounds", "1", *TINY]) == 0
    captured = capsys.readouterr()
    assert "already finished" in captured.err
    assert captured.out.strip().splitlines()[-1] == f"wrote {out / 'metrics.json'}"
    assert (out / "metrics.json").read_text() == before


def test_a_second_run_into_a_busy_folder_is_refused_at_once(finished_run, capsys):
    """Two runs into one folder used to both exit 0, overwriting each other."""
    out = finished_run
    lock = FileLock(out / ".run.lock")  # what a running `train` holds
    assert lock.acquire(blocking=False)
    try:
        argv = ["train", "--out", str(out), "--rounds", "1", "--overwrite", *TINY]
        assert main(argv) == 2
    finally:
        lock.release()
    assert f"in use by process {os.getpid()}" in capsys.readouterr().err


def test_rebuild_corpus_rebuilds_before_training(tmp_path, monkeypatch, capsys):
    """A corrupt corpus cache's message names --rebuild-corpus, which the commands used to
    lack (only core's CLI had --rebuild)."""
    import verger.sparse_diloco.lm as lm

    calls = []
    monkeypatch.setattr(lm, "rebuild_corpus", lambda: calls.append("rebuilt"))
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--rounds", "1", "--rebuild-corpus", *TINY]) == 0
    assert calls == ["rebuilt"]
    assert last_line(capsys) == f"wrote {out / 'metrics.json'}"
    for command in ("demo", "bench"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0 and "--rebuild-corpus" in capsys.readouterr().out


def test_demo_runs_on_the_device_asked_and_says_so(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--out", str(out), "--rounds", "1", *TINY]
    assert main(argv) == 0
    assert last_line(capsys) == f"wrote {out / 'metrics.json'}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"] == "cpu" and metrics["global_state_identical_on_all_workers"]
    assert json.loads((out / "run.json").read_text())["devices"] == ["cpu"]
    report = (out / "report.md").read_text()
    assert "Ran on CPU" in report and "2 shared CPU cores" not in report


def test_bench_writes_the_contract_keys_on_the_device_asked(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--quick", "--out", str(out), "--rounds", "1", "--step-repeats", "2"]
    argv += ["--torchft-rounds", "2", *TINY]
    assert main(argv) == 0
    assert last_line(capsys) == f"wrote {out / 'metrics.json'}"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "flops_ratio_vs_diloco",
        "peak_memory_ratio_vs_diloco",
        "val_loss_ratio_vs_diloco",
        "torchft_step_time_ratio_vs_process_group",
        "fault_run_val_loss_ratio_vs_clean",
        "rejoin_seconds",
    ):
        assert metrics[key] > 0, key
    assert metrics["fault_run_blocks_applied_once"] is True
    assert metrics["device"] == "cpu" and "Ran on CPU" in (out / "report.md").read_text()


# ---- no process outlives the command ------------------------------------------------------


def descendants(pid):
    """Every live process whose parent chain leads to ``pid`` (forkserver children too)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        children = {p for p, parent in parents.items() if parent in frontier} - found
        found |= children
        frontier = children
    return found


def alive(pids):
    out = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(p)
        except OSError:
            continue
    return out


def start_demo(tmp_path):
    """A long demo in its own process; returns it once its worker processes run."""
    argv = ["demo", "--out", str(tmp_path / "demo"), "--rounds", "200", *TINY]
    proc = subprocess.Popen(
        [sys.executable, "-m", "verger.sparse_diloco", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        family = descendants(proc.pid)
        # the forkserver, the resource tracker and the 2 gloo workers
        if len(family) >= 4 and (tmp_path / "demo" / "run.json").exists():
            time.sleep(3)  # let the workers start training
            return proc, descendants(proc.pid)
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("the demo's workers did not start in 240 s")


@pytest.mark.timeout(400)
def test_sigterm_of_demo_leaves_no_process_behind(tmp_path):
    """It used to leave the gloo workers, the forkserver and the resource tracker alive."""
    proc, family = start_demo(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    deadline = time.monotonic() + 20
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(family)
    assert "terminated; continue with --resume" in proc.stderr.read()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_of_demo_leaves_no_process_behind(tmp_path):
    proc, family = start_demo(tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(family)


# ---- torchrun and torchft from the command line (processes: slow) -------------------------


def cli(*args, env=None, timeout=600):
    return subprocess.run(
        [*args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "RUST_LOG": "error", **(env or {})},
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchrun_ranks_follow_rank_0s_run_folder(tmp_path):
    """Under torchrun rank 0 opens the run folder (verger-core's run folder rules) and the
    other rank follows its decision and trains as worker 1 (its worker file lands beside rank
    0's); a finished run is reported and releases the other rank at once."""
    from verger.core.distributed.launch import free_port

    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    argv = ["-m", "verger.sparse_diloco", "train", "--out", str(out), "--rounds", "2", *TINY]
    first = cli(*torchrun, "--master-port", str(free_port()), *argv)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.strip().splitlines()[-1] == f"wrote {out / 'metrics.json'}"
    files = sorted(p.name for p in (out / "checkpoints" / "round_000002").iterdir())
    assert files == ["global.pt", "worker_0.pt", "worker_1.pt"]
    again = cli(*torchrun, "--master-port", str(free_port()), *argv, timeout=300)
    assert again.returncode == 0 and "already finished" in again.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchft_replica_groups_from_the_command_line(tmp_path):
    """`train --engine torchft --worker k --lighthouse URL`: one process per replica group,
    each with its own run folder; both end with the same loss after the same syncs."""
    from verger.sparse_diloco.torchft_launch import LocalLighthouse

    with LocalLighthouse(min_replicas=2, heartbeat_timeout_ms=2000) as house:
        argv = ["--engine", "torchft", "--lighthouse", house.address, "--rounds", "2", *TINY]
        module = [sys.executable, "-m", "verger.sparse_diloco", "train"]
        procs = [
            subprocess.Popen(
                [*module, "--worker", str(k), "--out", str(tmp_path / f"group{k}"), *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "RUST_LOG": "error"},
            )
            for k in range(2)
        ]
        outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    metrics = [json.loads((tmp_path / f"group{k}" / "metrics.json").read_text()) for k in (0, 1)]
    assert metrics[0]["syncs"] == metrics[1]["syncs"] == 2
    assert metrics[0]["final_val_loss"] == metrics[1]["final_val_loss"]
