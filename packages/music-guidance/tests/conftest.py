import pytest
import torch

from verger.core.testing import setup_triton_interpreter

setup_triton_interpreter()  # before anything imports a Triton kernel (verger.core.nn)
torch.set_num_threads(1)  # small ops on small shared machines: threads only contend


@pytest.fixture
def tiny_model():
    """A small random waveform model (8 kHz mono, length multiple 64)."""
    from verger.music_guidance.model import AudioDiffusion, DiffusionConfig
    from verger.music_guidance.unet import UNetConfig

    torch.manual_seed(0)
    config = DiffusionConfig(
        sample_rate=8000,
        clip_samples=512,
        unet=UNetConfig(
            frame_size=8,
            frame_hop=4,
            channels=(8, 16),
            factors=(1, 2),
            blocks_per_level=1,
            attention_levels=(1,),
            heads=2,
            kernel_size=3,
            time_dim=16,
            groups=4,
        ),
    )
    return AudioDiffusion(config).eval()


@pytest.fixture
def sine():
    """A 440 Hz sine, 512 samples at 8 kHz, as Audio."""
    from verger.music_guidance.audio import Audio

    t = torch.arange(512) / 8000
    return Audio((0.5 * torch.sin(2 * torch.pi * 440 * t)).unsqueeze(0), 8000)
