"""The command line on the package contract: settings, run folders, clear errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from verger.core.files import FileLock
from verger.maeclip.__main__ import main

MICRO = [
    "--model",
    "maeclip-micro",
    "--decoder-width",
    "32",
    "--batch-size",
    "32",
    "--data",
    "mnist",
]

BENCH_KEYS = {
    "zero_shot_acc_clip",
    "zero_shot_acc_maeclip",
    "linear_probe_acc_clip",
    "linear_probe_acc_maeclip",
    "linear_probe_acc_mae",
    "throughput_ratio_maeclip_vs_clip",
    "throughput_ratio_maeclip_masked_vs_clip",
    "throughput_ratio_flip_vs_clip",
}


def _last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_bench_writes_the_contract_keys(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--quick", "--steps", "3", "--device", "cpu", "--out", str(out), *MICRO]
    assert main(argv) == 0
    assert _last_line(capsys) == f"wrote {out / 'metrics.json'}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= BENCH_KEYS
    for key in BENCH_KEYS:
        assert np.isfinite(metrics[key]) and metrics[key] > 0, key
    assert 0 <= metrics["zero_shot_acc_clip"] <= 1
    assert (out / "throughput.png").stat().st_size > 1000
    assert "| maeclip |" in (out / "report.md").read_text()
    record = json.loads((out / "run.json").read_text())
    assert record["devices"] == ["cpu"] and record["status"] == "finished"
    assert record["settings"]["methods"] == ["clip", "mae", "maeclip"]  # the quick preset
    # each method logged every step and left its final checkpoint under methods/<name>
    for name in ("clip", "mae", "maeclip"):
        lines = (out / "methods" / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
        assert (out / "methods" / name / "checkpoints" / "step-00000003").is_dir()


@pytest.mark.slow
def test_demo_writes_table_curves_and_retrieval_grid(tmp_path):
    assert main(["demo", "--quick", "--steps", "3", "--out", str(tmp_path), *MICRO]) == 0
    for name in ("metrics.json", "report.md", "loss_curves.png", "retrieval_grid.png"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"zero_shot_acc_clip", "linear_probe_acc_mae", "final_mae_loss_maeclip"} <= set(metrics)


def _csv_pairs(folder: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    with (folder / "pairs.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filepath", "title"])
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                folder / f"{i}.png"
            )
            writer.writerow([f"{i}.png", f"noise picture {i}"])
    return folder / "pairs.csv"


def _csv_train(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        f"csv:{data}",
        "--model",
        "maeclip-micro",
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--checkpoint-every",
        "1",
        "--log-every",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def test_train_on_a_csv_folder_resumes_an_interrupted_run_exactly(tmp_path, capsys):
    out = tmp_path / "run"
    argv = _csv_train(_csv_pairs(tmp_path), out)
    assert main(argv) == 0
    straight = json.loads((out / "metrics.json").read_text())
    assert straight["final_step"] == 3 and np.isfinite(straight["final_clip_loss"])
    assert (out / "checkpoints" / "step-00000003" / "model.safetensors").is_file()
    # as if killed after step 2: the run is unfinished and its last checkpoint is step 2
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    (out / "checkpoints" / "latest").write_text("step-00000002\n")
    (out / "metrics.json").unlink()
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**record, "status": "running"}))
    capsys.readouterr()
    assert main(argv) == 2  # an unfinished run continues only when asked
    assert "pass --resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    for key in ("final_step", "final_loss", "final_clip_loss", "final_mae_loss"):
        assert resumed[key] == straight[key], key  # bit for bit
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 3 ran twice, logged once


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished 2-step micro `train` run on MNIST (a folder the tests only read)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    argv = ["train", "--steps", "2", "--checkpoint-every", "1", "--out", str(out), *MICRO]
    assert main(argv) == 0
    return out, argv


@pytest.mark.parametrize(
    "change,listed",
    [
        (["--method", "clip"], "method: 'maeclip' (recorded) -> 'clip' (now)"),
        (["--lr", "0.002"], "lr: 0.001 (recorded) -> 0.002 (now)"),
        (["--decoder-width", "64"], "decoder_width: 32 (recorded) -> 64 (now)"),  # model size
    ],
)
@pytest.mark.parametrize("resume", [False, True])
def test_a_run_folder_is_not_continued_with_other_settings(
    finished_run, capsys, change, listed, resume
):
    out, argv = finished_run
    before = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main([*argv, *change, *(["--resume"] if resume else [])]) == 2
    err = capsys.readouterr().err
    assert listed in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert (out / "metrics.json").read_bytes() == before


def test_a_finished_run_is_reported_not_rerun(finished_run, capsys):
    out, argv = finished_run
    before = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main(argv) == 0
    assert _last_line(capsys) == f"wrote {out / 'metrics.json'}"
    assert (out / "metrics.json").read_bytes() == before


def test_a_second_run_into_a_busy_folder_is_refused_at_once(finished_run, capsys):
    out, argv = finished_run
    lock = FileLock(out / ".run.lock")  # what a running `train` holds
    assert lock.acquire(blocking=False)
    try:
        capsys.readouterr()
        assert main([*argv, "--overwrite"]) == 2
    finally:
        lock.release()
    assert f"in use by process {os.getpid()}" in capsys.readouterr().err
    assert (out / "checkpoints" / "step-00000002").is_dir()  # nothing was overwritten


def _fails_cleanly(argv: list[str], capsys, message: str) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[0].startswith("python -m verger.maeclip train: error:")
    return err


def test_a_csv_that_is_not_text_or_lacks_the_columns_is_named(tmp_path, capsys):
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(bytes(range(256)) * 4)
    _fails_cleanly(_csv_train(garbage, tmp_path / "a"), capsys, "garbage.csv is not UTF-8 text")
    columns = tmp_path / "columns.csv"
    columns.write_text("path,caption\n0.png,a cat\n")
    _fails_cleanly(_csv_train(columns, tmp_path / "b"), capsys, "image_key='filepath' is not")


def test_missing_and_corrupt_images_stop_the_run_before_training(tmp_path, capsys):
    data = _csv_pairs(tmp_path)
    (tmp_path / "3.png").unlink()
    (tmp_path / "5.png").write_bytes((tmp_path / "5.png").read_bytes()[:60])  # truncated
    out = tmp_path / "run"
    err = _fails_cleanly(_csv_train(data, out), capsys, "2 of 8 images cannot be read")
    assert "row 3" in err and "(missing)" in err and "row 5" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_a_batch_larger_than_the_data_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--quick", "--batch-size", "100000", "--data", "mnist", "--out", str(out)]
    _fails_cleanly(argv, capsys, "batch_size=100000 is larger than the dataset (4000 pairs)")
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compare", "--methods", "nope"], "methods='nope' must be one of"),
        (["compare", "--methods", "clip,clip"], "names a method twice"),
        (["compare", "--mask-ratio", "1.0"], "mask_ratio=1.0"),
        (["compare", "--mask-ratio", "0"], "MAE needs hidden patches"),
        (["compare", "--mae-weight", "nan"], "mae_weight=nan"),
        (["compare", "--steps", "0"], "steps=0 must be an int >= 1"),
        (["compare", "--batch-size", "1"], "batch_size=1"),
        (["compare", "--model", "ViT-Nope-1"], "not an open_clip config"),
        (["compare", "--model", "RN50"], "not a ViT"),
        (["compare", "--data", "nope"], "must be mnist or emoji"),
        (["demo", "--data", "csv:pairs.csv"], "must be mnist or emoji"),
        (["bench", "--repeats", "0"], "repeats=0"),
        (["train", "--data", "csv:/nonexistent/pairs.csv"], "is not a file"),
        (["train", "--data", "wds:/nonexistent/*.tar"], "no shard matches"),
        (["train", "--checkpoint-every", "-1"], "checkpoint_every=-1"),
        (["train", "--method", "flip"], "method='flip' must be one of"),
        (["train", "--device", "tpu"], "--device"),
    ],
)
def test_cli_bad_options_are_usage_errors_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()  # nothing was written: refused before any work


def test_a_folder_that_is_not_a_run_is_left_alone(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "my_model.pt").write_text("x")
    assert main(["train", "--steps", "2", "--out", str(out), *MICRO]) == 2
    assert "holds no run.json" in capsys.readouterr().err
    assert (out / "checkpoints" / "my_model.pt").read_text() == "x"


def test_dry_run_resolves_the_quick_preset_and_the_device(tmp_path, capsys):
    argv = ["bench", "--quick", "--device", "cpu", "--dry-run", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["device"] == "cpu"
    assert shown["settings"]["steps"] == 60 and shown["settings"]["repeats"] == 3
    assert shown["settings"]["methods"] == ["clip", "mae", "maeclip"]
