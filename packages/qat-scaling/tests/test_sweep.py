"""The sweep runner: branching from the shared trunk equals an independent run, fused and
unfused runs see the same tokens, an interrupted sweep resumes to the same records, runs
spread over processes, compute accounting, and bad input."""

import dataclasses

import pytest
import torch

from verger.core.train import LoopConfig, TrainLoop
from verger.qat_scaling import (
    DataConfig,
    QuantConfig,
    SweepConfig,
    TrainConfig,
    build_model,
    compute_plan,
    enable_fake_quant,
    evaluate,
    load_data,
    make_optimizer,
    read_records,
    run_sweep,
)
from verger.qat_scaling.data import StepBatches
from verger.qat_scaling.training import StepLR, add_quantizers

DATA = DataConfig(
    domains=("code", "docs"), max_bytes_per_domain=100_000, seq_len=16, batch_size=4, val_batches=2
)
TRAIN = TrainConfig(warmup_steps=3, qat_warmup_steps=2, checkpoint_every=4, lr=3e-3)


def _config(**overrides):
    fields = dict(
        sizes=("xxs",), bits=(4,), fractions=(0.25, 0.5), tokens=(64 * 24,), data=DATA, train=TRAIN
    )
    fields.update(overrides)
    return SweepConfig(**fields)


def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_a_branched_run_equals_an_independent_run(tmp_path):
    config = _config(fractions=(0.5,), fp_baselines=False)
    (record,) = run_sweep(config, tmp_path / "sweep").records
    run = config.runs()[0]
    sched = config.schedule(run)
    assert 0 < sched.branch_step < sched.switch_step  # the run did branch, before its cooldown
    data = load_data(DATA)
    model = build_model("xxs", vocab_size=data.vocab_size, seq_len=DATA.seq_len, seed=0)
    opt = make_optimizer(model, TRAIN)
    add_quantizers(model, opt, config.quant_config(run), TRAIN.lr)  # scales idle until the switch
    for start, stop in ((0, sched.switch_step), (sched.switch_step, sched.total_steps)):
        if start == sched.switch_step:
            enable_fake_quant(model, True)
        loop = TrainLoop(model, opt, config=LoopConfig(max_steps=stop, grad_clip=TRAIN.grad_clip),
                         scheduler=StepLR(opt, sched.lr, start), show_progress=False)  # fmt: skip
        loop.step = start
        loop.run(data.batches(0, start), resume=False)
    losses = evaluate(model, data, torch.device("cpu"))
    assert record["val_loss_by_domain"] == losses  # bit for bit


def test_fused_and_unfused_runs_train_on_the_same_tokens(tmp_path, monkeypatch):
    seen = {}
    original = StepBatches.batch

    def recording(self, step):
        batch = original(self, step)
        seen.setdefault(key, []).append((step, int(batch[0].sum()), int(batch[1].sum())))
        return batch

    monkeypatch.setattr(StepBatches, "batch", recording)
    records = {}
    for key, fused in (("unfused", False), ("fused", True)):
        config = _config(fractions=(0.25,), fused=(fused,), fp_baselines=False)
        (records[key],) = run_sweep(config, tmp_path / key).records
    steps = config.steps(config.runs()[0])
    # trunk + branch together consume every step's batch exactly once, the same batches
    assert sorted(seen["unfused"]) == sorted(seen["fused"])
    assert [s for s, _, _ in sorted(seen["fused"])] == list(range(steps))
    for key in ("tokens", "tokens_fp", "tokens_qat"):
        assert records["fused"][key] == records["unfused"][key]
    assert records["fused"]["val_loss"] != records["unfused"]["val_loss"]  # yet different runs


