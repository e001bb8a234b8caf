"""The commands end to end on tiny settings, and the contract's exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trimesh

from verger.neural_parts.__main__ import main

TINY = [
    "--device",
    "cpu",
    "--threads",
    "1",
    "--feature-dim",
    "16",
    "--embedding-dim",
    "16",
    "--hidden",
    "16",
    "--projection-dim",
    "8",
    "--n-surface",
    "60",
    "--n-volume",
    "64",
    "--n-sphere",
    "30",
    "--n-input",
    "64",
    "--pool-surface",
    "600",
    "--pool-volume",
    "800",
    "--batch-size",
    "1",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("train") / "run"
    args = [
        "train",
        "--out",
        str(out),
        "--steps",
        "3",
        "--n-shapes",
        "2",
        "--cache-dir",
        cache,
        *TINY,
    ]
    assert main(args) == 0
    return out


def test_demo_writes_metrics_meshes_and_renders(tmp_path, cache, capsys):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--quick",
        "--out",
        str(out),
        "--steps",
        "3",
        "--n-train",
        "2",
        "--n-test",
        "2",
        "--eval-points",
        "200",
        "--subdivisions",
        "2",
        "--cache-dir",
        cache,
        *TINY,
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {out / 'metrics.json'}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["iou"] <= 1 and metrics["chamfer_l1"] > 0
    assert metrics["watertight_part_fraction"] == 1.0
    for name in ("heldout-0.ply", "heldout-0.obj", "heldout-1.ply"):
        assert (out / "meshes" / name).stat().st_size > 0
    assert (out / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
    ply = trimesh.load(out / "meshes" / "heldout-0.ply", process=False)
    assert len(ply.faces) == 5 * 320
    assert main(args) == 0  # finished: reported, not rerun
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_bench_reports_the_issue_keys(tmp_path, cache):
    out = tmp_path / "bench"
    args = [
        "bench",
        "--quick",
        "--out",
        str(out),
        "--steps",
        "2",
        "--n-train",
        "2",
        "--n-test",
        "1",
        "--eval-points",
        "200",
        "--subdivisions",
        "2",
        "--grid",
        "16",
        "--repeats",
        "1",
        "--part-counts",
        "2,5",
        "--no-embedded",
        "--cache-dir",
        cache,
        *TINY,
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "iou_5parts",
        "chamfer_l1_5parts",
        "superquadric_iou_5parts",
        "superquadric_chamfer_l1_5parts",
        "iou_by_parts_2",
        "iou_by_parts_5",
        "mesh_extraction_ms",
        "marching_cubes_ms",
        "mesh_extraction_speedup_vs_marching_cubes",
    ):
        assert key in metrics, key
    assert metrics["iou_by_parts_5"] == metrics["iou_5parts"]


def test_inference_commands_on_a_saved_model(trained, tmp_path, cache):
    model = str(trained / "model")
    assert (trained / "model" / "model.safetensors").is_file()
    box = trimesh.creation.box(extents=(1.0, 0.5, 0.3))
    box.export(tmp_path / "box.off")
    out = tmp_path / "rec"
    assert (
        main(
            [
                "reconstruct",
                "--model",
                model,
                "--inputs",
                str(tmp_path / "box.off"),
                "--out",
                str(out),
                "--subdivisions",
                "2",
                "--eval-points",
                "200",
                "--cache-dir",
                cache,
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["shapes"] == 1 and 0 <= metrics["iou"] <= 1
    assert (out / "meshes" / "box.ply").is_file()
    out = tmp_path / "exp"
    assert (
        main(
            [
                "export",
                "--model",
                model,
                "--n-shapes",
                "2",
                "--format",
                "obj",
                "--out",
                str(out),
                "--subdivisions",
                "1",
                "--cache-dir",
                cache,
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert json.loads((out / "metrics.json").read_text())["watertight_part_fraction"] == 1.0
    assert len(list((out / "meshes").glob("*.obj"))) == 2
    out = tmp_path / "ren"
    assert (
        main(
            [
                "render",
                "--model",
                model,
                "--n-shapes",
                "1",
                "--out",
                str(out),
                "--subdivisions",
                "1",
                "--cache-dir",
                cache,
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (out / "render.png").read_bytes()[:4] == b"\x89PNG"


def test_errors_are_one_line_with_the_contract_exit_codes(tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        main(["train", "--n-primitives", "0", "--out", str(tmp_path / "a")])
    assert usage.value.code == 2
    assert "n_primitives=0" in capsys.readouterr().err
    code = main(["render", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 1 and "holds no saved model" in err and "Traceback" not in err
    bad = tmp_path / "broken.ply"
    bad.write_bytes(b"ply\ngarbage")
    code = main(
        [
            "reconstruct",
            "--model",
            str(tmp_path / "nothing"),
            "--inputs",
            str(bad),
            "--out",
            str(tmp_path / "c"),
        ]
    )
    assert code == 1


def test_train_under_torchrun_shares_one_run_folder(tmp_path, cache):
    """2 gloo ranks on CPU: rank 0 owns --out (no per-rank folders), one `wrote` line,
    and DDP keeps the ranks' weights equal."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "verger.neural_parts",
        "train",
        "--quick",
        "--out",
        str(out),
        "--steps",
        "2",
        "--n-shapes",
        "2",
        "--cache-dir",
        cache,
        *TINY,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    wrote = [line for line in done.stdout.splitlines() if line.startswith("wrote ")]
    assert wrote == [f"wrote {out / 'metrics.json'}"], done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps_run"] == 2
    assert metrics["ranks_in_sync"] is True
    assert not (out / "ranks").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished"
    assert {"train", "model", "metrics.json"} <= set(record["created"])
    assert (out / "model" / "model.safetensors").is_file()
    assert len(list((out / "train" / "checkpoints").iterdir())) >= 1
