import pytest
import torch

from verger.core.testing import assert_close
from verger.music_guidance.autoencoder import AudioAutoencoder, AutoencoderConfig
from verger.music_guidance.dit import DiT1D, DiTConfig
from verger.music_guidance.model import AudioDiffusion, DiffusionConfig, load_diffusion
from verger.music_guidance.unet import FrameFold, UNet1D, UNetConfig


@pytest.mark.parametrize(("size", "hop"), [(32, 16), (16, 4), (8, 8)])
def test_frame_fold_inverts_exactly(size, hop):
    fold = FrameFold(2, size, hop).double()
    x = torch.randn(3, 2, 40 * hop, dtype=torch.float64)
    frames = fold.fold(x)
    assert frames.shape == (3, 2 * size, 40)
    assert_close(fold.unfold(frames), x, rtol=1e-12)


def test_unet_and_dit_shapes_and_length_checks():
    cfg = UNetConfig(
        in_channels=2,
        frame_size=8,
        frame_hop=4,
        channels=(8, 16),
        factors=(1, 2),
        attention_levels=(1,),
        heads=2,
        time_dim=16,
        groups=4,
    )
    unet = UNet1D(cfg)
    x = torch.randn(2, 2, 64)
    assert unet(x, torch.rand(2)).shape == x.shape
    with pytest.raises(ValueError, match="multiple of 8"):
        unet(torch.randn(2, 2, 60), torch.rand(2))
    dit = DiT1D(DiTConfig(in_channels=4, width=16, depth=2, heads=2, time_dim=16))
    z = torch.randn(2, 4, 10)
    assert dit(z, torch.rand(2)).shape == z.shape


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="frame_size=10 must be a multiple of frame_hop=4"):
        UNetConfig(frame_size=10, frame_hop=4)
    with pytest.raises(ValueError, match="factors"):
        UNetConfig(channels=(8, 16), factors=(1,))
    with pytest.raises(ValueError, match="kind="):
        DiffusionConfig(kind="spectrogram")
    with pytest.raises(ValueError, match="clip_samples=1000 must be a multiple"):
        DiffusionConfig.tiny(clip_samples=1000)
    with pytest.raises(ValueError, match="exactly one denoiser"):
        DiffusionConfig(kind="latent", autoencoder=AutoencoderConfig(), unet=None, dit=None)
    with pytest.raises(ValueError, match="kl_weight"):
        AutoencoderConfig(kl_weight=-1.0)


def test_paper_presets_have_the_paper_sizes():
    with torch.device("meta"):
        wave = AudioDiffusion(DiffusionConfig.paper_waveform())
        latent = AudioDiffusion(DiffusionConfig.paper_latent())
    assert 400e6 < wave.num_parameters("denoiser") < 480e6  # the paper's 440M U-Net
    assert wave.config.sample_rate == 44100 and wave.config.audio_channels == 2
    assert abs(wave.config.clip_seconds - 11.9) < 0.05
    assert 0.9e9 < latent.num_parameters("denoiser") < 1.2e9  # the 1B DiT
    assert latent.config.dit.depth == 32 and latent.config.dit.width == 1536
    assert latent.autoencoder.compression == 128 and abs(latent.config.clip_seconds - 5.9) < 0.05


def test_autoencoder_round_trip_shapes_and_scale():
    ae = AudioAutoencoder(
        AutoencoderConfig(channels=(8, 16), factors=(2, 4), latent_channels=4, blocks_per_stage=1)
    )
    x = torch.randn(2, 1, 64)
    z = ae.encode(x)
    assert z.shape == (2, 4, 8) and ae.decode(z).shape == x.shape
    ae.latent_scale.fill_(2.0)
    assert_close(ae.encode(x), z / 2, rtol=1e-6)
    assert ae.training_loss(x).ndim == 0


def test_save_and_load_round_trip(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")
    back = load_diffusion(tmp_path / "m")
    x, t = torch.randn(1, 1, 512), torch.rand(1)
    with torch.no_grad():
        assert torch.equal(back(x, t), tiny_model(x, t))
    scaled = DiffusionConfig.from_dict(DiffusionConfig.tiny(audio_scale=6.0).to_dict())
    assert scaled.audio_scale == 6.0 and "audio_scale" not in DiffusionConfig.tiny().to_dict()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        load_diffusion(tmp_path / "nothing")
