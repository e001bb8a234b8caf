"""PackageCLI: the one command-line shape of every verger package (exit codes, last line)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

APP = textwrap.dedent(
    """
    import sys, time
    from dataclasses import dataclass
    from verger.core.cli import PackageCLI
    from verger.core.settings import Settings, option

    @dataclass(kw_only=True)
    class DemoSettings(Settings):
        steps: int = option(100, quick=5, at_least=1, help="steps")
        fail: bool = option(False, identity=False, help="raise during the work")
        sleep: float = option(0.0, at_least=0.0, help="seconds to sleep")

    def run_demo(s, run):
        (run.path("checkpoints") / "x").parent.mkdir(exist_ok=True)
        if s.fail:
            raise RuntimeError("the work failed\\nwith a second line")
        if s.sleep:
            try:
                print("sleeping", flush=True)  # inside the try: the signal may come at once
                time.sleep(s.sleep)
            finally:
                run.path("cleanup.txt").write_text("finally ran")
        report = run.report("demo")
        report.metric("steps", s.steps)
        report.metric("device", str(run.device))
        report.metric("resumed", run.resumed)
        return report

    cli = PackageCLI("verger.clitest", description="a test package", distribution="verger-core")
    cli.command("demo", run_demo, settings=DemoSettings, help="the demo")
    sys.exit(cli.main())
    """
)


@pytest.fixture()
def app(tmp_path) -> Path:
    path = tmp_path / "app.py"
    path.write_text(APP)
    return path


def run(app: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(app), *args], capture_output=True, text=True, timeout=120
    )


def test_a_run_ends_with_the_metrics_path_and_honours_the_device(app, tmp_path) -> None:
    out = tmp_path / "out"
    proc = run(app, "demo", "--quick", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"wrote {out / 'metrics.json'}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {"steps": 5, "device": "cpu", "resumed": False}
    assert json.loads((out / "run.json").read_text())["devices"] == ["cpu"]
    again = run(app, "demo", "--quick", "--device", "cpu", "--out", str(out))
    assert again.returncode == 0 and "already finished" in again.stderr
    assert again.stdout.strip().splitlines()[-1] == f"wrote {out / 'metrics.json'}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "--steps", "0"], "steps=0 must be an int >= 1"),
        (["demo", "--steps", "x"], "argument --steps: 'x' is not an int"),
        (["demo", "--device", "tpu"], "is not a device"),
        (["demo", "--seed", "-1"], "must be in [0, 2**63)"),
        (["demo", "--threads", "0"], "must be >= 1"),
        (["nope"], "invalid choice: 'nope'"),
    ],
)
def test_usage_errors_exit_2_with_one_line_and_no_traceback(app, args, message) -> None:
    proc = run(app, *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    if args[0] == "demo":  # the command's own usage, not the top-level one
        assert "usage: " in proc.stderr and " demo " in proc.stderr


def test_a_failure_is_one_line_exit_1_and_debug_shows_the_traceback(app, tmp_path) -> None:
    proc = run(app, "demo", "--fail", "--out", str(tmp_path / "a"))
    assert proc.returncode == 1
    assert "error: RuntimeError: the work failed" in proc.stderr
    assert "Traceback" not in proc.stderr and "second line" not in proc.stderr
    debug = run(app, "demo", "--fail", "--debug", "--out", str(tmp_path / "b"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_refused_run_folders_exit_2(app, tmp_path) -> None:
    out = tmp_path / "out"
    assert run(app, "demo", "--fail", "--out", str(out)).returncode == 1  # left unfinished
    other = run(app, "demo", "--steps", "9", "--resume", "--out", str(out))
    assert other.returncode == 2 and "steps: 100 (recorded) -> 9 (now)" in other.stderr
    resumed = run(app, "demo", "--resume", "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["resumed"] is True
    (tmp_path / "file").write_text("x")
    assert run(app, "demo", "--out", str(tmp_path / "file")).returncode == 2


def test_sigterm_runs_cleanup_and_exits_143(app, tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(app), "demo", "--sleep", "60", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "sleeping"
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and time.monotonic() - start < 20
    assert "continue with --resume" in err
    assert (out / "cleanup.txt").read_text() == "finally ran"


def test_dry_run_prints_the_resolved_options(app, tmp_path) -> None:
    proc = run(app, "demo", "--quick", "--dry-run", "--device", "cpu", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0
    shown = json.loads(proc.stdout)
    assert shown["device"] == "cpu" and shown["settings"]["steps"] == 5
    assert not (tmp_path / "o").exists()  # nothing created


@pytest.mark.timeout(600)
def test_under_torchrun_rank_0_owns_the_run_folder(app, tmp_path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "0", str(app), "demo", "--quick", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 reports; rank 1 followed quietly
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["launch"]
