"""The experiment runner: a grid of FP-then-QAT runs with shared FP prefixes.

A grid is model sizes x bit widths x QAT fractions x token budgets (x fused / unfused x
seeds), plus a full-precision baseline per (size, budget, seed). Every run of a
(size, seed) shares the same FP *trunk* (warmup, then the peak LR, on the same batches):
the trunk is trained once and saved at each run's branch point, and each run trains only
its own tail from there (:mod:`.training`). Finished runs append a record to
``<out>/runs.jsonl`` (schema in :mod:`.records`).

Folder layout::

    <out>/sweep.json                      the training settings (a resume must match them)
    <out>/runs.jsonl                      one record per finished run
    <out>/trunks/<size>-s<seed>/          trunk branch points and resume checkpoints
    <out>/runs/<run_id>/ckpt/             a run's checkpoints (removed once recorded)

Resuming: finished runs (in ``runs.jsonl``) are skipped; an interrupted run continues from
its last checkpoint and an interrupted trunk from its last checkpoint or branch point, so
a resumed sweep writes the records an uninterrupted one would. Runs are spread over
``workers`` local processes (``devices=["cuda:0", "cuda:1"]``: one process per GPU); a
trunk's branches start as soon as their branch point is saved.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from verger.core.files import FileLock, atomic_write_json
from verger.core.nn import flops_per_token
from verger.core.progress import progress_bar
from verger.core.runtime import exit_when_parent_dies
from verger.core.validation import flag, integer, one_of, positive_int
from verger.qat_scaling.config import QuantConfig, check_bits, effective_bits
from verger.qat_scaling.data import DataConfig, load_data
from verger.qat_scaling.models import SIZES, build_model, model_config, quantized_parameters
from verger.qat_scaling.records import SCHEMA, append_record, read_records
from verger.qat_scaling.schedule import QATSchedule, check_fraction
from verger.qat_scaling.training import TrainConfig, TrunkState, train_branch, train_trunk

RUNS_FILE = "runs.jsonl"
SETTINGS_FILE = "sweep.json"


def _tuple(name: str, value: object) -> tuple[Any, ...]:
    if not isinstance(value, tuple | list) or not value:
        raise ValueError(f"{name}={value!r} must be a non-empty tuple")
    if len(set(value)) != len(value):
        raise ValueError(f"{name}={value!r} has repeated values")
    return tuple(value)


@dataclass(kw_only=True, frozen=True)
class SweepConfig:
    """The grid and the settings shared by all its runs.

    ``quant`` gives everything but the bit width (each run sets ``bits`` from ``bits``).
    ``tokens`` are rounded down to whole steps of ``data.batch_size x data.seq_len``.
    ``fractions`` are in (0, 1]; ``fp_baselines`` adds an FP run (f = 0) per size, budget
    and seed.
    """

    sizes: tuple[str, ...] = ("xs",)
    bits: tuple[int | str, ...] = (2, 4)
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75)
    tokens: tuple[int, ...] = (131_072, 262_144)
    fused: tuple[bool, ...] = (False,)
    seeds: tuple[int, ...] = (0,)
    fp_baselines: bool = True
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for name in ("sizes", "bits", "fractions", "tokens", "fused", "seeds"):
            object.__setattr__(self, name, _tuple(name, getattr(self, name)))
        for size in self.sizes:
            one_of("sizes", size, tuple(SIZES))
        for b in self.bits:
            check_bits("bits", b)
        for f in self.fractions:
            if check_fraction("fractions", f) == 0.0:
                raise ValueError("fractions: 0 means no QAT; FP runs come from fp_baselines=True")
        for t in self.tokens:  # at least one step of data.batch_size x data.seq_len
            integer("tokens", t, at_least=self.data.tokens_per_step)
        for fused in self.fused:
            flag("fused", fused)
        for seed in self.seeds:
            integer("seeds", seed, at_least=0)
        for name, cls in (("quant", QuantConfig), ("data", DataConfig), ("train", TrainConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}")
        for run in self.runs():  # every schedule must be valid before any work
            self.schedule(run)

    # ------------------------------------------------------------------ grid
    def runs(self) -> list[RunSpec]:
        out = []
        for seed in self.seeds:
            for size in self.sizes:
                for tokens in self.tokens:
                    if self.fp_baselines:
                        out.append(
                            RunSpec(
                                size=size,
                                bits=None,
                                qat_fraction=0.0,
                                tokens=tokens,
                                fused=False,
                                seed=seed,
                            )
                        )
                    for bits in self.bits:
                        for fused in self.fused:
                            for f in self.fractions:
                                out.append(RunSpec(size=size, bits=bits, qat_fraction=f, tokens=tokens, fused=fused, seed=seed))  # fmt: skip
        return out

    def steps(self, run: RunSpec) -> int:
        return run.tokens // self.data.tokens_per_step

    def schedule(self, run: RunSpec) -> QATSchedule:
        return self.train.schedule(self.steps(run), run.qat_fraction, run.fused)

    def quant_config(self, run: RunSpec) -> QuantConfig | None:
        if run.bits is None:
            return None
        return dataclasses.replace(self.quant, bits=run.bits, scheme=None)

    def vocab_size(self) -> int:
        return 257 if self.data.bpe_vocab_size is None else self.data.bpe_vocab_size

    def settings(self) -> dict[str, Any]:
        """What every run of the folder must share (the grid itself may grow)."""
        quant = self.quant.to_dict()
        quant.pop("bits"), quant.pop("scheme")
        train = self.train.to_dict()
        train.pop("checkpoint_every")  # changes where runs can resume, not their results
        return {"quant": quant, "data": self.data.to_dict(), "train": train}


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid; ``bits=None`` is a full-precision run."""

    size: str
    bits: int | str | None
    qat_fraction: float
    tokens: int
    fused: bool
    seed: int

    @property
    def run_id(self) -> str:
        bits = "fp" if self.bits is None else f"b{self.bits}"
        kind = "fused" if self.fused else "unfused"
        return f"{self.size}-{bits}-f{self.qat_fraction:.3f}-t{self.tokens}-{kind}-s{self.seed}"

    @property
    def trunk(self) -> str:
        return f"{self.size}-s{self.seed}"


