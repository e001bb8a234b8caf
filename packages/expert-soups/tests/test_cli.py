"""The command line end to end on tiny settings: train -> instantiate -> eval, the demo,
the Plan Early grid and planner, and the usage errors of bad budgets and bad h."""

import json

import pytest
import torch

from verger.core.nn import TransformerLM
from verger.expert_soups.__main__ import main
from verger.expert_soups.soup import SoupOfExperts

TINY_DATA = [
    "--device", "cpu", "--domains", "code,docs", "--max-bytes-per-domain", "30000",
    "--n-clusters", "4", "--fit-documents", "40", "--val-windows", "4",
]  # fmt: skip


def _code(args):
    """The exit code of ``main(args)`` (usage errors exit through argparse)."""
    try:
        return main(args)
    except SystemExit as exit_:
        return exit_.code


def _metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def _last_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_train_instantiate_eval(tmp_path, capsys):
    train = tmp_path / "train"
    args = ["train", "--quick", *TINY_DATA, "--out", str(train), "--steps", "6",
            "--warmup-steps", "1", "--n-experts", "2", "--max-support-size", "3",
            "--checkpoint-every", "3"]  # fmt: skip
    assert main(args) == 0
    assert _last_line(capsys) == f"wrote {train / 'metrics.json'}"
    metrics = _metrics(train)
    assert metrics["train_tokens"] == 6 * 32 * 64
    assert metrics["tokens_per_parameter"] == pytest.approx(
        6 * 32 * 64 / metrics["instantiated_parameters"]
    )
    soup = SoupOfExperts.load(train / "soup")
    assert (train / "generic" / "config.json").is_file()

    spec = tmp_path / "spec"
    assert main(["instantiate", "--soup", str(train), "--weights", "c00=0.25,c03=0.75",
                 "--repeats", "2", "--out", str(spec), "--device", "cpu"]) == 0  # fmt: skip
    exported = TransformerLM.from_pretrained(spec / "specialist")
    expected = soup.instantiate({"c00": 0.25, "c03": 0.75})
    ids = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, expected(ids).logits)
    assert _metrics(spec)["instantiate_ms"] > 0

    by_domain = tmp_path / "by-domain"
    assert main(["instantiate", "--quick", "--soup", str(train), "--domain", "code",
                 "--out", str(by_domain), "--device", "cpu"]) == 0  # fmt: skip
    weights = json.loads((by_domain / "specialist" / "domain_weights.json").read_text())
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-4)

    ev = tmp_path / "eval"
    assert main(["eval", "--quick", "--soup", str(train), "--n-mixtures", "1",
                 "--finetune-steps", "2", "--out", str(ev), "--device", "cpu"]) == 0  # fmt: skip
    assert 0.0 <= _metrics(ev)["specialist_win_rate_vs_generic"] <= 1.0


def test_bad_h_and_missing_soup_are_clear_errors(tmp_path, capsys):
    out = str(tmp_path / "x")
    both = ["--weights", "c00=1", "--sample-file", "s.txt"]
    assert _code(["instantiate", *both, "--out", out, "--device", "cpu"]) == 2
    assert "at most one of --weights, --sample-file" in capsys.readouterr().err
    assert main(["instantiate", "--soup", str(tmp_path), "--weights", "c00=1",
                 "--out", str(tmp_path / "y"), "--device", "cpu"]) == 1  # fmt: skip
    assert "must be the folder of a finished `train` run" in capsys.readouterr().err