def test_a_resumed_sweep_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    config = _config()
    want = run_sweep(config, tmp_path / "once")
    assert want.runs_trained == 3 and len(want.records) == 3
    assert run_sweep(config, tmp_path / "once").runs_trained == 0  # finished runs are skipped

    budget = {"steps": 0}
    original = TrainLoop.train_step

    def dying(self, micro):
        if budget["steps"] == 0:
            raise KeyboardInterrupt("killed")  # a kill: no checkpoint of this step
        budget["steps"] -= 1
        return original(self, micro)

    monkeypatch.setattr(TrainLoop, "train_step", dying)
    attempts = 0
    while True:
        budget["steps"] = 7  # dies mid-trunk, mid-branch, between checkpoints
        attempts += 1
        try:
            got = run_sweep(config, tmp_path / "resumed")
            break
        except KeyboardInterrupt:
            assert attempts < 50
    assert attempts > 3
    assert _strip(got.records) == _strip(want.records)
    on_disk = sorted(read_records(tmp_path / "resumed" / "runs.jsonl"), key=lambda r: r["run_id"])
    assert _strip(on_disk) == sorted(_strip(want.records), key=lambda r: r["run_id"])  # once each
    assert not (tmp_path / "resumed" / "runs").exists() or not any(
        (tmp_path / "resumed" / "runs").iterdir()
    )


@pytest.mark.slow  # spawned workers import torch afresh: ~1 minute on a shared 2-core VM
def test_runs_spread_over_processes_give_the_same_records(tmp_path):
    config = _config(fractions=(0.5,))
    one = run_sweep(config, tmp_path / "one", threads=1)
    two = run_sweep(config, tmp_path / "two", workers=2, threads=1)
    assert _strip(two.records) == _strip(one.records)


def test_compute_plan_counts_the_shared_prefix_once():
    config = _config(fractions=(0.25, 0.5), fp_baselines=True, bits=(2, 4))
    plan = compute_plan(config)
    runs = config.runs()
    steps = config.steps(runs[0])
    branch = [config.schedule(r).branch_step for r in runs]
    assert plan.independent_steps == steps * len(runs)
    assert plan.shared_steps == max(branch) + sum(steps - b for b in branch)
    assert 0 < plan.saving == pytest.approx(1 - plan.shared_steps / plan.independent_steps)


def test_records_follow_the_documented_schema(tmp_path):
    config = _config(fractions=(0.5,), bits=("ternary",))
    records = run_sweep(config, tmp_path / "s").records
    fp, qat = records
    assert fp["bits"] is None and fp["qat_fraction"] == 0.0 and fp["tokens_qat"] == 0
    assert qat["bits"] == "ternary" and qat["effective_bits"] == pytest.approx(1.585, abs=1e-3)
    assert (
        qat["tokens"] == qat["tokens_fp"] + qat["tokens_qat"] == config.steps(config.runs()[1]) * 64
    )
    assert qat["tokens_qat"] == qat["tokens"] // 2
    assert set(qat["val_loss_by_domain"]) == {"code", "docs"}
    assert qat["val_loss"] == pytest.approx(sum(qat["val_loss_by_domain"].values()) / 2)
    assert qat["n_params"] == 2 * (4 * 24 * 24 + 3 * 24 * 64) and qat["flops"] > 0


def test_a_folder_with_other_settings_or_in_use_is_refused(tmp_path):
    from verger.core.files import FileLock

    run_sweep(_config(fractions=(0.5,), fp_baselines=False), tmp_path / "s")
    other = _config(train=dataclasses.replace(TRAIN, lr=1e-3))
    with pytest.raises(ValueError, match=r"other training settings \(train.lr\)"):
        run_sweep(other, tmp_path / "s")
    with FileLock(tmp_path / "s" / ".sweep.lock"), pytest.raises(RuntimeError, match="in use"):
        run_sweep(_config(), tmp_path / "s")


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(fractions=(0.0,)), "fp_baselines"),
        (dict(fractions=(1.2,)), "fractions"),
        (dict(bits=(5,)), "bits"),
        (dict(sizes=("huge",)), "sizes"),
        (dict(tokens=(10,)), "tokens"),
        (dict(tokens=()), "tokens"),
        (dict(seeds=(-1,)), "seeds"),
        (dict(fractions=(0.5, 0.5)), "repeated"),
        (dict(quant=QuantConfig(group_size=7)), None),
    ],
)
def test_bad_sweep_configs_are_clear_errors(tmp_path, fields, match):
    if match is None:  # a group size that divides no layer fails when the run prepares
        with pytest.raises(ValueError, match="group_size=7 does not divide"):
            run_sweep(_config(**fields), tmp_path / "bad")
        return
    with pytest.raises(ValueError, match=match):
        _config(**fields)
