"""Expert jobs as separate processes: the command lines, and a small launcher.

Each expert (and the dense baseline) trains in its own process, started as
``python -m verger.smalltalk train-expert --out MODEL --expert E`` (a job of several ranks is
started by that command through torchrun, see :mod:`verger.smalltalk.expert_rank`). The
launcher runs up to ``parallel`` jobs at once, keeps each job's output in a log file, and
stops every job it started when it is interrupted or one of them fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from verger.smalltalk.config import expert_name
from verger.smalltalk.experts import expert_folder


class JobError(RuntimeError):
    """An expert job failed; the message names it, its exit code and its last output."""


@dataclass(frozen=True)
class JobOutcome:
    name: str
    returncode: int
    seconds: float
    log: Path


def job_state(model_folder: str | Path, expert: str | int) -> str:
    """``"finished"``, ``"unfinished"`` (a run folder to ``--resume``) or ``"new"``."""
    record = expert_folder(model_folder, expert) / "run.json"
    if not record.is_file():
        return "new"
    try:
        status = json.loads(record.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError):
        return "unfinished"  # the job's own command explains a damaged record
    return "finished" if status == "finished" else "unfinished"


def expert_command(
    model_folder: str | Path,
    expert: str | int,
    *,
    device: str = "cpu",
    seed: int = 0,
    threads: int | None = 1,
    nproc: int = 1,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of one expert job (``--resume`` added when its run is unfinished)."""
    name = expert_name(expert)
    flag = "dense" if name == "dense" else str(int(name.removeprefix("expert-")))
    cmd = [
        sys.executable,
        "-m",
        "verger.smalltalk",
        "train-expert",
        "--out",
        str(model_folder),
        "--expert",
        flag,
        "--device",
        device,
        "--seed",
        str(seed),
        "--nproc",
        str(nproc),
    ]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if job_state(model_folder, name) == "unfinished":
        cmd.append("--resume")
    return cmd + list(extra)


def run_jobs(
    commands: Mapping[str, Sequence[str]],
    *,
    logs: str | Path,
    parallel: int,
    env: Mapping[str, str] | None = None,
    poll_s: float = 0.2,
) -> dict[str, JobOutcome]:
    """Run ``commands`` (name -> argv), at most ``parallel`` at a time; all must succeed.

    Output goes to ``logs/<name>.log``. Raises :class:`JobError` for the first failure after
    stopping the other jobs; an interruption (Ctrl-C, SIGTERM raised as an exception) also
    stops every running job before it propagates.
    """
    if parallel < 1:
        raise ValueError(f"parallel={parallel} must be >= 1")
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    pending = list(commands.items())
    running: dict[str, tuple[subprocess.Popen[bytes], float, Path, IO[bytes]]] = {}
    done: dict[str, JobOutcome] = {}
    child_env = dict(os.environ) | dict(env or {})
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, argv = pending.pop(0)
                log = logs / f"{name}.log"
                handle: IO[bytes] = open(log, "wb")  # noqa: SIM115 - closed when the job ends
                proc = subprocess.Popen(
                    list(argv), stdout=handle, stderr=subprocess.STDOUT, env=child_env
                )
                running[name] = (proc, time.perf_counter(), log, handle)
            for name, (proc, start, log, out) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                out.close()
                del running[name]
                done[name] = JobOutcome(name, code, time.perf_counter() - start, log)
                if code != 0:
                    tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                    raise JobError(
                        f"job {name} exited with code {code}; last output: "
                        + " | ".join(tail)
                        + f" (full log: {log})"
                    )
            time.sleep(poll_s)
    finally:
        _stop(running)
    return done


def _stop(running: Mapping[str, tuple[subprocess.Popen[bytes], float, Path, IO[bytes]]]) -> None:
    for proc, _, _, _ in running.values():
        if proc.poll() is None:
            proc.terminate()  # the job's CLI turns SIGTERM into a clean stop (exit 143)
    deadline = time.monotonic() + 10
    for proc, _, _, handle in running.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        handle.close()
