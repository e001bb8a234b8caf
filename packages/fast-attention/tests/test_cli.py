"""The bench and demo commands: the package contract (verger.core.cli) and the run-folder rules
(verger.core.runs) as a user meets them, including the probes of issue 21."""

import json
import re

import pytest

from verger.core.bench import Report
from verger.core.files import FileLock
from verger.fast_attention import bench
from verger.fast_attention.__main__ import main

# a demo small enough for a test: one linear-attention LM, a few steps of 2 x 32 tokens
TINY = [
    "demo", "--quick", "--attentions", "linear", "--seq-len", "32", "--batch-size", "2",
    "--contexts", "16,32", "--val-batches", "1", "--generation-tokens", "1",
]  # fmt: skip
# a bench small enough for a test: every CPU section at toy lengths, no accuracy section
TINY_BENCH = [
    "bench", "--quick", "--device", "cpu", "--sizes", "64,256", "--long-n", "256",
    "--flops-n", "256", "--generation-contexts", "32,128", "--generation-tokens", "2",
    "--repeats", "1", "--no-accuracy",
]  # fmt: skip


def _metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def test_bench_sections_write_metrics_and_plots(tmp_path):
    device = bench.torch.device("cpu")
    report = Report(tmp_path, title="t")
    bench.bench_causal(report, [64, 256], device, repeats=1)
    bench.bench_memory(report, device, sizes=(256, 1024))
    bench.bench_noncausal(report, 256, device, repeats=1)
    bench.bench_causal_clustered(report, 256, device, repeats=1)
    bench.bench_generation(report, [32, 128], device, tokens=2)
    bench.bench_flops_efficiency(report, 256, device, repeats=1)
    report.write()
    metrics = _metrics(tmp_path)
    for key in (
        "causal_linear_fwdbwd_speedup_vs_sdpa_n256",
        "linear_fwd_speedup_vs_sdpa_n256",
        "improved_clustered_fwd_speedup_vs_sdpa_n256",
        "causal_improved_clustered_fwd_speedup_vs_sdpa_n256",
        "causal_clustered_fwd_speedup_vs_sdpa_n256",
        "causal_linear_peak_memory_ratio_n1024_over_n256",
        "generation_ms_per_token_ratio_ctx128_over_ctx32",
        "generation_speedup_vs_sdpa_kvcache_ctx128",
        "causal_linear_flops_efficiency",
    ):
        assert key in metrics and metrics[key] > 0, key
    # O(N) memory: 4x the length, at most ~4.4x the peak
    assert metrics["causal_linear_peak_memory_ratio_n1024_over_n256"] <= 4.4
    # kept for the backward beyond q, k, v: the fp32 output and normalizer only, no features
    out_and_den = 8 * 1024 * (64 + 1) * 4 / 2**20
    assert metrics["causal_linear_saved_for_backward_mb_n1024"] == pytest.approx(out_and_den)
    assert (tmp_path / "causal_fwdbwd_time.png").is_file()
    assert (tmp_path / "generation_ms_per_token.png").is_file()
    assert bench.check_targets({"linear_fwd_speedup_vs_sdpa_n16384": 2.0})
    # GPU targets: the old kernel's H200 figures miss them, 1.2x over SDPA and 0.7x fla meet them
    assert len(bench.check_targets({"gpu_causal_linear_speedup_vs_sdpa_n8192": 0.08})) == 1
    met = {"gpu_causal_linear_speedup_vs_sdpa_n8192": 1.2,
           "gpu_causal_linear_speedup_vs_fla_n32768": 0.7}  # fmt: skip
    assert bench.check_targets(met) == []
    # issue 28's accuracy targets: today's 0.427 / 0.299 miss them
    missed = bench.check_targets({"clustered_rel_error_structured_n4096": 0.427,
                                  "improved_clustered_rel_error_structured_n4096": 0.299})  # fmt: skip
    assert len(missed) == 2


def test_cli_rejects_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["nonsense"])
    assert exit_.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--attentions", "sofmax"], r"attentions=.*'sofmax'.*must be one of"),
        (["demo", "--attentions", "linear,linear"], "names a value twice"),
        (["demo", "--checkpoint-every", "-1"], r"checkpoint_every=-1 must be an int >= 0"),
        (["demo", "--steps", "1"], r"steps=1 must be an int >= 2"),
        (["demo", "--contexts", "1024,128"], "increasing"),
        (["bench", "--threads", "0"], "argument --threads: 0 must be >= 1"),
        (["bench", "--qkv", "missing.pt"], "is not a file"),
        (["bench", "--out", "FILE"], "is a file"),
        (["demo", "--device", "gpu"], "gpu"),
        (["demo", "--resume", "--overwrite"], "exclude each other"),
    ],
)
def test_bad_options_are_usage_errors_before_any_work(argv, message, tmp_path, capsys):
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a) if a == "FILE" else a for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "run.json").exists()  # nothing was started


