"""Worker processes never outlive their launcher: SIGTERM, Ctrl-C, or a SIGKILLed parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

PARENT = textwrap.dedent(
    """
    import faulthandler, os, signal, sys, time
    from pathlib import Path
    from verger.core.distributed import run_multiprocess

    # Ctrl-C as in a terminal: a job started with `&` by a non-interactive shell (a CI script)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # stacks, if the test finds it stuck

    def sleeper(folder):
        Path(folder, f"{os.getpid()}.pid").write_text("up")
        time.sleep(300)

    if __name__ == "__main__":
        run_multiprocess(sleeper, 2, sys.argv[1], timeout=600)
    """
)


def marked_processes(marker: str) -> list[int]:
    """Live processes (not zombies) whose environment carries ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
@pytest.mark.timeout(300)
def test_no_worker_survives_its_parent(tmp_path, sig) -> None:
    marker = f"VERGER_TEARDOWN_TEST={uuid.uuid4().hex}"
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 240
        while len(list(tmp_path.glob("*.pid"))) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            assert parent.poll() is None, "the parent died early"
            time.sleep(0.2)
        time.sleep(1.0)  # a worker writes its file before the launcher has its pid: let it
        workers = [int(p.stem) for p in tmp_path.glob("*.pid")]
        assert set(workers) <= set(marked_processes(marker))
        parent.send_signal(sig)
        try:
            parent.wait(timeout=120)
        except subprocess.TimeoutExpired:
            parent.send_signal(signal.SIGUSR1)  # its stacks go to the captured stderr
            time.sleep(2)
            raise
        deadline = time.monotonic() + 30
        while marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marked_processes(marker) == []  # workers, forkserver and resource tracker gone
    finally:
        parent.kill()
        for pid in marked_processes(marker):
            os.kill(pid, signal.SIGKILL)
