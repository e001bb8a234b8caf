"""Run a function on N local processes joined in a gloo (or NCCL) group; collect the results.

Used by tests (4 gloo processes on a 2-core machine work fine) and by CPU demos that
simulate several workers. The function is located by module and name (falling back to its
source file), so functions defined in pytest test files work under ``--import-mode=importlib``.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.util
import inspect
import os
import pickle
import queue as queue_mod
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from verger.core.runtime import exit_when_parent_dies, sigterm_raises


class MultiprocessError(RuntimeError):
    """A rank raised; the message holds that rank's traceback."""


@dataclass(frozen=True)
class _FnRef:
    module: str
    qualname: str
    file: str | None

    def resolve(self) -> Callable[..., Any]:
        obj: Any = None
        if self.module != "__main__":  # a script's functions are reloaded from its file
            try:
                obj = importlib.import_module(self.module)
            except ImportError:
                if self.file is None:
                    raise
        if obj is None:
            if self.file is None:
                raise ImportError(f"cannot locate {self.qualname} from module {self.module}")
            spec = importlib.util.spec_from_file_location(f"_verger_mp_{os.getpid()}", self.file)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {self.file} to find {self.qualname}")
            obj = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = obj
            spec.loader.exec_module(obj)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj


def _ref(fn: Callable[..., Any]) -> _FnRef:
    qualname = getattr(fn, "__qualname__", "")
    if "<locals>" in qualname or "<lambda>" in qualname or not hasattr(fn, "__module__"):
        raise TypeError(
            f"fn={fn!r} must be a module-level function (not a lambda or a nested function): "
            "each process imports it by name"
        )
    try:
        file = inspect.getfile(fn)
    except TypeError:
        file = None
    return _FnRef(fn.__module__, qualname, file)


def free_port() -> int:
    """An unused TCP port on localhost (racy by nature; fine for tests and local runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    ref: _FnRef,
    args: tuple[Any, ...],
    results: Any,
    threads: int,
    timeout_s: float,
    parent_pid: int,
) -> None:
    exit_when_parent_dies(parent_pid)  # no orphans if the launcher is killed with SIGKILL
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        out = ref.resolve()(*args)
        # Pickled here (plain bytes) so tensors do not depend on shared-memory handles that
        # die with this process.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()


def run_multiprocess(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 180.0,
    threads_per_process: int = 1,
    start_method: str | None = None,
) -> list[Any]:
    """Call ``fn(*args)`` on ``world_size`` fresh processes in one process group.

    Each process has ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` set and the default
    group initialized (so :func:`verger.core.distributed.init_distributed` and DeepSpeed work
    inside ``fn``). Returns the return values ordered by rank (they must be picklable).
    Raises :class:`MultiprocessError` with the first failing rank's traceback, and
    ``TimeoutError`` naming the ranks that did not finish within ``timeout`` seconds.

    ``start_method=None`` uses ``"forkserver"`` where available (a clean server process that
    has imported torch once forks each worker: much faster than ``"spawn"``, and safe, unlike
    forking a parent whose thread pools are running), else ``"spawn"``.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an int >= 1")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r} must be 'gloo' or 'nccl'")
    ref = _ref(fn)
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx: Any = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "torch.distributed", __name__])
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(
                r,
                world_size,
                port,
                backend,
                ref,
                args,
                results,
                threads_per_process,
                timeout,
                os.getpid(),
            ),
            daemon=True,
        )
        for r in range(world_size)
    ]
    done: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    # SIGTERM (and Ctrl-C) unwind through the finally below, which kills the workers.
    with sigterm_raises():
        try:
            for p in procs:
                p.start()
            _collect(procs, results, done, world_size, deadline, timeout)
        except BaseException:
            _stop(procs, grace_s=0.0)  # a failed rank, a timeout, Ctrl-C or SIGTERM
            raise
        finally:
            _stop(procs, grace_s=5.0)
            results.close()
    return [done[r] for r in range(world_size)]


def _stop(procs: list[Any], *, grace_s: float) -> None:
    """Join every started worker for up to ``grace_s`` seconds, then kill what is left."""
    for p in procs:
        if p.pid is None:
            continue
        p.join(timeout=grace_s)
        if p.is_alive():
            p.kill()
            p.join()


def _collect(
    procs: list[Any],
    results: Any,
    done: dict[int, Any],
    world_size: int,
    deadline: float,
    timeout: float,
) -> None:
    """Gather each rank's result into ``done``; raise on a failed, dead or late rank."""
    while len(done) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(done))
            raise TimeoutError(f"rank(s) {missing} did not finish within {timeout:.0f} s")
        try:
            rank, ok, payload = results.get(timeout=min(remaining, 1.0))
        except queue_mod.Empty:
            crashed = [
                r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)
            ]
            # A process that died without reporting (segfault, os._exit, OOM kill).
            if crashed:
                time.sleep(0.5)  # let a just-sent result arrive before blaming the rank
                if results.empty():
                    codes = {r: procs[r].exitcode for r in crashed}
                    raise MultiprocessError(
                        f"rank(s) {crashed} exited without a result (exit codes {codes})"
                    ) from None
            continue
        if not ok:
            raise MultiprocessError(f"rank {rank} of {world_size} failed:\n{payload}")
        done[rank] = pickle.loads(payload)
