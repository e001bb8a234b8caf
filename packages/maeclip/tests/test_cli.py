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


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["compare", "--methods", "nope", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="mask_ratio"):
        main(["compare", "--mask-ratio", "1.0", "--out", str(tmp_path), *MICRO])
