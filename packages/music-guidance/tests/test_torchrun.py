"""``train`` under torchrun through the CLI: rank 0 owns the run folder, the ranks stay equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from verger.core.distributed import free_port

TINY = [
    "--steps", "3", "--batch-size", "2", "--pieces-per-collection", "2",
    "--seconds-per-piece", "2.2", "--checkpoint-every", "2", "--threads", "1",
]  # fmt: skip


def _torchrun(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
    ]  # fmt: skip
    command = [*launcher, "-m", "verger.music_guidance", "train", "--quick", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_train_under_torchrun_writes_one_run_with_equal_ranks(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["--out", str(out), "--device", "cpu", "--cache-dir", str(cache), *TINY]
    done = _torchrun(*argv)
    assert done.returncode == 0, done.stderr[-3000:]
    wrote = [line for line in done.stdout.splitlines() if line.startswith("wrote ")]
    assert wrote == [f"wrote {out / 'metrics.json'}"]  # rank 0 alone reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["ranks_identical"] == 1  # DDP kept model and EMA weights equal on both ranks
    assert metrics["train_steps"] == 3
    assert (out / "model" / "model.safetensors").is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and {"model", "checkpoints"} <= set(record["created"])
    # a second launch with other settings is refused by rank 0; the folder keeps the first run
    refused = _torchrun(*argv, "--lr", "0.01")
    assert refused.returncode != 0
    assert "lr: 0.002 (recorded) -> 0.01 (now)" in refused.stderr
    assert json.loads((out / "metrics.json").read_text()) == metrics
