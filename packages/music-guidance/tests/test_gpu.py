"""CUDA checks (run by the tests_gpu session on a GPU machine)."""

import pytest
import torch

from verger.music_guidance.guidance import MaskedL1
from verger.music_guidance.model import AudioDiffusion, DiffusionConfig
from verger.music_guidance.sampling import SamplerSettings, sample

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_guided_sampling_on_cuda_matches_its_invariants():
    torch.manual_seed(0)
    model = AudioDiffusion(DiffusionConfig.tiny()).cuda().eval()
    ref = 0.3 * torch.randn(1, 1, 8192, device="cuda")
    mask = (torch.arange(8192, device="cuda") % 3) == 0
    term = MaskedL1(ref, mask).guidance()
    plain = sample(model, batch_size=2, settings=SamplerSettings(steps=4), seed=1)
    zero = sample(model, batch_size=2, guidance=[term], settings=SamplerSettings(steps=4), seed=1)
    assert torch.equal(plain, zero)
    projected = sample(
        model,
        batch_size=2,
        guidance=[term],
        settings=SamplerSettings(steps=4, xi=0.1, project="clean"),
        seed=1,
    )
    assert torch.equal(projected[..., mask], ref[..., mask].expand(2, 1, -1))


def test_paper_waveform_model_runs_a_guided_step_on_cuda():
    model = AudioDiffusion(DiffusionConfig.paper_waveform()).cuda().eval()
    n = 2**16  # 1.5 s of 44.1 kHz stereo keeps the check short
    ref = 0.1 * torch.randn(1, 2, n, device="cuda")
    term = MaskedL1(ref, torch.arange(n, device="cuda") < n // 2).guidance()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sample(
            model,
            batch_size=1,
            num_samples=n,
            guidance=[term],
            settings=SamplerSettings(steps=2, xi=3e-3),
        )
    assert out.shape == (1, 2, n) and bool(torch.isfinite(out).all())
