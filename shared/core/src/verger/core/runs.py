"""The run folder: what a command writes, and the rules that keep runs from losing or mixing data.

A run folder (a command's ``--out``) holds ``run.json``: the package, the command, its settings
and seed, the entries the run created, and whether it finished. The rules:

- **One writer.** A run holds an exclusive lock on the folder (``.run.lock``, released by the
  OS even when the process is killed); a second run into the same folder is refused at once,
  naming the holder's pid.
- **Nothing foreign is touched.** A folder that holds files but no ``run.json`` is refused
  (it is not a run); ``--overwrite`` deletes only the entries ``run.json`` lists as created by
  the run, never anything else.
- **Resume only the same run.** An unfinished run continues with ``--resume`` when the
  settings that define its results (:meth:`verger.core.settings.Settings.identity_fields`, the
  seed, the command) match; otherwise a one-line error lists each differing setting and the
  choices (matching settings with ``--resume``, a new ``--out``, or ``--overwrite``).
- **Finished means finished.** A finished run is reported, not run again or overwritten,
  unless ``--overwrite`` is given.

Every file or folder a run writes at the top of its folder is named through :meth:`Run.path`
(or written by :meth:`Run.finish`), so that ``run.json`` knows what belongs to the run.

Under torchrun every rank runs the same command: rank 0 owns the folder (the lock, the
checks, ``run.json``, the report); the other ranks wait until rank 0 has opened it for the
same launch and follow its decision (``run.resumed``), writing nothing of the record.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from verger.core.bench.report import Report, Scalar
from verger.core.files import FileLock, atomic_write_json
from verger.core.settings import Settings

__all__ = ["AlreadyFinished", "Run", "RunFolderError", "RunRequest"]

RUN_FILE = "run.json"
LOCK_FILE = ".run.lock"
LAUNCH_FILE = ".run.launch"  # under torchrun: rank 0's decision for the current launch
FORMAT = 1


class RunFolderError(Exception):
    """The run folder cannot be used as asked; the message says why and what to do instead."""


class AlreadyFinished(Exception):
    """The folder holds this very run, finished; its results are kept (``--overwrite`` reruns)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        super().__init__(
            f"{folder} holds this run, already finished: its results are kept "
            "(pass --overwrite to run it again, or give another --out)"
        )


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    """What a command asks of its run folder."""

    folder: Path
    package: str  # "verger.fast_attention"
    command: str  # "demo"
    settings: Settings
    seed: int
    device: torch.device
    quick: bool = False
    resume: bool = False
    overwrite: bool = False
    version: str = "0+unknown"
    rebuild_corpus: bool = False  # --rebuild-corpus, for commands that read the corpus
    rank: int = 0  # under torchrun: this process's RANK (only rank 0 owns the folder)
    launch: str | None = None  # under torchrun: what identifies this launch (see launch_id)
    follow_timeout_s: float = 600.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def launch_id(env: Mapping[str, str] | None = None) -> tuple[int, str | None]:
    """``(rank, launch)`` of a torchrun process (``(0, None)`` outside torchrun).

    The launch is named by torchrun's run id and rendezvous address, which every rank of one
    launch shares and a relaunch changes.
    """
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1:
        return 0, None
    parts = (
        env.get("TORCHELASTIC_RUN_ID", ""),
        env.get("MASTER_ADDR", ""),
        env.get("MASTER_PORT", ""),
    )
    return int(env.get("RANK", "0") or 0), ":".join(parts)


class _NoLock:
    """What a follower rank holds instead of the folder's lock (rank 0 holds that)."""

    def release(self) -> None:
        pass


