"""``python -m verger.core demo``: a tiny TransformerLM trains on the embedded corpus."""

from __future__ import annotations

import json

import pytest

from verger.core.__main__ import main

SMALL = [
    "--domains", "docs,code", "--steps", "6", "--vocab-size", "320", "--seq-len", "32",
    "--batch-size", "4", "--max-bytes-per-domain", "40000", "--d-model", "32", "--val-batches", "2",
]  # fmt: skip


def test_demo_trains_and_reports_per_domain_validation_loss(tmp_path, capsys) -> None:
    pytest.importorskip("tokenizers")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--data-dir", str(tmp_path / "data"), *SMALL]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {out / 'metrics.json'}"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "val_loss_docs",
        "val_loss_code",
        "val_loss_initial_docs",
        "val_loss_mean",
        "train_loss_final",
        "tokens_trained",
        "model_parameters",
        "tokenizer_vocab_size",
    ):
        assert key in metrics, key
    assert metrics["domains"] == 2 and metrics["tokenizer_vocab_size"] <= 320
    assert metrics["val_loss_mean"] < metrics["val_loss_mean_initial"]  # it learned something
    assert (out / "val_loss_by_domain.png").stat().st_size > 0
    assert "Validation loss by domain" in (out / "report.md").read_text()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["devices"] == ["cpu"]
    assert set(record["created"]) >= {"logs", "checkpoints", "metrics.json", "train_loss.png"}


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--device", "tpu", "is not a device"),
        ("--device", "cuda:99", "CUDA"),  # no machine has 100 GPUs, and most here have none
        ("--seed", "-1", "must be in [0, 2**63)"),
        ("--seed", "one", "is not an int"),
        ("--steps", "0", "steps=0 must be an int >= 1"),
        ("--vocab-size", "100", "vocab_size=100 must be an int >= 257"),
    ],
)
def test_bad_options_are_usage_errors(option, value, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", option, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path, capsys) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(a_file)])
    assert exit_info.value.code == 2
    assert "is a file" in capsys.readouterr().err
    assert a_file.read_text() == "x"  # untouched
