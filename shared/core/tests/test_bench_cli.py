"""``python -m verger.core demo``: a tiny TransformerLM trains on the embedded corpus."""

from __future__ import annotations

import json

import pytest

from verger.core.__main__ import main


def test_demo_trains_and_reports_per_domain_validation_loss(tmp_path) -> None:
    pytest.importorskip("tokenizers")
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--data-dir",
        str(tmp_path / "data"),
        "--domains",
        "docs,code",
        "--steps",
        "6",
        "--vocab-size",
        "320",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-bytes-per-domain",
        "40000",
    ]
    assert main(args) == 0
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
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0", "--out", str(out)])


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--device", "tpu", "is not a device"),
        ("--device", "cuda:99", "CUDA"),  # no machine has 100 GPUs, and most here have none
        ("--seed", "-1", "must be in [0, 2**63)"),
        ("--seed", "one", "is not an int"),
    ],
)
def test_shared_options_refuse_bad_values_as_usage_errors(option, value, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and message in err


def test_out_must_be_a_folder(tmp_path, capsys) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(a_file)])
    assert exit_info.value.code == 2
    assert "is a file" in capsys.readouterr().err
    assert a_file.read_text() == "x"  # untouched


def test_shared_options_keep_what_was_given(tmp_path) -> None:
    from verger.core.__main__ import build_parser

    args = build_parser().parse_args(["bench", "--device", "cpu", "--seed", "7", "--out", "x"])
    assert (args.device, args.seed, str(args.out)) == ("cpu", 7, "x")
    assert build_parser().parse_args(["bench"]).device == "auto"


def test_positive_int_takes_counts_and_refuses_the_rest() -> None:
    import argparse

    from verger.core.bench import positive_int

    assert positive_int("3") == 3
    for text, message in (("0", "0 must be >= 1"), ("-2", "-2 must be >= 1"), ("2.5", "'2.5'")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            positive_int(text)
