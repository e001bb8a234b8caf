"""TrainLoop: bit-identical resume, accumulation, clipping, NaN stop and metrics."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

from verger.core import seed_everything
from verger.core.train import (
    Checkpointer,
    LoopConfig,
    MetricsLogger,
    NonFiniteLossError,
    TrainLoop,
    lambda_lr,
    read_metrics,
    wsd_schedule,
)

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import ToyLM, ToyStream


def _loop(ckpt_dir: Path | None, max_steps: int, **cfg) -> tuple[TrainLoop, ToyStream]:
    seed_everything(0)
    model = ToyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    sched = lambda_lr(opt, wsd_schedule(8, warmup_steps=2, cooldown="1-sqrt"))
    config = LoopConfig(max_steps=max_steps, grad_accum=2, grad_clip=0.5, **cfg)
    ckpt = Checkpointer(ckpt_dir) if ckpt_dir is not None else None
    loop = TrainLoop(
        model, opt, config=config, scheduler=sched, checkpointer=ckpt, show_progress=False
    )
    return loop, ToyStream(seed=1)


def test_resume_gives_bit_identical_losses(tmp_path) -> None:
    full, data = _loop(None, 8)
    reference = [s.loss for s in full.run(data)]

    first, data1 = _loop(tmp_path, 4, checkpoint_every=2)
    part1 = [s.loss for s in first.run(data1)]
    torch.manual_seed(12345)  # a fresh process would have different RNG state: resume must fix it
    second, data2 = _loop(tmp_path, 8, checkpoint_every=2)
    part2 = [s.loss for s in second.run(data2)]
    assert part1 + part2 == reference  # exact float equality, not approx
    for a, b in zip(full.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def test_resume_after_a_crash_logs_each_step_once(tmp_path) -> None:
    """Killed between checkpoints: the rerun steps are bit-identical and logged once."""
    full, data = _loop(None, 8)
    reference = [s.loss for s in full.run(data)]

    crashed, data1 = _loop(tmp_path / "ckpt", 8, checkpoint_every=3, log_every=1)
    real_step = crashed.train_step

    def dying_step(micro):  # the process dies during step 6 (last checkpoint: step 3)
        if crashed.step == 5:
            raise KeyboardInterrupt
        return real_step(micro)

    crashed.train_step = dying_step  # type: ignore[method-assign]
    with MetricsLogger(tmp_path / "logs", tensorboard=False) as logger:
        crashed.logger = logger
        with pytest.raises(KeyboardInterrupt):
            crashed.run(data1)
    torch.manual_seed(12345)
    resumed, data2 = _loop(tmp_path / "ckpt", 8, checkpoint_every=3, log_every=1)
    with MetricsLogger(tmp_path / "logs", tensorboard=False) as logger:
        resumed.logger = logger
        rerun = [s.loss for s in resumed.run(data2)]
    assert rerun == reference[3:]
    records = read_metrics(tmp_path / "logs" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == reference


def test_metrics_logger_cuts_a_torn_line_before_appending(tmp_path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, loss=1.0)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a killed writer
    with (
        pytest.warns(UserWarning, match="truncated"),
        MetricsLogger(tmp_path, tensorboard=False) as logger,
    ):
        logger.log(2, loss=2.0)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0)]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 3.0}')  # complete, only the newline is missing
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(4, loss=4.0)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_grad_accumulation_matches_one_big_batch() -> None:
    torch.manual_seed(0)
    x = torch.randint(32, (8, 6))
    y = torch.randint(32, (8, 6))
    grads = []
    for micro in ([(x, y)], [(x[:4], y[:4]), (x[4:], y[4:])]):
        torch.manual_seed(0)
        model = ToyLM().eval()
        model.drop.p = 0.0
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        loop = TrainLoop(model, opt, config=LoopConfig(max_steps=1, grad_clip=None))
        loop.train_step(micro)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_clipping_bounds_the_update_and_reports_the_raw_norm() -> None:
    torch.manual_seed(0)
    model = ToyLM()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loop = TrainLoop(model, opt, config=LoopConfig(max_steps=1, grad_clip=1e-3))
    stats = loop.train_step([next(ToyStream())])
    assert stats.grad_norm > 1e-3  # the raw norm, before clipping
    update = torch.sqrt(
        sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before))
    )
    assert float(update) == pytest.approx(1e-3, rel=1e-4)  # SGD lr=1: the clipped norm


def test_non_finite_loss_stops_without_stepping() -> None:
    model = ToyLM()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    loop = TrainLoop(
        model, opt, config=LoopConfig(max_steps=2), loss_fn=lambda m, b: m(*b) * float("nan")
    )
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 0"):
        loop.run(ToyStream())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert loop.step == 0


def test_data_exhaustion_and_config_validation() -> None:
    with pytest.raises(ValueError, match="grad_accum"):
        LoopConfig(max_steps=1, grad_accum=0)
    with pytest.raises(ValueError, match="grad_clip"):
        LoopConfig(max_steps=1, grad_clip=-1.0)
    loop = TrainLoop(
        ToyLM(), torch.optim.SGD(ToyLM().parameters(), lr=0.1), config=LoopConfig(max_steps=3)
    )
    with pytest.raises(ValueError, match="data ran out at step"):
        loop.run([next(ToyStream())])


def test_metrics_logger_writes_jsonl(tmp_path) -> None:
    loop, data = _loop(None, 4, log_every=2)
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        loop.logger = logger
        stats = loop.run(data)
        logger.log(99, note="nan check", bad=float("nan"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 99]
    assert records[0]["loss"] == stats[1].loss and records[2]["bad"] == "nan"
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 100, "lo')  # a killed writer
    with pytest.warns(UserWarning, match="truncated"):
        assert len(read_metrics(tmp_path / "metrics.jsonl")) == 3


def test_hooks_extras_after_step_and_extra_state(tmp_path) -> None:
    seed_everything(0)
    model = ToyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[int] = []
    counter = {"calls": 0}

    def loss_fn(m, batch):
        loss = m(*batch)
        return loss, {"double": 2 * float(loss)}

    def after(loop, stats):
        seen.append(stats.step)
        counter["calls"] += 1

    with MetricsLogger(tmp_path / "logs", tensorboard=None) as logger:
        loop = TrainLoop(
            model,
            opt,
            config=LoopConfig(max_steps=4, log_every=1, checkpoint_every=2),
            loss_fn=loss_fn,
            checkpointer=Checkpointer(tmp_path / "ck"),
            logger=logger,
            show_progress=False,
            after_step=after,
            extra_state=lambda: dict(counter),
            load_extra_state=lambda state: counter.update(calls=100 + state["calls"]),
        )
        history = loop.run(ToyStream(seed=1))
    assert seen == [1, 2, 3, 4]
    assert all(abs(s.extras["double"] - 2 * s.loss) < 1e-6 for s in history)
    rows = read_metrics(tmp_path / "logs" / "metrics.jsonl")
    assert [r["double"] for r in rows] == pytest.approx([s.extras["double"] for s in history])
    fresh = TrainLoop(
        ToyLM(),
        torch.optim.SGD(ToyLM().parameters(), lr=0.1),
        config=LoopConfig(max_steps=4),
        checkpointer=Checkpointer(tmp_path / "ck"),
        load_extra_state=lambda state: counter.update(calls=100 + state["calls"]),
    )
    assert fresh.resume() and fresh.step == 4 and counter["calls"] == 104


def _ranked_run(ckpt_dir: str, steps: int, stop_at: int | None) -> list[float]:
    """Each rank draws its own dropout masks (seed + rank); DDP averages the gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = ToyLM()
    seed_everything(10 + rank)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    loop = TrainLoop(
        model,
        opt,
        config=LoopConfig(max_steps=stop_at or steps, checkpoint_every=2),
        checkpointer=Checkpointer(ckpt_dir),  # every rank reads it back; rank 0 writes
        forward_model=ddp,
        per_rank_state=True,
        show_progress=False,
    )
    if stop_at is None and Checkpointer(ckpt_dir).latest_step() is not None:
        loop.config = LoopConfig(max_steps=steps, checkpoint_every=2)
    return [s.loss for s in loop.run(ToyStream(seed=1 + rank), resume=True)]


