"""The latent configuration: autoencoder + DiT, guided through the decoder."""

import pytest
import torch

from verger.music_guidance.autoencoder import AutoencoderConfig
from verger.music_guidance.dit import DiTConfig
from verger.music_guidance.guidance import MaskedL1
from verger.music_guidance.model import AudioDiffusion, DiffusionConfig
from verger.music_guidance.sampling import SamplerSettings, sample
from verger.music_guidance.training import TrainConfig, train_autoencoder, train_diffusion


@pytest.fixture(scope="module")
def latent_model():
    torch.manual_seed(0)
    config = DiffusionConfig(
        kind="latent",
        sample_rate=8000,
        clip_samples=256,
        autoencoder=AutoencoderConfig(latent_channels=4, channels=(8, 16), factors=(2, 4)),
        dit=DiTConfig(in_channels=4, width=32, depth=2, heads=2, time_dim=16),
    )
    model = AudioDiffusion(config)
    t = torch.arange(256) / 8000
    clips = 0.5 * torch.sin(2 * torch.pi * torch.linspace(200, 800, 16).view(-1, 1, 1) * t)
    cfg = TrainConfig(
        steps=20,
        batch_size=8,
        warmup_steps=2,
        autoencoder_steps=300,
        autoencoder_lr=3e-3,
        checkpoint_every=0,
    )
    history = train_autoencoder(model, clips, cfg)
    assert history[-1].loss < history[0].loss
    train_diffusion(model, clips, cfg, show_progress=False)
    return model.eval(), clips


def test_latents_are_unit_scale_and_decode_to_audio(latent_model):
    model, clips = latent_model
    z = model.encode(clips)
    assert z.shape == (16, 4, 32)
    assert 0.5 < float(z.std()) < 2.0  # latent_scale set from the data
    assert model.decode(z).shape == clips.shape


def test_guidance_through_the_decoder_lowers_the_task_loss(latent_model):
    model, clips = latent_model
    ref = clips[3:4]
    mask = torch.arange(256) < 128
    term = MaskedL1(ref, mask).guidance()
    losses = {}
    for xi in (0.0, 0.3):
        out = sample(
            model, batch_size=2, guidance=[term], settings=SamplerSettings(steps=8, xi=xi), seed=0
        )
        assert out.shape == (2, 1, 256)
        losses[xi] = float(term.loss(out).mean())
    assert losses[0.3] < 0.6 * losses[0.0]


def test_projection_is_refused_for_the_latent_model(latent_model):
    model, clips = latent_model
    term = MaskedL1(clips[:1], torch.arange(256) < 128).guidance()
    with pytest.raises(ValueError, match="decode is not linear"):
        sample(model, guidance=[term], settings=SamplerSettings(steps=2, xi=0.1, project="clean"))
