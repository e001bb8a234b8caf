"""The commands end to end on a tiny budget (a private cache), and the CLI contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from verger.music_guidance.__main__ import main

TINY_ASSETS = [
    "--train-steps", "3", "--batch-size", "2", "--classifier-steps", "2",
    "--pieces-per-collection", "2", "--seconds-per-piece", "2.2", "--sampling-steps", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_bench_writes_every_metric_of_the_issue(tmp_path, cache, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--device", "cpu", "--out", str(out), "--cache-dir", str(cache), *TINY_ASSETS,
            "--seeds", "1", "--batch", "1", "--fad-samples", "4", "--timing-repeats", "1"]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {out / 'metrics.json'}"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "infill_observed_l1_ratio_guided_vs_unguided",
        "continuation_seam_mel_distance_ratio_guided_vs_unguided",
        "style_kl_ratio_guided_vs_unguided",
        "guided_step_time_ratio",
        "fad_model_vs_real",
        "sampling_steps_per_s",
    ):
        assert key in metrics and metrics[key] >= 0
    assert main(args) == 0  # finished: reported, not rerun


def test_demo_writes_wavs_and_spectrograms(tmp_path, cache):
    out = tmp_path / "demo"
    assert (
        main(
            ["demo", "--device", "cpu", "--out", str(out), "--cache-dir", str(cache), *TINY_ASSETS]
        )
        == 0
    )
    wavs = sorted(p.name for p in (out / "wav").glob("*.wav"))
    assert "infill_guided.wav" in wavs and "transition_guided.wav" in wavs and len(wavs) >= 9
    for name in ("infill", "continuation", "transition", "style"):
        assert (out / f"{name}.png").stat().st_size > 1000
    info = sf.info(str(out / "wav" / "infill_guided.wav"))
    assert info.samplerate == 8000


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("train")
    train = ["train", "--out", str(out), "--device", "cpu", "--cache-dir", str(cache),
             "--steps", "2", "--batch-size", "2", "--pieces-per-collection", "2", "--seconds-per-piece", "2.2"]  # fmt: skip
    assert main(train) == 0
    assert (out / "model" / "model.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 2
    return out / "model"


def _wav(path, seconds, sr=16000, freq=330.0):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.4 * np.sin(2 * np.pi * freq * t), sr)
    return path


def test_task_commands_read_and_write_wav(tmp_path, trained):
    src = _wav(tmp_path / "in.wav", 1.2)  # 16 kHz: resampled to the model's 8 kHz
    model = trained
    common = ["--device", "cpu", "--model", str(model), "--steps", "2", "--batch", "1"]
    assert main(["infill", "--out", str(tmp_path / "i"), "--input", str(src), *common]) == 0
    metrics = json.loads((tmp_path / "i" / "metrics.json").read_text())
    assert "observed_l1" in metrics and (tmp_path / "i" / "spectrograms.png").is_file()
    assert sf.info(str(tmp_path / "i" / "wav" / "infill_0.wav")).frames == 9600 // 128 * 128


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        ("sample", ["--seconds", "0.5"]),
        ("continue", ["--seconds", "1.0", "--prompt-seconds", "0.4"]),
        ("regenerate", ["--k", "0.5"]),
        ("transition", []),
    ],
)
def test_other_commands(tmp_path, trained, command, extra):
    common = [
        "--device",
        "cpu",
        "--model",
        str(trained),
        "--steps",
        "2",
        "--batch",
        "1",
        "--out",
        str(tmp_path / "o"),
    ]
    if command == "transition":
        extra = [
            "--left",
            str(_wav(tmp_path / "l.wav", 1.0)),
            "--right",
            str(_wav(tmp_path / "r.wav", 1.0, freq=550.0)),
        ]
    elif command != "sample":
        extra = [*extra, "--input", str(_wav(tmp_path / "in.wav", 1.1))]
    assert main([command, *common, *extra]) == 0
    assert (
        list((tmp_path / "o" / "wav").glob("*.wav"))
        and (tmp_path / "o" / "spectrograms.png").is_file()
    )


def test_transition_tracks_at_two_rates_are_refused(tmp_path, trained, capsys):
    left, right = _wav(tmp_path / "l.wav", 1.0), _wav(tmp_path / "r.wav", 1.0, sr=22050)
    code = main(["transition", "--device", "cpu", "--model", str(trained), "--out", str(tmp_path / "o"),
                 "--left", str(left), "--right", str(right), "--steps", "2"])  # fmt: skip
    assert code == 1 and "sample rates differ (16000 Hz vs 22050 Hz)" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, capsys):
    assert_exit(["bench", "--xi-l1", "-1", "--out", str(tmp_path / "x")], 2)
    assert "xi_l1" in capsys.readouterr().err
    assert_exit(["infill", "--project", "maybe", "--out", str(tmp_path / "y")], 2)


def assert_exit(argv, code):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == code


def test_bad_wav_is_a_one_line_failure(tmp_path, cache, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    model = tmp_path / "m"
    from verger.music_guidance import AudioDiffusion, DiffusionConfig

    AudioDiffusion(DiffusionConfig.tiny()).save_pretrained(model)
    code = main(["infill", "--out", str(tmp_path / "b"), "--input", str(bad), "--device", "cpu",
                 "--model", str(model), "--steps", "2"])  # fmt: skip
    assert code == 1
    assert "bad.wav: not a readable audio file" in capsys.readouterr().err


XI = "10"  # a strong step: the tiny random model only takes three sampler steps


@pytest.fixture
def style_files(tmp_path, tiny_model):
    from verger.music_guidance.classifier import AudioClassifier, ClassifierConfig

    torch.manual_seed(0)
    classes = ("organ", "fiddle", "choir")
    classifier = AudioClassifier(ClassifierConfig(classes=classes))
    with torch.no_grad():
        classifier.head.weight.mul_(30)  # a decisive (if arbitrary) judge: a clear gradient
    classifier.save_pretrained(tmp_path / "classifier")
    tiny_model.save_pretrained(tmp_path / "model")
    return ["--device", "cpu", "--model", str(tmp_path / "model"), "--classifier",
            str(tmp_path / "classifier"), "--steps", "3", "--batch", "2"]  # fmt: skip


def test_style_command_steers_toward_the_target_class(tmp_path, style_files):
    found = {}
    for xi in ("0", XI):
        out = tmp_path / f"xi{xi}"
        argv = ["style", "--out", str(out), "--target-class", "fiddle", "--xi", xi, *style_files]
        assert main(argv) == 0
        assert len(list((out / "wav").glob("style_classifier_*.wav"))) == 2
        assert (out / "spectrograms.png").stat().st_size > 1000
        found[xi] = json.loads((out / "metrics.json").read_text())
    # same seed and start noise: only the guidance differs, and it raises p(target)
    plain, guided = found["0"], found[XI]
    assert 0 <= plain["target_class_probability_guide"] < guided["target_class_probability_guide"]
    assert guided["loss_classifier"] < plain["loss_classifier"] - 0.02  # cross-entropy, nats


def test_style_command_errors(tmp_path, style_files, capsys):
    common = ["--out", str(tmp_path / "s"), *style_files]
    assert main(["style", "--target-class", "jazz", *common]) == 1
    assert (
        "target_class='jazz' must be one of ['organ', 'fiddle', 'choir']" in capsys.readouterr().err
    )
    model_only = ["--device", "cpu", "--model", style_files[3], "--steps", "3"]
    assert main(["style", "--out", str(tmp_path / "t"), *model_only]) == 1
    assert "needs --classifier" in capsys.readouterr().err
