"""Exact checkpoint/resume: model (safetensors), optimizer, scheduler, RNG and data position.

Layout under the checkpoint folder::

    step-00000100/  model.safetensors  state.pt  meta.json
    latest          "step-00000100"

Each ``step-*`` folder is written as a hidden temporary folder and renamed into place only
when complete (``meta.json`` is its last file), then ``latest`` is replaced atomically. A
kill at any moment leaves the previous checkpoint intact and ``latest`` pointing at it.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from verger.core.files import (
    atomic_directory,
    atomic_write_text,
    restore_moved_aside,
)

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or unreadable; the message names it and the remedy."""


def rng_state() -> dict[str, Any]:
    """Every random generator state a training step may consume (Python, NumPy, torch)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`rng_state`.

    The torch states may come back on another device (a checkpoint loaded with
    ``map_location="cuda"``); torch only takes CPU byte tensors, so they are moved first.
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@dataclass
class Checkpoint:
    """What :meth:`Checkpointer.load` restored: the step, its folder and the ``extra`` dict."""

    step: int
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)


def _state_dict(obj: Any) -> Any:
    return None if obj is None else obj.state_dict()


class Checkpointer:
    """Save and restore training state in ``directory``, keeping the last ``keep`` checkpoints.

    A save of step ``s`` starts the timeline that ``latest`` follows: checkpoints with a step
    above ``s`` (left by an earlier run in the same folder, or the future of a run resumed
    from an older checkpoint) are deleted, whatever ``keep`` is; then only the ``keep``
    highest steps up to ``s`` remain (``keep=None`` keeps them all). The checkpoint just
    written is never pruned.

    ``extra`` is any picklable dict: put the data position there (e.g.
    ``sampler.state_dict()``) so a resumed run sees exactly the batches it would have seen.

    The RNG state saved is the calling process's only. In a multi-rank run whose ranks draw
    different random numbers (per-rank seeds, dropout, masks), gather every rank's
    :func:`rng_state` on all ranks (``verger.core.distributed.all_gather_object``, a
    collective) before rank 0 saves them as ``extra={"ranks": states}``; after ``load``,
    each rank calls ``set_rng_state(ckpt.extra["ranks"][rank])``. The gather is left to the
    caller because only rank 0 calls ``save`` (one writer per folder).
    """

    def __init__(self, directory: str | Path, *, keep: int | None = 2) -> None:
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep={keep!r} must be None (keep all) or an int >= 1")
        self.directory = Path(directory)
        self.keep = keep

    # ---------------------------------------------------------------- writing
    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically and point ``latest`` at it; returns its folder."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step={step!r} must be an int >= 0")
        target = self.directory / f"step-{step:08d}"
        if self.directory.is_dir():  # sweep what killed saves left (one writer per folder)
            for aside in self.directory.glob(".step-*.old.tmp"):  # a re-save killed midway
                restore_moved_aside(self.directory / aside.name[1 : -len(".old.tmp")])
            for stale in self.directory.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        with atomic_directory(target) as tmp:
            files = []
            if model is not None:
                save_model(model, str(tmp / "model.safetensors"))
                files.append("model.safetensors")
            state = {
                "step": step,
                "optimizer": _state_dict(optimizer),
                "scheduler": _state_dict(scheduler),
                "rng": rng_state(),
                "extra": dict(extra or {}),
            }
            torch.save(state, tmp / "state.pt")
            files.append("state.pt")
            meta = {"format": FORMAT_VERSION, "step": step, "files": files}
            (tmp / "meta.json").write_text(json.dumps(meta))
        atomic_write_text(self.directory / "latest", target.name + "\n")
        self._prune(step)
        return target

    def _prune(self, saved: int) -> None:
        """Drop checkpoints after ``saved`` (another timeline), then all but ``keep`` before it.

        Ranking by step number alone would prune the checkpoint just written whenever the
        folder holds higher steps of an earlier run (a fresh start, or a fork from an older
        checkpoint), and ``latest_step()`` would then fall back to that stale run.
        """
        steps = self.steps()
        doomed = [s for s in steps if s > saved]
        if self.keep is not None:
            doomed += [s for s in steps if s <= saved][: -self.keep]
        for step in doomed:
            shutil.rmtree(self.directory / f"step-{step:08d}", ignore_errors=True)

    # ---------------------------------------------------------------- reading
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints present, ascending (temporary folders ignored)."""
        if not self.directory.is_dir():
            return []
        found = []
        for child in self.directory.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / "meta.json").is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest_step(self) -> int | None:
        """The step ``latest`` points at (falling back to the newest complete folder), or None."""
        pointer = self.directory / "latest"
        if pointer.is_file():
            m = _STEP_DIR.match(pointer.read_text().strip())
            if m and (self.directory / pointer.read_text().strip() / "meta.json").is_file():
                return int(m.group(1))
        steps = self.steps()
        return steps[-1] if steps else None

    def load(
        self,
        step: int | None = None,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        restore_rng: bool = True,
        map_location: str | torch.device = "cpu",
    ) -> Checkpoint:
        """Restore checkpoint ``step`` (default: the latest) into the given objects, in place.

        Raises :class:`CheckpointError` naming the missing or corrupt file and what to do.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(
                    f"no checkpoint in {self.directory}: nothing to resume; start without "
                    "resuming (or point to the folder that holds the step-* checkpoints)"
                )
        folder = self.directory / f"step-{step:08d}"
        remedy = (
            f"delete {folder} to resume from the previous checkpoint "
            f"(available: {[s for s in self.steps() if s != step]}), or restart from scratch"
        )
        meta_path = folder / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(
                f"{meta_path} is missing: incomplete checkpoint; {remedy}"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{meta_path} is corrupt ({exc}); {remedy}") from None
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{meta_path}: unknown format {meta.get('format')!r}; {remedy}")

        if model is not None:
            weights = folder / "model.safetensors"
            if not weights.is_file():
                raise CheckpointError(f"{weights} is missing (saved without a model?); {remedy}")
            try:
                mismatch = _shape_mismatches(model, weights)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{weights} is corrupt ({exc}); {remedy}") from None
            if mismatch:
                shown = "; ".join(mismatch[:3]) + (
                    f" (+{len(mismatch) - 3} more)" if len(mismatch) > 3 else ""
                )
                raise CheckpointError(
                    f"{weights} holds a model of another shape ({shown}): resume with the "
                    "model settings it was saved with, or start a new run"
                )
            try:
                load_model(model, str(weights), strict=True, device=str(map_location))
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{weights} is corrupt ({exc}); {remedy}") from None
        state_path = folder / "state.pt"
        try:
            # weights_only=False: the file holds RNG tuples and the user's `extra`; only load
            # checkpoints you wrote (the same trust as any pickle).
            state = torch.load(state_path, map_location=map_location, weights_only=False)
        except FileNotFoundError:
            raise CheckpointError(f"{state_path} is missing; {remedy}") from None
        except Exception as exc:  # torch.load raises many types on a torn or garbled file
            raise CheckpointError(
                f"{state_path} is corrupt ({type(exc).__name__}: {exc}); {remedy}"
            ) from None
        if optimizer is not None:
            if state["optimizer"] is None:
                raise CheckpointError(f"{state_path} holds no optimizer state; {remedy}")
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            if state["scheduler"] is None:
                raise CheckpointError(f"{state_path} holds no scheduler state; {remedy}")
            scheduler.load_state_dict(state["scheduler"])
        if restore_rng:
            set_rng_state(state["rng"])
        return Checkpoint(step=int(state["step"]), path=folder, extra=state["extra"])

    def load_latest(self, **kwargs: Any) -> Checkpoint | None:
        """Like :meth:`load` for the latest step, but returns None when there is none yet."""
        if self.latest_step() is None:
            return None
        return self.load(None, **kwargs)


def _shape_mismatches(model: torch.nn.Module, weights: Path) -> list[str]:
    """How the tensors saved in ``weights`` differ from ``model``'s (names and shapes).

    Read from the safetensors header only, so a model of another size is explained in one
    line instead of load_state_dict's list of size errors. Tied weights are saved once.
    """
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        saved = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    state = model.state_dict()
    now = {name: list(t.shape) for name, t in state.items()}
    out = [
        f"{name} {saved[name]} saved, {now[name]} now"
        for name in saved
        if name in now and saved[name] != now[name]
    ]
    missing = sorted(set(now) - set(saved))
    unexpected = sorted(set(saved) - set(now))
    # save_model drops tied duplicates: a missing name sharing storage with a saved one is fine
    saved_ptrs = {state[m].data_ptr() for m in saved if m in state}
    tied = {n for n in missing if state[n].data_ptr() in saved_ptrs}
    missing = [n for n in missing if n not in tied]
    if missing:
        out.append(f"not saved: {', '.join(missing[:3])}")
    if unexpected:
        out.append(f"not in the model: {', '.join(unexpected[:3])}")
    return out
