"""The CLI: bad option values are usage errors (exit 2, a message naming the value)."""

import re

import pytest

import verger.sparse_diloco.__main__ as cli
from verger.sparse_diloco.__main__ import main
from verger.sparse_diloco.lm import LM_SIZES


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--workers", "0"], "num_workers=0 must be a positive int"),
        (["--inner-steps", "10", "--fragments", "3"], "must be a multiple of num_fragments=3"),
        (["--overlap", "1.5"], r"overlap=1.5 must be in \[0, 1\)"),
        (["--num-slices", "0"], "num_slices=0"),
        (["--rounds", "0"], "rounds=0 must be a positive int"),
        (["--warmup", "-1"], "inner_warmup=-1"),
        (["--outer-lr", "inf"], "outer_lr=inf must be a finite number"),
        (["--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
        (["--seq-len", "x"], "argument --seq-len: 'x' is not an int"),
        (["--size", "huge"], "--size: invalid choice: 'huge'"),
    ],
)
def test_bad_train_options_exit_2_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(out), *argv])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()  # nothing was trained or written


def test_size_choices_are_the_model_sizes():
    assert set(cli.LM_SIZES) == set(LM_SIZES)


def test_quick_keeps_inner_steps_a_multiple_of_the_fragments(monkeypatch):
    specs = []
    monkeypatch.setattr(cli, "_train", lambda spec, args: specs.append(spec) or 0)
    assert main(["train", "--quick", "--inner-steps", "40", "--fragments", "4"]) == 0
    (spec,) = specs
    assert spec.config.inner_steps == 8 and spec.config.num_fragments == 4
    assert spec.rounds == 3
