"""The run folder: one writer, nothing foreign touched, resume only the same run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

from verger.core.runs import AlreadyFinished, Run, RunFolderError, RunRequest
from verger.core.settings import Settings, option


@dataclass(kw_only=True)
class S(Settings):
    steps: int = option(10, at_least=1, help="steps")
    log_every: int = option(5, identity=False, help="log cadence")


def request(folder, **kw) -> RunRequest:
    base = dict(
        folder=folder,
        package="verger.core",
        command="demo",
        settings=S(),
        seed=0,
        device=torch.device("cpu"),
    )
    base.update(kw)
    return RunRequest(**base)


def finished_run(folder) -> None:
    with Run.open(request(folder)) as run:
        run.path("checkpoints").mkdir()
        (run.path("checkpoints") / "step-1").write_text("x")
        run.finish({"loss": 1.0})


def test_a_fresh_run_records_what_it_creates_and_finishes(tmp_path) -> None:
    folder = tmp_path / "run"
    finished_run(folder)
    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "finished" and record["settings"] == {"steps": 10, "log_every": 5}
    assert sorted(record["created"]) == ["checkpoints", "metrics.json", "report.md"]
    assert json.loads((folder / "metrics.json").read_text()) == {"loss": 1.0}
    with pytest.raises(AlreadyFinished):  # reported, not rerun
        Run.open(request(folder))
    with pytest.raises(AlreadyFinished):
        Run.open(request(folder, resume=True))


def test_overwrite_deletes_only_what_the_run_created(tmp_path) -> None:
    folder = tmp_path / "run"
    finished_run(folder)
    (folder / "my_notes.txt").write_text("keep me")  # the user's file, added later
    with Run.open(request(folder, overwrite=True, settings=S(steps=3))) as run:
        assert not (folder / "checkpoints").exists() and not (folder / "metrics.json").exists()
        assert run.record["created"] == [] and not run.resumed
    assert (folder / "my_notes.txt").read_text() == "keep me"


def test_a_folder_with_foreign_files_is_refused_and_left_alone(tmp_path) -> None:
    folder = tmp_path / "d"
    (folder / "logs").mkdir(parents=True)
    (folder / "logs" / "notes.txt").write_text("x")
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(RunFolderError, match=r"not empty \(logs\) and holds no run.json"):
            Run.open(request(folder, **kw))
    assert (folder / "logs" / "notes.txt").read_text() == "x"


def test_other_settings_are_refused_with_each_difference(tmp_path) -> None:
    folder = tmp_path / "run"
    with Run.open(request(folder)):
        pass  # interrupted: status stays "running"
    with pytest.raises(RunFolderError, match=r"steps: 10 \(recorded\) -> 90 \(now\); seed: 0"):
        Run.open(request(folder, resume=True, settings=S(steps=90), seed=1))
    with pytest.raises(RunFolderError, match=r"unfinished .* pass --resume"):
        Run.open(request(folder))
    with pytest.raises(RunFolderError, match=r"holds a `verger\.core demo` run, not"):
        Run.open(request(folder, command="bench", resume=True))
    # a setting outside the run's identity may change on resume
    with Run.open(request(folder, resume=True, settings=S(log_every=1))) as run:
        assert run.resumed and run.record["resumes"] == 1


def test_resume_on_an_empty_folder_starts_fresh(tmp_path) -> None:
    with Run.open(request(tmp_path / "new", resume=True)) as run:
        assert not run.resumed


@pytest.mark.parametrize("content", ["{not json", '{"format": 1}', "[]"])
def test_a_damaged_run_json_is_refused_and_nothing_is_deleted(tmp_path, content) -> None:
    folder = tmp_path / "run"
    finished_run(folder)
    (folder / "run.json").write_text(content)
    with pytest.raises(RunFolderError, match=r"run\.json is damaged .* nothing is deleted"):
        Run.open(request(folder, overwrite=True))
    assert (folder / "checkpoints" / "step-1").exists()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path) -> None:
    folder = tmp_path / "run"
    holder = textwrap.dedent(
        f"""
        import time, torch
        from verger.core.runs import Run, RunRequest
        from verger.core.settings import Settings
        req = RunRequest(folder=__import__('pathlib').Path({str(folder)!r}), package="verger.core",
                         command="demo", settings=Settings(), seed=0, device=torch.device("cpu"))
        run = Run.open(req)
        print("open", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        with pytest.raises(RunFolderError, match=rf"in use by process {proc.pid}"):
            Run.open(request(folder, resume=True))
    finally:
        proc.kill()
        proc.wait()


def test_paths_must_stay_inside_the_folder(tmp_path) -> None:
    with Run.open(request(tmp_path / "r")) as run:
        for bad in ("../x", "/etc/passwd", "run.json", ".run.lock"):
            with pytest.raises(ValueError):
                run.path(bad)
        assert run.path("a/b.txt") == tmp_path / "r" / "a" / "b.txt"
        assert run.record["created"] == ["a"]


def test_resume_and_overwrite_together_are_refused(tmp_path) -> None:
    with pytest.raises(RunFolderError, match="exclude each other"):
        Run.open(request(tmp_path / "r", resume=True, overwrite=True))


def test_torchrun_followers_share_rank_0s_decision_and_write_nothing(tmp_path) -> None:
    import threading

    folder = tmp_path / "run"
    got: dict[str, object] = {}

    def follower() -> None:
        try:
            with Run.open(request(folder, rank=1, launch="L1", follow_timeout_s=60)) as run:
                got["resumed"] = run.resumed
                got["path"] = run.path("checkpoints")
                got["metrics"] = run.finish({"loss": 2.0})
        except Exception as exc:  # handed to the main thread
            got["error"] = exc

    thread = threading.Thread(target=follower)
    thread.start()  # rank 1 starts first and waits for rank 0
    with Run.open(request(folder, launch="L1")) as leader:
        thread.join(timeout=60)
        assert "error" not in got, got
        assert got["resumed"] is False and got["path"] == folder / "checkpoints"
        assert leader.record["created"] == []  # the follower recorded nothing
        assert not (folder / "metrics.json").exists()  # ...and wrote no report
        leader.finish({"loss": 1.0})
    # a relaunch of the finished run: rank 0 reports it, and rank 1 learns it at once
    with pytest.raises(AlreadyFinished):
        Run.open(request(folder, launch="L2"))
    with pytest.raises(AlreadyFinished):
        Run.open(request(folder, rank=1, launch="L2", follow_timeout_s=5))
    with pytest.raises(RunFolderError, match=r"rank 0 refused .*other settings"):
        with pytest.raises(RunFolderError):
            Run.open(request(folder, launch="L3", settings=S(steps=99)))
        Run.open(request(folder, rank=1, launch="L3", settings=S(steps=99), follow_timeout_s=5))


def test_a_follower_without_a_leader_times_out_clearly(tmp_path) -> None:
    with pytest.raises(RunFolderError, match=r"rank 0 did not open .* within 1 s"):
        Run.open(request(tmp_path / "r", rank=1, launch="L", follow_timeout_s=1))