def test_demo_quick_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--quick", *TINY_DATA, "--out", str(out), "--steps", "8",
            "--warmup-steps", "1", "--n-experts", "2", "--max-support-size", "3",
            "--n-mixtures", "1", "--sample-tokens", "512", "--finetune-steps", "2",
            "--timing-repeats", "1"]  # fmt: skip
    assert main(args) == 0
    assert _last_line(capsys) == f"wrote {out / 'metrics.json'}"
    metrics = _metrics(out)
    for key in ("instantiate_ms", "specialist_win_rate_vs_generic",
                "train_step_time_ratio_vs_generic", "tokens_per_parameter",
                "instantiate_time_ratio_vs_load", "weighted_sum_time_ratio_vs_reference"):  # fmt: skip
        assert key in metrics, key
    # one soup file against one specialist file per cluster: the files follow the counts
    per_model = metrics["storage_ratio_vs_specialists"] * metrics["clusters"]
    counts = metrics["soup_parameters"] / metrics["instantiated_parameters"]
    assert per_model == pytest.approx(counts, rel=0.1)
    assert metrics["tasks"] == 3  # code, docs, one mixture
    assert (out / "val_loss_per_task.png").is_file()
    run = json.loads((out / "run.json").read_text())
    assert {"clusters", "runs", "specialists", "metrics.json"} <= set(run["created"])
    assert main([*args[:1], *args[1:]]) == 0  # finished: reported, not rerun
    assert _metrics(out) == metrics


def test_plan_early_run_then_plan(tmp_path, capsys):
    grid = tmp_path / "grid"
    args = ["plan-early-run", "--quick", *TINY_DATA, "--out", str(grid), "--pretrain-steps", "4",
            "--warmup-steps", "1", "--targets", "code", "--sample-tokens", "256",
            "--methods", "slm,slm_is,slm_pn", "--finetune-steps", "2", "--pn-groups", "1"]  # fmt: skip
    assert main(args) == 0
    records = [json.loads(line) for line in (grid / "records.jsonl").open()]
    assert {r["method"] for r in records} == {"slm", "slm_is", "slm_pn"}
    assert "val_loss_specialized_slm" in _metrics(grid)
    assert "loss_ratio_is_vs_slm" in _metrics(grid)

    budgets = ["--pretrain-flops", "1e15", "--specialize-flops", "1e15",
               "--inference-params", "1000000", "--in-domain-tokens", "256"]  # fmt: skip
    plan = tmp_path / "plan"
    assert main(["plan-early-plan", "--records", str(grid), *budgets, "--out", str(plan)]) == 0
    ranked = _metrics(plan)["plan_best_method"]
    losses = {r["method"]: r["loss_specialized"] for r in records}
    assert ranked == min(losses, key=losses.get)
    assert (plan / "cost_vs_domains.png").is_file()
    assert (grid / "loss_vs_cost.png").is_file()
    # no budgets: derived from the records (the SLM's size fits, so a method is feasible)
    derived = tmp_path / "plan-derived"
    assert main(["plan-early-plan", "--records", str(grid), "--out", str(derived)]) == 0
    assert _metrics(derived)["plan_best_method"] in {"slm", "slm_is", "slm_pn"}


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--in-domain-tokens", "0"], "in_domain_tokens=0"),
        (["--pretrain-flops", "-1"], "pretrain_flops=-1"),
        (["--inference-params", "0"], "inference_params=0"),
    ],
)
def test_bad_budgets_are_usage_errors(tmp_path, capsys, bad, message):
    budgets = {"--pretrain-flops": "1e12", "--specialize-flops": "1e9",
               "--inference-params": "30000", "--in-domain-tokens": "4096"}  # fmt: skip
    budgets[bad[0]] = bad[1]
    flat = [x for kv in budgets.items() for x in kv]
    assert _code(["plan-early-plan", *flat, "--out", str(tmp_path / "p")]) == 2
    assert message in capsys.readouterr().err


def test_small_model_over_the_inference_budget_is_refused(tmp_path, capsys):
    budgets = ["--pretrain-flops", "1e12", "--specialize-flops", "1e9",
               "--inference-params", "1000", "--in-domain-tokens", "4096"]  # fmt: skip
    code = _code(["plan-early-demo", "--quick", *TINY_DATA, *budgets, "--out", str(tmp_path / "d")])
    assert code == 1
    assert "more than the inference budget" in capsys.readouterr().err
    code = _code(
        ["plan-early-demo", "--quick", "--pretrain-flops", "1e12", "--out", str(tmp_path / "e")]
    )
    assert code == 2  # a budget alone: all four or none
