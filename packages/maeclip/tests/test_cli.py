from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

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


def test_bench_writes_the_contract_keys(tmp_path):
    main(["bench", "--quick", "--steps", "3", "--skip-gpu-vit", "--out", str(tmp_path), *MICRO])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) >= BENCH_KEYS
    for key in BENCH_KEYS:
        assert np.isfinite(metrics[key]) and metrics[key] > 0, key
    assert 0 <= metrics["zero_shot_acc_clip"] <= 1
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    assert "| maeclip |" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_demo_writes_table_curves_and_retrieval_grid(tmp_path):
    main(["demo", "--quick", "--steps", "3", "--out", str(tmp_path), *MICRO])
    for name in ("metrics.json", "report.md", "loss_curves.png", "retrieval_grid.png"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"zero_shot_acc_clip", "linear_probe_acc_mae", "final_mae_loss_maeclip"} <= set(metrics)


def test_train_command_on_a_csv_folder_checkpoints_and_resumes(tmp_path):
    rng = np.random.default_rng(0)
    with (tmp_path / "pairs.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filepath", "title"])
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / f"{i}.png"
            )
            writer.writerow([f"{i}.png", f"noise picture {i}"])
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        f"csv:{tmp_path / 'pairs.csv'}",
        "--model",
        "maeclip-micro",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--checkpoint-every",
        "1",
        "--out",
        str(out),
    ]
    main(args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_step"] == 2 and np.isfinite(metrics["final_clip_loss"])
    assert (out / "checkpoints" / "step-00000002" / "model.safetensors").is_file()
    main([*args[:-4], "--steps", "3", "--checkpoint-every", "1", "--out", str(out)])
    assert json.loads((out / "metrics.json").read_text())["final_step"] == 3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 0  # log_every 10 > steps


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compare", "--methods", "nope"], "invalid choice"),
        (["compare", "--mask-ratio", "1.0"], "mask_ratio=1.0"),
        (["compare", "--mask-ratio", "0"], "MAE needs hidden patches"),
        (["compare", "--mae-weight", "nan"], "mae_weight=nan"),
        (["compare", "--steps", "0"], "--steps 0"),  # was read as "the default": 400 steps
        (["compare", "--batch-size", "1"], "batch_size=1"),
        (["compare", "--model", "ViT-Nope-1"], "not an open_clip config"),
        (["compare", "--model", "RN50"], "not a ViT"),
        (["compare", "--data", "nope"], "must be mnist or emoji"),
        (["train", "--data", "csv:/nonexistent/pairs.csv"], "is not a file"),
        (["train", "--data", "wds:/nonexistent/*.tar"], "no shard matches"),
        (["train", "--checkpoint-every", "-1"], "checkpoint_every=-1"),
    ],
)
def test_cli_bad_options_are_usage_errors_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(out)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was written: refused before any work


def test_cli_train_refuses_a_complete_run_and_a_restart_beside_old_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    from verger.core.train import Checkpointer

    Checkpointer(out / "checkpoints").save(3)  # a finished 3-step run
    base = ["train", "--model", "maeclip-micro", "--data", "mnist", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--steps", "3"])
    assert exit_info.value.code == 2 and "already reaches steps=3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--steps", "5", "--no-resume"])
    assert exit_info.value.code == 2 and "earlier run" in capsys.readouterr().err