@dataclass(frozen=True)
class ComputePlan:
    """Steps and FLOPs of a grid trained with shared FP prefixes vs run by run."""

    independent_flops: float
    shared_flops: float
    independent_steps: int
    shared_steps: int

    @property
    def saving(self) -> float:
        """Fraction of the FLOPs the shared prefixes save (0 = none)."""
        return 1.0 - self.shared_flops / self.independent_flops


def compute_plan(config: SweepConfig, runs: Sequence[RunSpec] | None = None) -> ComputePlan:
    """FLOPs of ``runs`` (default: the whole grid) with and without trunk sharing."""
    runs = config.runs() if runs is None else list(runs)
    if not runs:
        return ComputePlan(0.0, 0.0, 0, 0)
    tokens_per_step = config.data.tokens_per_step
    seq = config.data.seq_len

    def step_flops(size: str) -> float:
        cfg = model_config(size, vocab_size=config.vocab_size(), seq_len=seq)
        return float(flops_per_token(cfg, seq, training=True) * tokens_per_step)

    independent = shared = 0.0
    independent_steps = shared_steps = 0
    trunk_end: dict[tuple[str, int], int] = {}
    for run in runs:
        sched = config.schedule(run)
        per_step = step_flops(run.size)
        independent += per_step * sched.total_steps
        shared += per_step * (sched.total_steps - sched.branch_step)
        independent_steps += sched.total_steps
        shared_steps += sched.total_steps - sched.branch_step
        key = (run.size, run.seed)
        trunk_end[key] = max(trunk_end.get(key, 0), sched.branch_step)
    for (size, _), end in trunk_end.items():
        shared += step_flops(size) * end
        shared_steps += end
    return ComputePlan(independent, shared, independent_steps, shared_steps)


# ---------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class _Trunk:
    key: str
    size: str
    seed: int
    point: int


@dataclass(frozen=True)
class _Branch:
    run: RunSpec
    point: int


_WORKER_DEVICE: list[str] = ["cpu"]


def _init_worker(devices: Any, threads: int, parent: int) -> None:
    exit_when_parent_dies(parent)  # a parent killed outright leaves no orphans
    torch.set_num_threads(threads)
    _WORKER_DEVICE[0] = devices.get() if devices is not None else "cpu"


