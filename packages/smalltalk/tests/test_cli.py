"""The command line end to end on a tiny real-corpus mixture, and its error paths."""

from __future__ import annotations

import json

import pytest

from verger.smalltalk.__main__ import main

TINY = [
    "--device", "cpu", "--threads", "1",
    "--domains", "code,music", "--max-bytes-per-domain", "20000",
    "--seq-len", "32", "--prefix-len", "8", "--num-experts", "2",
    "--router-d-model", "8", "--router-heads", "2", "--router-mlp-hidden", "16",
    "--em-rounds", "2", "--em-steps-per-round", "3", "--em-sequences", "64",
    "--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--mlp-hidden", "32",
    "--expert-steps", "4", "--batch-size", "4", "--warmup-steps", "1", "--checkpoint-every", "2",
]  # fmt: skip


def _last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_the_step_commands_build_evaluate_and_use_a_mixture(tmp_path, capsys):
    m = tmp_path / "model"
    assert main(["train-routers", "--out", str(m), *TINY]) == 0
    assert _last_line(capsys) == f"wrote {m / 'metrics.json'}"
    routers = json.loads((m / "metrics.json").read_text())
    assert routers["em_rounds"] == 2 and routers["score_exchange_payload_bytes"] == 2 * 2 * 64 * 4
    assert main(["shard", "--out", str(m), "--device", "cpu"]) == 0
    assert _last_line(capsys) == f"wrote {m / 'shards' / 'metrics.json'}"
    for expert in ("0", "dense"):
        assert main(["train-expert", "--out", str(m), "--expert", expert, "--device", "cpu"]) == 0
    assert json.loads((m / "experts" / "dense" / "metrics.json").read_text())["steps"] == 8
    # expert 1 is not trained yet: eval says so in one line and fails
    assert main(["eval", "--out", str(m), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "expert 1's folder" in err and "train-expert --out" in err and "Traceback" not in err
    assert main(["train-expert", "--out", str(m), "--expert", "1", "--device", "cpu"]) == 0
    assert (
        main(["eval", "--out", str(m), "--device", "cpu", "--prefix-lens", "4,8,0", "--overwrite"])
        == 0
    )
    metrics = json.loads((m / "eval" / "metrics.json").read_text())
    for key in ("ppl_ratio_vs_dense", "ppl_ratio_vs_dense_prefix4", "ppl_ratio_vs_dense_prefix_full",
                "router_train_flops_fraction", "router_inference_flops_fraction",
                "routing_purity_by_domain", "expert_tokens_per_parameter"):  # fmt: skip
        assert key in metrics
    assert (m / "eval" / "ppl_by_prefix.png").is_file()
    assert (
        main(["generate", "--out", str(m), "--prompt", "def f(x):", "--max-new-tokens", "5"]) == 0
    )
    assert (m / "generate" / "samples.txt").read_text().startswith("[expert ")
    # a finished job is reported, not rerun
    before = (m / "experts" / "expert-00" / "model" / "model.safetensors").read_bytes()
    assert main(["train-expert", "--out", str(m), "--expert", "0"]) == 0
    assert (m / "experts" / "expert-00" / "model" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["train-expert", "--expert", "x"], "expert='x' must be an expert index"),
        (["train-routers", "--seq-len", "16", "--prefix-len", "32"], "longer than the sequence"),
        (["train-routers", "--num-experts", "1"], "num_experts=1 must be an int >= 2"),
        (["train-expert", "--zero-stage", "2"], "needs engine='deepspeed'"),
    ],
)
def test_usage_errors_exit_2_in_one_line(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "m")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_a_step_outside_a_model_folder_is_a_clear_failure(tmp_path, capsys):
    assert main(["shard", "--out", str(tmp_path / "nothing"), "--device", "cpu"]) == 1
    assert "not a SmallTalk model folder" in capsys.readouterr().err
