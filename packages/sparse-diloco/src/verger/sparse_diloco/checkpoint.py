"""Checkpoints of a DiLoCo run: the global state once, each worker's inner state beside it.

Layout: ``DIR/round_000012/global.pt`` (anchor parameters, outer momentum, counters) and
``DIR/round_000012/worker_3.pt`` (trained coordinates, AdamW state, data position), each file
written atomically, and ``DIR/setup.json`` (worker count, fragments, parameter shapes, plan):
resuming with another setup raises ``ValueError`` instead of mixing two runs' files. In a
multi-process run every rank writes its own worker file and rank 0 the global one; a round is
complete, and can be resumed, only when all W+1 files exist, so a crash mid-save falls back to
the previous round with nothing lost.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from verger.core.files import atomic_path, atomic_write_json
from verger.sparse_diloco.engine import DiLoCo

_ROUND = re.compile(r"^round_(\d{6})$")
SETUP_FILE = "setup.json"


class RunCheckpointer:
    """Save/resume `DiLoCo` state under ``directory``; keeps the ``keep`` latest rounds."""

    def __init__(self, directory: str | Path, *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep={keep!r} must be >= 1")
        self.directory = Path(directory)
        self.keep = keep

    def _round_dir(self, round_index: int) -> Path:
        return self.directory / f"round_{round_index:06d}"

    def save(
        self, engine: DiLoCo, *, write_global: bool = True, write_workers: bool = True
    ) -> Path:
        """Write this process's workers (and the global state when ``write_global``).

        Ranks of one island hold identical worker state: only one of them writes it. With an
        engine whose worker state is collective (DeepSpeed: ZeRO shards gathered to the
        island's rank 0) every rank takes part and ``write_workers`` picks the writer.
        """
        folder = self._round_dir(engine.rounds_done)
        folder.mkdir(parents=True, exist_ok=True)
        self.check_setup(engine)
        if write_global and not (self.directory / SETUP_FILE).is_file():
            atomic_write_json(self.directory / SETUP_FILE, engine.run_setup())
        for k in engine.workers:
            if not (write_workers or engine.collective_worker_state):
                continue
            state = engine.worker_state_dict(k)
            if write_workers:
                with atomic_path(folder / f"worker_{k}.pt") as tmp:
                    torch.save(state, tmp)
        if write_global:
            with atomic_path(folder / "global.pt") as tmp:
                torch.save(engine.global_state_dict(), tmp)
            self._prune(engine.config.num_workers)
        return folder

    def complete_rounds(self, num_workers: int) -> list[int]:
        """Rounds with the global file and every worker file present, oldest first."""
        if not self.directory.is_dir():
            return []
        done = []
        for path in self.directory.iterdir():
            m = _ROUND.match(path.name)
            files = ["global.pt", *(f"worker_{k}.pt" for k in range(num_workers))]
            if m and all((path / f).is_file() for f in files):
                done.append(int(m.group(1)))
        return sorted(done)

    def check_setup(self, engine: DiLoCo) -> None:
        """Raise ``ValueError`` when ``directory`` holds a run of another setup.

        Without this, another worker count would silently start afresh over the old files
        (its rounds are never complete) and another plan would fail deep in a tensor copy.
        Directories written before ``setup.json`` existed are not checked.
        """
        path = self.directory / SETUP_FILE
        if not path.is_file():
            return
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {path} ({exc}); it is damaged") from exc
        current = engine.run_setup()
        differ = [key for key in current if saved.get(key) != current[key]]
        if differ:
            details = ", ".join(
                f"{key}={saved.get(key)} there, {current[key]} here"
                for key in differ
                if key in ("num_workers", "num_fragments")
            )
            raise ValueError(
                f"checkpoint directory {self.directory} holds a run with another "
                f"{' / '.join(differ)} ({details or 'see ' + str(path)}); resume with the same "
                "setup or use another checkpoint directory"
            )

    def load_latest(self, engine: DiLoCo) -> int | None:
        """Restore the newest complete round into ``engine``; returns its index or None."""
        self.check_setup(engine)
        rounds = self.complete_rounds(engine.config.num_workers)
        if not rounds:
            return None
        folder = self._round_dir(rounds[-1])
        engine.load_global_state_dict(_load(folder / "global.pt"))
        for k in engine.workers:
            engine.load_worker_state_dict(k, _load(folder / f"worker_{k}.pt"))
        return rounds[-1]

    def _prune(self, num_workers: int) -> None:
        rounds = self.complete_rounds(num_workers)
        for r in rounds[: -self.keep]:
            shutil.rmtree(self._round_dir(r), ignore_errors=True)


def _load(path: Path) -> Any:
    """``torch.load`` with an error that names the file and the way out."""
    try:
        # tensors land on the CPU: loading copies them into the engine's own tensors, so a
        # GPU run's checkpoint also resumes on a machine without that device
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(
            f"cannot read checkpoint file {path} ({type(exc).__name__}: {exc}); the file is "
            f"damaged: delete {path.parent} to resume from the previous complete round"
        ) from exc