@pytest.mark.timeout(300)
def test_per_rank_state_resumes_two_ranks_exactly(tmp_path) -> None:
    from verger.core.distributed import run_multiprocess

    whole = run_multiprocess(_ranked_run, 2, str(tmp_path / "a"), 6, None)
    part1 = run_multiprocess(_ranked_run, 2, str(tmp_path / "b"), 6, 2)
    part2 = run_multiprocess(_ranked_run, 2, str(tmp_path / "b"), 6, None)
    for rank in range(2):
        assert part1[rank] + part2[rank] == whole[rank]  # bit for bit, each rank's own masks
    assert whole[0] != whole[1]  # the ranks did draw different randomness


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path) -> None:
    def boom(loop, stats):
        if stats.step == 3:
            raise KeyboardInterrupt  # killed mid-run, before any checkpoint

    for after in (boom, None):
        seed_everything(0)
        model = ToyLM()
        with MetricsLogger(tmp_path / "logs", tensorboard=None) as logger:
            loop = TrainLoop(
                model,
                torch.optim.SGD(model.parameters(), lr=0.1),
                config=LoopConfig(max_steps=4, log_every=1),
                checkpointer=Checkpointer(tmp_path / "ck"),
                logger=logger,
                show_progress=False,
                after_step=after,
            )
            with contextlib.suppress(KeyboardInterrupt):
                loop.run(ToyStream(seed=1))
    steps = [r["step"] for r in read_metrics(tmp_path / "logs" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