class Run:
    """An open run folder: locked, recorded in ``run.json``; use as a context manager.

    ``Run.open(request)`` applies the rules above and raises :class:`RunFolderError` or
    :class:`AlreadyFinished` before anything is written. Attributes: ``folder``,
    ``settings``, ``seed``, ``device``, ``quick``, ``resumed`` (True when continuing an
    interrupted run: load your checkpoints), ``rebuild_corpus``, ``record`` (the
    ``run.json`` content).
    """

    def __init__(
        self, request: RunRequest, lock: FileLock | _NoLock, record: dict[str, Any]
    ) -> None:
        self.leader = request.rank == 0  # only the leader writes run.json and the report
        self.folder = request.folder
        self.settings = request.settings
        self.seed = request.seed
        self.device = request.device
        self.quick = request.quick
        self.rebuild_corpus = request.rebuild_corpus
        self.resumed = bool(record.get("resumes", 0)) and request.resume
        self.record = record
        self._lock = lock

    # --- opening --------------------------------------------------------------------------

    @classmethod
    def open(cls, request: RunRequest) -> Run:
        """Lock the folder and check it against the rules; see the module docstring."""
        folder = request.folder
        if request.resume and request.overwrite:
            raise RunFolderError("--resume and --overwrite exclude each other: pick one")
        if request.rank != 0:
            return cls._follow(request)
        if folder.exists() and not folder.is_dir():
            raise RunFolderError(f"{folder} is a file; give a folder (created if missing)")
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / LOCK_FILE)
        if not lock.acquire(blocking=False):
            pid = lock.holder()
            who = f"process {pid}" if pid is not None else "another process"
            raise RunFolderError(
                f"{folder} is in use by {who} (another run writes there): wait for it to end, "
                "or give another --out"
            )
        try:
            record = cls._check(request)
        except AlreadyFinished:
            cls._tell_followers(request, "finished", "")
            lock.release()
            raise
        except RunFolderError as err:
            cls._tell_followers(request, "refused", str(err))
            lock.release()
            raise
        except BaseException:
            lock.release()
            raise
        run = cls(request, lock, record)
        cls._tell_followers(request, "opened", "")
        if str(request.device) not in record["devices"]:
            record["devices"].append(str(request.device))
        run._write_record()
        return run

    @staticmethod
    def _tell_followers(request: RunRequest, outcome: str, message: str) -> None:
        """Rank 0 says what it decided for this launch (only under torchrun)."""
        if request.launch is not None:
            atomic_write_json(
                request.folder / LAUNCH_FILE,
                {"launch": request.launch, "outcome": outcome, "message": message},
            )

    @classmethod
    def _follow(cls, request: RunRequest) -> Run:
        """A torchrun rank > 0: wait for rank 0's decision for this launch, then share it
        (fresh or resumed; or its refusal) without taking the lock or writing anything."""
        deadline = time.monotonic() + request.follow_timeout_s
        path = request.folder / LAUNCH_FILE
        while True:
            try:
                said = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                said = {}
            if said.get("launch") == request.launch and request.launch is not None:
                if said.get("outcome") == "finished":
                    raise AlreadyFinished(request.folder)
                if said.get("outcome") == "refused":
                    raise RunFolderError(f"rank 0 refused the run folder: {said.get('message')}")
                record = cls._read_record(request.folder)
                if record is not None:
                    return cls(request, _NoLock(), record)
            if time.monotonic() > deadline:
                raise RunFolderError(
                    f"rank {request.rank}: rank 0 did not open {request.folder} for this launch "
                    f"within {request.follow_timeout_s:.0f} s (see rank 0's error)"
                )
            time.sleep(0.2)

    @staticmethod
    def _read_record(folder: Path) -> dict[str, Any] | None:
        path = folder / RUN_FILE
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(record, dict) or record.get("format") != FORMAT:
                raise ValueError("not a verger run record")
            for key in ("package", "command", "settings", "seed", "status", "created"):
                if key not in record:
                    raise ValueError(f"no {key!r} entry")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RunFolderError(
                f"{path} is damaged ({exc}); the run's files cannot be told apart from others, so "
                "nothing is deleted: give another --out, or delete the folder yourself"
            ) from None
        return record

    @classmethod
    def _check(cls, request: RunRequest) -> dict[str, Any]:
        folder = request.folder
        record = cls._read_record(folder)
        if record is None:
            others = sorted(
                p.name for p in folder.iterdir() if p.name not in (LOCK_FILE, LAUNCH_FILE)
            )
            if others:
                shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                raise RunFolderError(
                    f"{folder} is not empty ({shown}) and holds no {RUN_FILE}: it is not a verger "
                    "run, and a run never writes over files it did not create; give an empty or "
                    "new --out"
                )
            return cls._fresh_record(request)
        what = f"{record['package']} {record['command']}"
        if (record["package"], record["command"]) != (request.package, request.command):
            raise RunFolderError(
                f"{folder} holds a `{what}` run, not `{request.package} {request.command}`: "
                "give another --out"
                + (", or --overwrite to replace it" if not request.resume else "")
            )
        diffs = request.settings.differences(record["settings"])
        if record["seed"] != request.seed:
            diffs.append(f"seed: {record['seed']!r} (recorded) -> {request.seed!r} (now)")
        if diffs and not request.overwrite:
            raise RunFolderError(
                f"{folder} holds a `{what}` run with other settings ({'; '.join(diffs)}): "
                "use the recorded settings with --resume, give another --out, or pass "
                "--overwrite to replace that run"
            )
        if request.overwrite:
            cls._remove_created(folder, record)
            return cls._fresh_record(request)
        if record["status"] == "finished":
            raise AlreadyFinished(folder)
        if not request.resume:
            raise RunFolderError(
                f"{folder} holds an unfinished `{what}` run with these settings: pass --resume "
                "to continue it, --overwrite to start it over, or give another --out"
            )
        record = dict(record)
        record["resumes"] = int(record.get("resumes", 0)) + 1
        record["status"] = "running"
        record["launch"] = request.launch
        return record

    @staticmethod
    def _fresh_record(request: RunRequest) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "package": request.package,
            "version": request.version,
            "command": request.command,
            "settings": request.settings.to_dict(),
            "seed": request.seed,
            "quick": request.quick,
            "status": "running",
            "resumes": 0,
            "created": [],
            "started": _now(),
            "devices": [str(request.device)],
            "launch": request.launch,
        }

    @staticmethod
    def _remove_created(folder: Path, record: Mapping[str, Any]) -> None:
        for name in record.get("created", []):
            if (
                not isinstance(name, str)
                or "/" in name
                or name in ("", ".", "..", LOCK_FILE, LAUNCH_FILE)
            ):
                continue  # only plain top-level names the run recorded
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        (folder / RUN_FILE).unlink(missing_ok=True)

    # --- use ------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """``folder / name``, recorded as created by this run (its top-level entry)."""
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ValueError(f"run.path({name!r}) must be a relative path inside the run folder")
        top = relative.parts[0]
        if top in (RUN_FILE, LOCK_FILE, LAUNCH_FILE):
            raise ValueError(f"run.path({name!r}): {top} belongs to the run folder itself")
        if self.leader and top not in self.record["created"]:
            self.record["created"].append(top)
            self._write_record()
        return self.folder / relative

    def report(self, title: str) -> Report:
        """A :class:`Report` writing into the run folder (its files recorded at :meth:`finish`)."""
        return Report(self.folder, title=title)

    def finish(self, result: Report | Mapping[str, Scalar], *, title: str = "") -> Path:
        """Write ``metrics.json``/``report.md`` (from a Report, or a dict of metrics), mark the
        run finished; returns the path of ``metrics.json``."""
        if isinstance(result, Report):
            report = result
            if report.out_dir.resolve() != self.folder.resolve():
                raise ValueError(f"the report writes to {report.out_dir}, not to {self.folder}")
        else:
            report = self.report(title or f"{self.record['package']} {self.record['command']}")
            report.metrics_from(dict(result))
        if not self.leader:  # rank 0 writes the report and the record
            return self.folder / "metrics.json"
        for name in ("metrics.json", "report.md", *report.plot_files):
            self.path(name)
        report.write()
        self.record["status"] = "finished"
        self.record["finished"] = _now()
        self._write_record()
        return self.folder / "metrics.json"

    def note_device(self, device: torch.device | str) -> None:
        """Record another device this run used (e.g. a resume on another machine)."""
        if str(device) not in self.record["devices"]:
            self.record["devices"].append(str(device))
            self._write_record()

    def close(self) -> None:
        """Release the folder's lock (``run.json`` stays as last written)."""
        self._lock.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_record(self) -> None:
        if self.leader:
            atomic_write_json(self.folder / RUN_FILE, self.record)


def is_run_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a ``run.json``."""
    return (Path(folder) / RUN_FILE).is_file()
