import math

import pytest
import torch

from verger.core.testing import assert_close
from verger.music_guidance.audio import Audio, SampleRateMismatchError
from verger.music_guidance.sampling import SamplerSettings
from verger.music_guidance.schedule import noise_level_for_mix
from verger.music_guidance.tasks import (
    constant_power_gains,
    continuation,
    crossfade,
    infill,
    regenerate,
    run_task,
    start_state,
    style_classifier,
    style_embedding,
    transition,
)


def test_constant_power_crossfade():
    fade_out, fade_in = constant_power_gains(1000, dtype=torch.float64)
    assert_close(fade_out**2 + fade_in**2, torch.ones(1000, dtype=torch.float64), rtol=1e-12)
    assert fade_out[0] > 0.99 and fade_in[-1] > 0.99 and bool((fade_out[1:] < fade_out[:-1]).all())
    # uncorrelated signals of equal power keep that power through the fade
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4096, 1000, generator=g, dtype=torch.float64)
    b = torch.randn(4096, 1000, generator=g, dtype=torch.float64)
    power = crossfade(a, b).pow(2).mean(0)
    assert float((power - 1).abs().max()) < 0.12
    linear = torch.linspace(0, 1, 1000, dtype=torch.float64)
    dip = (a * (1 - linear) + b * linear).pow(2).mean(0)
    assert float(dip[450:550].mean()) < 0.6  # a linear fade loses half the power mid-way
    with pytest.raises(ValueError, match="equal shapes"):
        crossfade(a, b[:, :10])


def test_continuation_starts_from_the_prompt_and_guides_toward_it(tiny_model, sine):
    prompt = Audio(sine.waveform[:, :200], 8000)
    task = continuation(tiny_model, prompt, 512)
    assert task.observed.sum() == 200 and bool(task.observed[:200].all())
    x, t = start_state(tiny_model, task, 3, torch.Generator().manual_seed(0))
    assert t == 1.0 and torch.equal(x[..., :200], prompt.waveform.expand(3, 1, -1))
    out = run_task(
        tiny_model, task, batch_size=2, settings=SamplerSettings(steps=4, xi=0.1, project="clean")
    )
    assert torch.equal(out[..., :200], prompt.waveform.expand(2, 1, -1))


def test_regeneration_starts_from_the_input_noised_to_level_k(tiny_model, sine):
    task = regenerate(tiny_model, sine, k=0.85)
    g = torch.Generator().manual_seed(0)
    x, t = start_state(tiny_model, task, 1, g)
    assert t == pytest.approx(noise_level_for_mix(0.85))
    z = torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(0))
    a, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
    assert_close(x, a * sine.waveform.unsqueeze(0) + s * z, rtol=1e-6)


def test_transition_reference_is_context_crossfade_context(tiny_model):
    n = 512
    left = Audio(torch.full((1, 600), 0.5), 8000)
    right = Audio(torch.full((1, 600), -0.25), 8000)
    task = transition(tiny_model, left, right, crossfade_samples=128, context_samples=192)
    ref = task.reference[0, 0]
    fade_out, fade_in = constant_power_gains(128)
    assert ref.shape == (n,)
    assert torch.equal(ref[:192], torch.full((192,), 0.5))
    assert_close(ref[192:320], 0.5 * fade_out - 0.25 * fade_in, rtol=1e-6)
    assert torch.equal(ref[320:], torch.full((192,), -0.25))
    assert not bool(task.observed[192:320].any()) and bool(task.observed[:192].all())
    assert task.start == "regenerate"


def test_style_tasks_build_their_losses(tiny_model, sine):
    class Emb:
        sample_rate = 8000

        def embed(self, a):
            return a.pow(2).mean(-1)

    task = style_embedding(tiny_model, Emb(), [sine], 512)
    assert_close(task.guidance[0].loss.target, sine.waveform.pow(2).mean(-1), rtol=1e-6)

    class Clf(torch.nn.Module):
        sample_rate, num_classes = 8000, 3

        def forward(self, a):
            return torch.stack([a.mean((1, 2)), a.std((1, 2)), -a.mean((1, 2))], -1)

    task = style_classifier(tiny_model, Clf(), 2, 512)
    assert task.guidance[0].loss.target.tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="target class"):
        style_classifier(tiny_model, Clf(), 3, 512)


def test_bad_inputs_are_clear_errors(tiny_model, sine):
    with pytest.raises(ValueError, match="mask must be 1-D with one entry per sample"):
        infill(tiny_model, sine, torch.ones(500, dtype=torch.bool))
    with pytest.raises(ValueError, match="some samples observed"):
        infill(tiny_model, sine, torch.ones(512, dtype=torch.bool))
    with pytest.raises(SampleRateMismatchError, match="16000 Hz vs 8000 Hz"):
        infill(tiny_model, Audio(sine.waveform, 16000), torch.arange(512) < 100)
    with pytest.raises(SampleRateMismatchError, match="left and right"):
        transition(
            tiny_model, sine, Audio(sine.waveform, 16000), crossfade_samples=64, context_samples=64
        )
    with pytest.raises(ValueError, match="silent"):
        regenerate(tiny_model, Audio(torch.zeros(1, 512), 8000))
    with pytest.raises(ValueError, match="empty"):
        Audio(torch.zeros(1, 0), 8000)
    with pytest.raises(ValueError, match="NaN"):
        Audio(torch.full((1, 4), float("nan")), 8000)
    with pytest.raises(ValueError, match="multiple of"):
        continuation(tiny_model, Audio(sine.waveform[:, :100], 8000), 500)
    with pytest.raises(ValueError, match="shorter than"):
        continuation(tiny_model, sine, 512)
    with pytest.raises(TypeError, match="must be an Audio"):
        infill(tiny_model, sine.waveform, torch.arange(512) < 100)