def _stop(pool: cf.ProcessPoolExecutor) -> None:
    """End the workers now: a failed run, Ctrl-C or SIGTERM must not wait for the others
    (their work is checkpointed; a resumed sweep continues it)."""
    pool.shutdown(wait=False, cancel_futures=True)
    processes = list(getattr(pool, "_processes", {}).values())  # no public handle on them
    for proc in processes:
        proc.terminate()
    for proc in processes:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def _execute(
    task: _Trunk | _Branch, config: SweepConfig, out: str, device: str | None = None
) -> Any:
    dev = torch.device(device or _WORKER_DEVICE[0])
    data = load_data(config.data)
    if data.vocab_size != config.vocab_size():
        raise ValueError(
            f"the tokenizer has {data.vocab_size} tokens, expected {config.vocab_size()}"
        )
    root = Path(out)
    if isinstance(task, _Trunk):
        trunk = TrunkState(root / "trunks" / task.key)
        return train_trunk(
            trunk, task.point, data=data, seed=task.seed, config=config.train, device=dev,
            build=lambda: build_model(task.size, vocab_size=data.vocab_size, seq_len=config.data.seq_len, seed=task.seed),
            show_progress=False,
        )  # fmt: skip
    run = task.run
    started = time.perf_counter()
    sched = config.schedule(run)
    result = train_branch(
        trunk=TrunkState(root / "trunks" / run.trunk), run_dir=root / "runs" / run.run_id,
        schedule=sched, quant=config.quant_config(run), data=data, seed=run.seed,
        config=config.train, device=dev, show_progress=False,
        build=lambda: build_model(run.size, vocab_size=data.vocab_size, seq_len=config.data.seq_len, seed=run.seed),
    )  # fmt: skip
    record = _record(config, run, sched, result.val_loss_by_domain, time.perf_counter() - started)
    return record, result.steps_trained


def _record(
    config: SweepConfig, run: RunSpec, sched: QATSchedule, losses: dict[str, float], seconds: float
) -> dict[str, Any]:
    fresh = build_model(
        run.size, vocab_size=config.vocab_size(), seq_len=config.data.seq_len, seed=run.seed
    )
    tps = config.data.tokens_per_step
    quant = config.quant_config(run)
    return {
        "schema": SCHEMA,
        "run_id": run.run_id,
        "size": run.size,
        "seed": run.seed,
        "n_params": quantized_parameters(fresh),
        "n_params_total": fresh.num_parameters(),
        "bits": run.bits,
        "effective_bits": None if run.bits is None else effective_bits(run.bits),
        "qat_fraction": run.qat_fraction,
        "fused": run.fused,
        "tokens": sched.total_steps * tps,
        "tokens_fp": sched.switch_step * tps,
        "tokens_qat": sched.qat_steps * tps,
        "flops": float(fresh.flops_per_token(config.data.seq_len, training=True)) * sched.total_steps * tps,
        "val_loss": sum(losses.values()) / len(losses),
        "val_loss_by_domain": losses,
        "steps": sched.total_steps,
        "batch_size": config.data.batch_size,
        "seq_len": config.data.seq_len,
        "quant": quant.to_dict() if quant is not None else None,
        "train": config.settings()["train"],
        "seconds": seconds,
    }  # fmt: skip


# ---------------------------------------------------------------------- runner
@dataclass
class SweepResult:
    """The records of the grid (plan order), what this call trained, the compute plan."""

    records: list[dict[str, Any]]
    runs_trained: int
    steps_trained: int
    compute: ComputePlan
    out_dir: Path


def _check_settings(out: Path, config: SweepConfig) -> None:
    path = out / SETTINGS_FILE
    settings = json.loads(json.dumps(config.settings()))
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is corrupt ({exc}); delete it or use a new folder") from None
        if previous != settings:
            changed = sorted(
                f"{group}.{k}"
                for group in settings
                for k in set(settings[group]) | set(previous.get(group, {}))
                if settings[group].get(k) != previous.get(group, {}).get(k)
            )
            raise ValueError(
                f"{out} holds a sweep with other training settings ({', '.join(changed)}); "
                "runs could not share its trunks: use a new folder"
            )
    else:
        atomic_write_json(path, settings)


