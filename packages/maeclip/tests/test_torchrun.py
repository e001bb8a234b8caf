"""``train`` under torchrun: rank 0 owns the run folder, the other ranks follow its verdict."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _pairs(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    with (folder / "pairs.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filepath", "title"])
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                folder / f"{i}.png"
            )
            writer.writerow([f"{i}.png", f"noise picture {i}"])
    return folder / "pairs.csv"


def _torchrun(*argv: str) -> subprocess.CompletedProcess[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*launcher, "--nproc_per_node", "2", "-m", "verger.maeclip", "train", *argv],
        capture_output=True,
        text=True,
        timeout=300,  # a rank left waiting for rank 0 would hang far longer
        check=False,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_train_under_torchrun_one_run_folder_for_all_ranks(tmp_path):
    out = tmp_path / "run"
    argv = [
        "--data",
        f"csv:{_pairs(tmp_path)}",
        "--model",
        "maeclip-micro",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    first = _torchrun(*argv)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count(f"wrote {out / 'metrics.json'}") == 1  # rank 0 alone reports
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["devices"] == ["cpu"]
    # finished: rank 0 reports it and releases the other rank, which would otherwise wait
    again = _torchrun(*argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stderr
    # other settings: rank 0 refuses the folder (exit 2) and every rank ends
    other = _torchrun(*argv, "--lr", "0.01")
    assert other.returncode != 0
    assert "lr: 0.001 (recorded) -> 0.01 (now)" in other.stderr
