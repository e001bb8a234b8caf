import numpy as np
import pytest
import scipy.linalg
import torch

from verger.music_guidance.metrics import (
    classifier_kl,
    fad,
    frechet_distance,
    mel_distance,
    seam_mel_distance,
    seam_mel_windows,
)


def test_frechet_distance_closed_forms():
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2
    d = frechet_distance(
        torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([3.0]), torch.tensor([[9.0]])
    )
    assert d == pytest.approx(4.0 + 1.0)
    # general case against scipy's matrix square root
    g = np.random.default_rng(0)
    a, b = g.normal(size=(6, 6)), g.normal(size=(6, 6))
    c1, c2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    m1, m2 = g.normal(size=6), g.normal(size=6)
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    got = frechet_distance(*(torch.from_numpy(v) for v in (m1, c1, m2, c2)))
    assert got == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(
        torch.from_numpy(m1), torch.from_numpy(c1), torch.from_numpy(m1), torch.from_numpy(c1)
    ) == pytest.approx(0, abs=1e-8)


def test_fad_is_zero_for_one_set_and_grows_with_a_shift():
    class Identity:
        sample_rate = 8000

        def embed(self, a):
            return a.flatten(1)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 1, 4, generator=g, dtype=torch.float64)
    assert fad(Identity(), x, x) == pytest.approx(0, abs=1e-9)
    assert fad(Identity(), x, x + 1.0) == pytest.approx(4.0, rel=1e-6)  # |shift|^2 over 4 dims


def test_mel_distance_on_observed_frames_only():
    sr = 8000
    t = torch.arange(4096) / sr
    a = torch.sin(2 * torch.pi * 440 * t).view(1, 1, -1)
    b = a.clone()
    b[..., 2048:] = torch.sin(2 * torch.pi * 1500 * t[2048:])
    observed = torch.arange(4096) < 1800
    assert mel_distance(a, a, sr) == 0.0
    assert (
        mel_distance(a, b, sr, observed) < 1e-3
    )  # frames centred before 1800 do not see the change
    assert mel_distance(a, b, sr) > 0.5
    with pytest.raises(ValueError, match="observed must be"):
        mel_distance(a, b, sr, observed[:100])


def test_seam_distance_is_small_for_a_continuous_tone_and_large_for_a_jump():
    sr = 8000
    t = torch.arange(8192) / sr
    tone = torch.sin(2 * torch.pi * 440 * t)
    jump = tone.clone()
    jump[4096:] = 0.5 * torch.sin(2 * torch.pi * 2000 * t[4096:])
    d = seam_mel_distance(torch.stack([tone, jump]).unsqueeze(1), 4096, sr)
    assert float(d[0]) < 0.05 and float(d[1]) > 1.0


def test_seam_windows_see_only_their_own_side_of_the_seam():
    sr, seam = 8000, 4096
    t = torch.arange(8192) / sr
    low = 0.3 * torch.sin(2 * torch.pi * 300 * t)
    high = 0.3 * torch.sin(2 * torch.pi * 2500 * t)
    spliced = torch.where(torch.arange(8192) < seam, low, high)
    clips = torch.stack([spliced, low, high]).unsqueeze(1)
    before, after = seam_mel_windows(clips, seam, sr)
    # no frame of either window straddles the seam: each equals the unspliced tone's
    assert torch.allclose(before[0], before[1], atol=1e-4)
    assert torch.allclose(after[0], after[2], atol=1e-4)
    assert torch.allclose(
        seam_mel_distance(clips, seam, sr), (after - before).abs().mean(-1), atol=1e-6
    )


def test_classifier_kl_closed_form():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    one_hot = torch.tensor([1.0, 0.0, 0.0])
    assert classifier_kl(p, one_hot) == pytest.approx(-(np.log(0.5) + np.log(0.1)) / 2)
    target = torch.tensor([0.5, 0.25, 0.25])
    assert classifier_kl(p[:1], target) == pytest.approx(0.0, abs=1e-9)