def run_sweep(
    config: SweepConfig,
    out_dir: str | Path,
    *,
    workers: int = 1,
    devices: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    threads: int = 1,
    show_progress: bool | None = None,
    keep_checkpoints: bool = False,
) -> SweepResult:
    """Train every run of ``config`` not yet in ``<out_dir>/runs.jsonl``; see the module doc.

    ``workers=1`` (and no ``devices``) trains in this process on ``device``; otherwise a pool of
    ``workers`` processes (``len(devices)`` when ``devices`` is given, one per device).
    Every run uses ``threads`` torch threads, in this process or a worker, so the records do
    not depend on ``workers``. ``keep_checkpoints`` keeps finished runs' checkpoints.
    """
    if not isinstance(config, SweepConfig):
        raise TypeError(f"config must be a SweepConfig, got {type(config).__name__}")
    if devices is not None:
        devices = [str(torch.device(d)) for d in devices]
        if not devices:
            raise ValueError("devices must name at least one device")
        workers = len(devices)
    positive_int("workers", workers)
    positive_int("threads", threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / ".sweep.lock")
    if not lock.acquire(blocking=False):
        raise RuntimeError(f"{out} is in use by another sweep (process {lock.holder()})")
    try:
        _check_settings(out, config)
        runs_path = out / RUNS_FILE
        done = {r.get("run_id"): r for r in read_records(runs_path)} if runs_path.is_file() else {}
        plan = config.runs()
        pending = [r for r in plan if r.run_id not in done]
        trained = _train_pending(
            config, out, pending, workers=workers, devices=devices, device=str(torch.device(device)),
            threads=threads, show_progress=show_progress, keep_checkpoints=keep_checkpoints,
        )  # fmt: skip
        done = {r.get("run_id"): r for r in read_records(runs_path)} if runs_path.is_file() else {}
        records = [done[r.run_id] for r in plan if r.run_id in done]
        return SweepResult(records, len(pending), trained, compute_plan(config), out)
    finally:
        lock.release()


def _train_pending(
    config: SweepConfig,
    out: Path,
    pending: list[RunSpec],
    *,
    workers: int,
    devices: Sequence[str] | None,
    device: str,
    threads: int,
    show_progress: bool | None,
    keep_checkpoints: bool,
) -> int:
    # the tasks: per trunk, a chain of points; each run waits for its point
    points: dict[str, set[int]] = {}
    branches: dict[tuple[str, int], list[RunSpec]] = {}
    for run in pending:
        p = config.schedule(run).branch_step
        points.setdefault(run.trunk, set()).add(p)
        branches.setdefault((run.trunk, p), []).append(run)
    trunks = {run.trunk: (run.size, run.seed) for run in pending}
    chains = {key: [_Trunk(key, *trunks[key], p) for p in sorted(ps)] for key, ps in points.items()}
    bar = progress_bar(total=len(pending), desc="sweep runs", enabled=show_progress)
    steps = 0

    def finished_branch(run: RunSpec, record: dict[str, Any]) -> None:
        append_record(out / RUNS_FILE, record)
        if not keep_checkpoints:
            shutil.rmtree(out / "runs" / run.run_id, ignore_errors=True)
        bar.update(1)
        bar.set_postfix(last=run.run_id, loss=f"{record['val_loss']:.3f}")

    previous_threads = torch.get_num_threads()
    try:
        if workers == 1 and devices is None:
            # the same thread count as a worker would use: reductions (and so the records)
            # then do not depend on how the runs were spread
            torch.set_num_threads(threads)
            for key, chain in chains.items():
                for task in chain:
                    steps += _execute(task, config, str(out), device)
                    for run in branches[(key, task.point)]:
                        record, trained = _execute(
                            _Branch(run, task.point), config, str(out), device
                        )
                        steps += trained
                        finished_branch(run, record)
            return steps
        ctx = multiprocessing.get_context("spawn")
        manager = ctx.Manager() if devices is not None else None
        queue = manager.Queue() if manager is not None else None
        for d in devices or ():
            queue.put(d)  # type: ignore[union-attr]
        pool = cf.ProcessPoolExecutor(
            workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(queue, threads, os.getpid()),
        )
        finished_cleanly = False
        try:
            running: dict[cf.Future[Any], _Trunk | _Branch] = {}

            def submit(task: _Trunk | _Branch) -> None:
                running[pool.submit(_execute, task, config, str(out))] = task

            for chain in chains.values():
                submit(chain[0])
            while running:
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    done = running.pop(future)
                    result = future.result()  # a failed run stops the sweep (resumable)
                    if isinstance(done, _Trunk):
                        steps += result
                        chain = chains[done.key]
                        i = chain.index(done)
                        if i + 1 < len(chain):
                            submit(chain[i + 1])
                        for run in branches[(done.key, done.point)]:
                            submit(_Branch(run, done.point))
                    else:
                        record, trained = result
                        steps += trained
                        finished_branch(done.run, record)
            finished_cleanly = True
        finally:
            if finished_cleanly:
                pool.shutdown(wait=True)
            else:
                _stop(pool)
            if manager is not None:
                manager.shutdown()
        return steps
    finally:
        torch.set_num_threads(previous_threads)
        bar.close()