def test_demo_never_deletes_files_it_did_not_create(tmp_path, capsys):
    # issue 21, probe 1: the old demo wiped OUT/logs and OUT/checkpoints of any folder
    out = tmp_path / "d"
    (out / "logs").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    (out / "logs" / "notes.txt").write_text("x")
    (out / "checkpoints" / "my_model.pt").write_text("x")
    assert main([*TINY, "--steps", "2", "--out", str(out)]) == 2
    assert "not a verger run" in capsys.readouterr().err
    assert main([*TINY, "--steps", "2", "--overwrite", "--out", str(out)]) == 2
    assert (out / "logs" / "notes.txt").read_text() == "x"
    assert (out / "checkpoints" / "my_model.pt").read_text() == "x"
    # --overwrite of a real run removes what that run created, and nothing else
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "2", "--out", str(run)]) == 0
    (run / "mine.txt").write_text("keep")
    assert main([*TINY, "--steps", "3", "--overwrite", "--out", str(run)]) == 0
    assert (run / "mine.txt").read_text() == "keep"
    assert json.loads((run / "run.json").read_text())["settings"]["steps"] == 3


def test_finished_run_is_reported_not_rerun(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--steps", "2", "--out", str(out)]) == 0
    before = (out / "metrics.json").read_bytes()
    mtime = (out / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*TINY, "--steps", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "already finished" in captured.err
    assert captured.out.strip().splitlines()[-1] == f"wrote {out / 'metrics.json'}"
    assert (out / "metrics.json").read_bytes() == before
    assert (out / "metrics.json").stat().st_mtime_ns == mtime


def test_demo_refuses_to_resume_other_settings_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    # an unfinished run: a killed one leaves run.json with status "running"
    assert main([*TINY, "--steps", "2", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    record["status"] = "running"
    (out / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main([*TINY, "--steps", "3", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error" in line]) == 1
    assert "steps: 2 (recorded) -> 3 (now)" in err[-1]
    assert "--overwrite" in err[-1]


def test_second_concurrent_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = FileLock(out / ".run.lock")  # another run holding the folder
    assert holder.acquire(blocking=False)
    try:
        assert main([*TINY, "--steps", "2", "--out", str(out)]) == 2
    finally:
        holder.release()
    assert "in use by" in capsys.readouterr().err
    assert not (out / "run.json").exists()


def test_corrupt_run_json_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{not json")
    assert main([*TINY, "--steps", "2", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "Traceback" not in err
    assert (out / "run.json").read_text() == "{not json"  # nothing deleted


def test_truncated_checkpoint_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--steps", "4", "--checkpoint-every", "2", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    record["status"] = "running"  # as if killed after its last checkpoint
    (out / "run.json").write_text(json.dumps(record))
    states = sorted((out / "checkpoints" / "linear").rglob("*.pt"))
    assert states
    for state in states:
        state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    assert main([*args, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # the error, and the hint to use --debug


class _Killed(Exception):
    """Stands for the process dying mid-run."""


def _losses(out):
    from verger.fast_attention.demo import _step_records

    return [
        (r["step"], r["loss"]) for r in _step_records(out / "logs" / "linear" / "metrics.jsonl")
    ]


def test_demo_resumes_exactly_after_an_interruption(tmp_path, monkeypatch):
    from verger.core.train import TrainLoop

    args = [*TINY, "--steps", "5", "--checkpoint-every", "2"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    real_step = TrainLoop.train_step

    def dies_after_step_3(self, micro):
        if self.step == 3:  # the last checkpoint is step 2: step 3 is redone on resume
            raise _Killed("killed")
        return real_step(self, micro)

    monkeypatch.setattr(TrainLoop, "train_step", dies_after_step_3)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 1
    monkeypatch.undo()
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert main([*args, "--resume", "--out", str(tmp_path / "cut")]) == 0

    whole, cut = _metrics(tmp_path / "whole"), _metrics(tmp_path / "cut")
    assert cut["val_loss_linear"] == whole["val_loss_linear"]  # bit for bit on CPU
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")
    assert [s for s, _ in _losses(tmp_path / "cut")] == [1, 2, 3, 4, 5]


def test_device_is_honoured_and_named(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main([*TINY_BENCH, "--threads", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {out / 'metrics.json'}"
    metrics = _metrics(out)
    assert metrics["device"] == "cpu" and "(cpu)" in metrics["machine"]
    assert metrics["threads"] == 1
    assert "causal_linear_fwdbwd_speedup_vs_sdpa_n256" in metrics
    assert json.loads((out / "run.json").read_text())["devices"] == ["cpu"]
    assert main([*TINY, "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "d")]) == 0
    assert _metrics(tmp_path / "d")["device"] == "cpu"


@pytest.mark.slow
def test_demo_quick_runs(tmp_path):
    assert main(["demo", "--quick", "--steps", "3", "--out", str(tmp_path)]) == 0
    metrics = _metrics(tmp_path)
    assert {"val_loss_softmax", "val_loss_linear", "val_loss_improved_clustered"} <= set(metrics)
    assert (tmp_path / "model_qkv.pt").is_file()
