"""The command line end to end on tiny settings: sweep -> fit -> plan, resume rules, usage
errors, and the quick demo / bench (slow)."""

from __future__ import annotations

import json

import pytest

from verger.qat_scaling.__main__ import main

TINY = [
    "--sizes", "xxs", "--bits", "4", "--fractions", "0.25,0.5,0.75", "--tokens", "512,1024,1536",
    "--seq-len", "16", "--batch-size", "4", "--domains", "code,docs",
    "--max-bytes-per-domain", "100000", "--warmup-steps", "2", "--qat-warmup-steps", "2",
    "--workers", "1",
]  # fmt: skip


def _exit_code(argv) -> int:
    """``main``'s return value, or the code of the SystemExit a usage error raises."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def _last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_sweep_fit_plan_chain(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(["sweep", "--device", "cpu", "--out", str(sweep), *TINY]) == 0
    assert _last_line(capsys) == f"wrote {sweep / 'metrics.json'}"
    metrics = json.loads((sweep / "metrics.json").read_text())
    assert metrics["sweep_runs"] == metrics["sweep_runs_trained"] == 12
    assert 0 < metrics["sweep_fp_prefix_compute_saving"] < 1
    records = [json.loads(line) for line in (sweep / "runs.jsonl").read_text().splitlines()]
    assert len(records) == 12
    created = json.loads((sweep / "run.json").read_text())["created"]
    assert {"runs.jsonl", "sweep.json", "trunks", "metrics.json"} <= set(created)
    assert main(["sweep", "--device", "cpu", "--out", str(sweep), *TINY]) == 0  # finished: kept

    fit = tmp_path / "fit"
    args = ["fit", "--records", str(sweep / "runs.jsonl"), "--bootstrap", "3", "--starts", "2"]
    assert main([*args, "--no-leave-one-out", "--out", str(fit)]) == 0
    law = json.loads((fit / "law.json").read_text())
    assert law["n_points"] == 12 and not law["free"]["alpha"]  # one size: alpha is not fitted
    fitted = json.loads((fit / "metrics.json").read_text())
    assert fitted["law_records"] == 12 and fitted["law_train_rmse"] < 0.2
    assert (fit / "optimal_fraction.png").is_file()

    plan = tmp_path / "plan"
    budget = ["--memory-bytes", "4000", "--tokens", "5000", "--bits", "2,4,8"]
    assert main(["plan", "--law", str(fit / "law.json"), *budget, "--out", str(plan)]) == 0
    answer = json.loads((plan / "plan.json").read_text())
    assert answer["best"]["bits"] in (2, 4, 8) and 0 < answer["best"]["qat_fraction"] < 1
    assert {c["bits"] for c in answer["candidates"]} == {2, 4, 8}
    shown = json.loads((plan / "metrics.json").read_text())
    assert shown["plan_bits"] == str(answer["best"]["bits"])
    assert (plan / "loss_surface.png").is_file()


def test_a_run_folder_with_other_settings_is_refused_without_a_traceback(tmp_path, capsys):
    out = tmp_path / "s"
    tiny = [*TINY[:5], "0.5", *TINY[6:]]  # one fraction: quick
    assert main(["sweep", "--device", "cpu", "--out", str(out), *tiny]) == 0
    capsys.readouterr()
    assert (
        _exit_code(
            ["sweep", "--device", "cpu", "--out", str(out), *tiny, "--lr", "0.01", "--resume"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "lr" in err and "Traceback" not in err


def test_an_interrupted_sweep_resumes_only_when_asked_and_keeps_foreign_files(
    tmp_path, capsys, monkeypatch
):
    import verger.qat_scaling.sweep as sweep_module

    out = tmp_path / "s"
    tiny = [*TINY[:5], "0.5", TINY[6], "512,1024", *TINY[8:]]  # 4 runs
    argv = ["sweep", "--device", "cpu", "--out", str(out), *tiny]
    original, calls = sweep_module.train_branch, {"n": 0}

    def failing(**kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the machine went away")
        return original(**kwargs)

    monkeypatch.setattr(sweep_module, "train_branch", failing)
    assert _exit_code(argv) == 1
    assert "the machine went away" in capsys.readouterr().err
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2  # the finished runs
    (out / "notes.txt").write_text("mine")  # a user's file in the run folder

    assert _exit_code(argv) == 2  # unfinished: continues only with --resume
    assert "--resume" in capsys.readouterr().err
    assert _exit_code([*argv, "--resume"]) == 0
    assert calls["n"] == 3 + 2  # only the failed run and the last one were trained again
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(records) == len({r["run_id"] for r in records}) == 4

    assert _exit_code([*argv, "--overwrite"]) == 0  # deletes only what the run created
    assert (out / "notes.txt").read_text() == "mine"
    assert len((out / "runs.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize(
    "argv,code,text",
    [
        (["fit", "--out", "{tmp}/f"], 1, "give --records"),
        (["fit", "--records", "{tmp}/missing.jsonl", "--out", "{tmp}/f"], 1, "does not exist"),
        (["plan", "--out", "{tmp}/p"], 1, "exactly one of --law"),
        (["plan", "--law", "{tmp}/nope.json", "--out", "{tmp}/p"], 1, "does not exist"),
        (["sweep", "--bits", "5", "--out", "{tmp}/s"], 2, "bits"),
        (["sweep", "--fractions", "1.5", "--out", "{tmp}/s"], 2, "fractions"),
        (["sweep", "--sizes", "huge", "--out", "{tmp}/s"], 2, "sizes"),
        (["plan", "--confidence", "2", "--out", "{tmp}/p"], 2, "confidence"),
        (["bench", "--bits", "2", "--out", "{tmp}/b"], 2, "bits must include 4"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, code, text):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert _exit_code([*argv, "--device", "cpu"]) == code
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["demo_runs"] == 14 and "plan_bits" in metrics
    report = (out / "report.md").read_text()
    assert "optimal_fraction.png" in report and "loss_surface.png" in report


@pytest.mark.slow
def test_bench_quick(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "fake_quant_step_time_ratio", "packed_weight_bytes_ratio_4bit",
        "qat_4bit_val_loss_ratio_vs_fp", "fused_vs_unfused_val_loss_ratio_4bit",
        "optimal_fraction_grid_error", "law_heldout_rmse", "sweep_fp_prefix_compute_saving",
    ):  # fmt: skip
        assert key in metrics, key
    # quick or not, the bench packs 'l' (README: 0.134); the per-size table is in the report
    assert 0.125 < metrics["packed_weight_bytes_ratio_4bit"] < 0.14
    assert "4-bit storage by model size" in (out / "report.md").read_text()


def test_bench_grids_share_trunks_and_hold_out_the_largest_budget():
    from verger.qat_scaling.bench import BenchSettings, bench_grids

    settings = BenchSettings()
    law, fusion = bench_grids(settings, seed=3)
    assert law.fused == (False,) and law.fp_baselines and law.tokens == settings.tokens
    assert fusion.fused == (True,) and fusion.bits == (4,) and not fusion.fp_baselines
    assert fusion.tokens == (max(settings.tokens),) and len(settings.tokens) >= 4
    assert law.seeds == fusion.seeds == (3, 4)
    assert law.settings() == fusion.settings()  # one folder: the runs share their FP trunks
    ids = {r.run_id for r in law.runs()} | {r.run_id for r in fusion.runs()}
    assert len(ids) == len(law.runs()) + len(fusion.runs())
    (only,) = bench_grids(BenchSettings(schedule="unfused"), seed=0)
    assert only.fused == (False,)


@pytest.mark.parametrize("size", ["s", "l"])
def test_packed_sizes_closed_form(size):
    # per-channel fp32 scales: 4 bits per weight plus 32 bits per output row
    from torch import nn

    from verger.qat_scaling.bench import BenchSettings, packed_sizes
    from verger.qat_scaling.models import build_model

    model = build_model(size, vocab_size=257, seq_len=32, seed=0)
    shapes = [m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]  # fmt: skip
    weights = sum(o * i for o, i in shapes)
    expected = (weights * 4 / 8 + sum(o for o, _ in shapes) * 4) / (weights * 4)
    assert packed_sizes(BenchSettings(), size)["ratio"] == pytest.approx(expected)
