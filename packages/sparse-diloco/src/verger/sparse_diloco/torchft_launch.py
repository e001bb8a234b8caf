"""A torchft run on one host: a lighthouse and W replica-group processes, with faults.

`LocalLighthouse` runs torchft's lighthouse server in a child process on 127.0.0.1 (it can be
killed and restarted on the same port). `LocalReplicaGroups` starts one process per worker from a
forkserver that has imported torch and torchft once (a start costs a fork, not an import),
kills and restarts them, and collects their results and progress events. A killed launcher
leaves no orphans: the lighthouse gets the kernel's parent-death signal (Linux
``PR_SET_PDEATHSIG``), and each group process watches the launcher's pid
(`verger.core.runtime.exit_when_parent_dies`; its parent is the forkserver). `run_local` strings them together for tests, the bench and
``train --engine torchft`` on a single machine; across hosts, start one replica group per
host with torchrun instead (README).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from verger.core.runtime import exit_when_parent_dies
from verger.sparse_diloco.runner import TrainSpec

_PR_SET_PDEATHSIG = 1
Target = Callable[..., dict[str, Any]]


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent exits (a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# The lighthouse process: torchft's Rust extension loaded on its own. torchft's
# ``torchft_lighthouse`` script imports the ``torchft`` package first, hence torch (tens of
# seconds on a loaded machine); the extension alone starts in milliseconds.
_LIGHTHOUSE_SCRIPT = """
import importlib.machinery, importlib.util, signal, sys
path, bind, minimum, join, heartbeat, tick = sys.argv[1:]
loader = importlib.machinery.ExtensionFileLoader("torchft._torchft", path)
spec = importlib.util.spec_from_file_location("torchft._torchft", path, loader=loader)
module = importlib.util.module_from_spec(spec)
loader.exec_module(module)
server = module.LighthouseServer(
    bind=bind, min_replicas=int(minimum), join_timeout_ms=int(join),
    heartbeat_timeout_ms=int(heartbeat), quorum_tick_ms=int(tick),
)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
server.shutdown()
"""


def torchft_extension() -> str:
    """The path of torchft's compiled extension (found without importing torchft)."""
    spec = importlib.util.find_spec("torchft")
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    found = [str(p) for folder in folders for p in sorted(Path(folder).glob("_torchft*.so"))]
    if not found:
        raise FileNotFoundError(
            "torchft's extension (_torchft*.so) not found: "
            "pip install verger-sparse-diloco[torchft]"
        )
    return found[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(kw_only=True)
class LocalLighthouse:
    """torchft's lighthouse on ``127.0.0.1:port`` as a child process.

    ``min_replicas``: groups needed for a quorum; ``join_timeout_ms``: how long a quorum waits
    for a heartbeating straggler (a worker slower than this misses the sync and heals at the
    next); ``heartbeat_timeout_ms``: silence after which a group counts as dead.
    """

    min_replicas: int = 1
    join_timeout_ms: int = 60_000
    heartbeat_timeout_ms: int = 5_000
    quorum_tick_ms: int = 10
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalLighthouse:
        if self.port == 0:
            self.port = _free_port()
        command = [
            sys.executable,
            "-c",
            _LIGHTHOUSE_SCRIPT,
            torchft_extension(),
            f"127.0.0.1:{self.port}",
            str(self.min_replicas),
            str(self.join_timeout_ms),
            str(self.heartbeat_timeout_ms),
            str(self.quorum_tick_ms),
        ]
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "error"))
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # ready when the port accepts connections
            if self.process.poll() is not None:
                raise RuntimeError(f"the lighthouse exited with {self.process.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise TimeoutError(f"the lighthouse did not listen on port {self.port} in 30 s")

    def kill(self) -> None:
        """SIGKILL the lighthouse (its quorum state is lost, as in a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def close(self) -> None:
        self.kill()

    def __enter__(self) -> LocalLighthouse:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _replica_main(
    target: Target,
    spec: TrainSpec,
    options: Any,
    events: Any,
    threads: int,
    extra_env: dict[str, str],
    launcher_pid: int,
) -> None:
    """A replica-group process: run ``target``, send its events and result home.

    In an island (``WORLD_SIZE`` > 1 in ``extra_env``) the island's ranks first join their
    own gloo group (rank 0 hosts its store, which the torchft Manager also uses) and only
    rank 0 reports events and the result.
    """
    # a forkserver child's parent is the forkserver, not the launcher: watch the launcher
    exit_when_parent_dies(launcher_pid)
    os.environ.update(extra_env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    worker = options.worker
    rank = int(os.environ.get("RANK", "0"))

    def event(name: str, data: dict[str, Any]) -> None:
        if rank == 0:
            events.put(("event", worker, name, time.time(), data))

    try:
        kwargs: dict[str, Any] = {}
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("gloo", init_method="env://")
            kwargs["island_group"] = dist.group.WORLD
        out = target(spec, options, event=event, **kwargs)
        if rank == 0:
            events.put(("result", worker, True, pickle.dumps(out)))
    except BaseException:
        events.put(("result", worker, False, traceback.format_exc()))


#: What the forkserver imports once, so that a child process starts as a fork: torch,
#: torch._dynamo (the first optimizer a process builds imports it: seconds), torchft and
#: the modules a replica group runs.
FORKSERVER_PRELOAD = [
    "torch",
    "torch.distributed",
    "torch._dynamo",
    "torchft",
    "verger.core.distributed.launch",
    "verger.sparse_diloco.runner",
    "verger.sparse_diloco.toy",
    "verger.sparse_diloco.lm",
]


def start_forkserver() -> None:
    """Start this process's forkserver now, with `FORKSERVER_PRELOAD` imported.

    The preload list only takes effect if nothing has started the forkserver yet (later
    ``set_forkserver_preload`` calls, e.g. by ``run_multiprocess``, are then ignored): call
    it early, before the first child process, so every child of the session starts fast.
    """
    from multiprocessing import forkserver

    modules = [m for m in FORKSERVER_PRELOAD if importlib.util.find_spec(m) is not None]
    mp.get_context("forkserver").set_forkserver_preload(modules)
    with _rust_log("error"):
        forkserver.ensure_running()


@contextlib.contextmanager
def _rust_log(level: str) -> Iterator[None]:
    """``RUST_LOG`` while the forkserver starts: torchft's Rust logger reads it at import."""
    saved = os.environ.get("RUST_LOG")
    os.environ["RUST_LOG"] = saved or level
    try:
        yield
    finally:
        if saved is None:
            del os.environ["RUST_LOG"]


class LocalReplicaGroups:
    """Replica-group processes on this host, one per worker (or one island of ranks each).

    Processes come from the forkserver and die with their parent; `kill` and `start` again
    to simulate a lost and replaced node.
    """

    def __init__(self, *, threads: int = 1, env: Mapping[str, str] | None = None) -> None:
        self.ctx: Any = mp.get_context("forkserver")
        # (only applies if this process has not started its forkserver yet)
        self.ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
        self.events = self.ctx.Queue()
        self.threads = threads
        self.env = {"RUST_LOG": "error", **(env or {})}
        self.processes: dict[int, list[Any]] = {}
        self.started_at: dict[int, list[float]] = {}

    def start(
        self,
        spec: TrainSpec,
        options: Any,
        target: Target | None = None,
        *,
        island_size: int = 1,
    ) -> None:
        """Start (or restart) the process(es) of worker ``options.worker``.

        ``target(spec, options, event=...)`` (default `runner.torchft_main`) must be a
        module-level function of an importable module: the child imports it by name.
        ``island_size=R`` starts R ranks that form the group's island (torchrun-style
        environment, gloo).
        """
        from verger.sparse_diloco.runner import torchft_main

        worker = options.worker
        port = _free_port()
        procs = []
        for rank in range(island_size):
            env = dict(self.env)
            if island_size > 1:
                env.update(
                    RANK=str(rank),
                    LOCAL_RANK=str(rank),
                    WORLD_SIZE=str(island_size),
                    LOCAL_WORLD_SIZE=str(island_size),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                )
            procs.append(
                self.ctx.Process(
                    target=_replica_main,
                    args=(
                        target or torchft_main,
                        spec,
                        options,
                        self.events,
                        self.threads,
                        env,
                        os.getpid(),
                    ),
                    daemon=True,
                )
            )
        with _rust_log(self.env["RUST_LOG"]):  # the first start also starts the forkserver
            for proc in procs:
                proc.start()
        self.processes[worker] = procs
        self.started_at.setdefault(worker, []).append(time.time())

    def kill(self, worker: int) -> None:
        """SIGKILL every process of ``worker`` (a lost node)."""
        for proc in self.processes[worker]:
            if proc.is_alive():
                proc.kill()
            proc.join()

    def died(self, worker: int) -> bool:
        """A process of the group ended abnormally (killed, crashed); clean exits report."""
        return any(proc.exitcode not in (None, 0) for proc in self.processes[worker])

    def next_message(self, timeout: float) -> tuple[Any, ...] | None:
        try:
            return tuple(self.events.get(timeout=timeout))
        except queue_mod.Empty:
            return None

    def close(self) -> None:
        """Kill every group process still alive and reap them all."""
        for procs in self.processes.values():
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join(timeout=10)
        self.events.close()
        self.events.join_thread()

    def __enter__(self) -> LocalReplicaGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class LocalRun:
    """What `run_local` saw: each worker's result, restarts, rejoin times, events."""

    results: dict[int, dict[str, Any]]
    restarts: dict[int, list[float]]  # worker -> time.time() of each restart
    rejoin_seconds: list[float]  # restart -> global state recovered from a live peer
    events: list[tuple[Any, ...]]
    wall_s: float
    lighthouse_restarts: int = 0


def run_local(
    spec: TrainSpec,
    *,
    lighthouse: LocalLighthouse | None = None,
    options: Mapping[str, Any] | None = None,
    restart_delay_s: float | None = 0.5,
    restart_lighthouse_after: int | None = None,
    lighthouse_down_s: float = 1.0,
    timeout_s: float = 600.0,
    threads: int = 1,
    on_event: Callable[[tuple[Any, ...]], None] | None = None,
    target: Target | None = None,
    island_size: int = 1,
) -> LocalRun:
    """Run ``spec`` with one local process per worker under a local lighthouse.

    ``options``: `TorchFTOptions` fields shared by the groups (timeouts, ``min_workers``). A
    group process that dies without a result (``spec.kill_at``, or killed from outside) is
    restarted after ``restart_delay_s`` with the faults removed (None: not restarted).
    ``restart_lighthouse_after=n``: the lighthouse is SIGKILLed when a group reports sync n,
    and restarted on the same port ``lighthouse_down_s`` later. Raises ``TimeoutError`` after
    ``timeout_s`` and ``RuntimeError`` with a group's traceback when one fails; every process
    is killed on the way out. ``target``: what each group runs (default `torchft_main`);
    ``island_size``: ranks per replica group (an island: data parallel inside it).
    """
    from verger.sparse_diloco.torchft_engine import TorchFTOptions

    own = lighthouse is None
    # a majority quorum: two halves of a partitioned run cannot both commit
    house = lighthouse or LocalLighthouse(min_replicas=spec.config.num_workers // 2 + 1)
    if house.process is None:
        house.start()
    workers = spec.config.num_workers
    base = dict(options or {})
    clean = replace(spec, kill_at=None, stall_at=None)
    results: dict[int, dict[str, Any]] = {}
    events: list[tuple[Any, ...]] = []
    rejoin: list[float] = []
    start = time.time()
    try:
        with LocalReplicaGroups(threads=threads) as groups:

            def options_of(k: int) -> TorchFTOptions:
                return TorchFTOptions(
                    lighthouse=house.address, worker=k, hostname="127.0.0.1", **base
                )

            for k in range(workers):
                groups.start(spec, options_of(k), target, island_size=island_size)
            deadline = time.monotonic() + timeout_s
            pending_restart: dict[int, float] = {}
            lighthouse_restarted = False
            while len(results) < workers:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(workers)) - set(results))
                    raise TimeoutError(
                        f"torchft run: worker(s) {missing} unfinished after {timeout_s:.0f} s"
                    )
                msg = groups.next_message(timeout=0.2)
                if msg is not None:
                    events.append(msg)
                    if on_event is not None:
                        on_event(msg)
                    kind, worker = msg[0], msg[1]
                    if kind == "result":
                        if not msg[2]:
                            raise RuntimeError(f"torchft worker {worker} failed:\n{msg[3]}")
                        results[worker] = pickle.loads(msg[3])
                    elif msg[2] == "healed" and len(groups.started_at[worker]) > 1:
                        # a restarted group recovered the global state from a live peer
                        rejoin.append(msg[4]["time"] - groups.started_at[worker][-1])
                    elif (
                        msg[2] == "sync"
                        and restart_lighthouse_after is not None
                        and not lighthouse_restarted
                        and msg[4]["syncs"] >= restart_lighthouse_after
                    ):
                        lighthouse_restarted = True
                        house.kill()
                        time.sleep(lighthouse_down_s)
                        house.start()
                for k in range(workers):
                    if k in results or k in pending_restart or not groups.died(k):
                        continue
                    if restart_delay_s is None:
                        raise RuntimeError(f"torchft worker {k} died (no restart asked)")
                    groups.kill(k)  # the rest of a half-dead island goes too
                    pending_restart[k] = time.monotonic() + restart_delay_s
                for k, when in list(pending_restart.items()):
                    if time.monotonic() >= when:
                        del pending_restart[k]
                        groups.start(clean, options_of(k), target, island_size=island_size)
            restarts = {k: v[1:] for k, v in groups.started_at.items()}
    finally:
        if own:
            house.close()
    return LocalRun(
        results, restarts, rejoin, events, time.time() - start, int(lighthouse_restarted)
    )
