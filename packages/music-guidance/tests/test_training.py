import pytest
import torch

from verger.music_guidance.model import AudioDiffusion, DiffusionConfig
from verger.music_guidance.training import (
    EMA,
    ClipSampler,
    TrainConfig,
    train_autoencoder,
    train_diffusion,
)
from verger.music_guidance.unet import UNetConfig


def _config():
    return DiffusionConfig(
        sample_rate=8000,
        clip_samples=256,
        unet=UNetConfig(frame_size=8, frame_hop=4, channels=(8, 16), factors=(1, 2), blocks_per_level=1,
                        attention_levels=(1,), heads=2, kernel_size=3, time_dim=16, groups=4),
    )  # fmt: skip


def _clips(n=12):
    t = torch.arange(256) / 8000
    freqs = torch.linspace(200, 900, n).view(-1, 1, 1)
    return 0.5 * torch.sin(2 * torch.pi * freqs * t)


def _train(tmp, steps, *, resume=True):
    torch.manual_seed(0)
    model = AudioDiffusion(_config())
    cfg = TrainConfig(
        steps=steps, batch_size=4, warmup_steps=2, checkpoint_every=3, log_every=1, ema_decay=0.9
    )
    return train_diffusion(model, _clips(), cfg, out_dir=tmp, resume=resume, show_progress=False)


def test_resume_is_exact(tmp_path):
    straight = _train(tmp_path / "a", 6)
    # a run stopped after step 3 (its checkpoint), then resumed to step 6
    cfg_dir = tmp_path / "b"
    _train(cfg_dir, 6).history  # noqa: B018 - writes checkpoints at 3 and 6
    import shutil

    shutil.rmtree(cfg_dir / "checkpoints" / "step-00000006")
    (cfg_dir / "checkpoints" / "latest").write_text("step-00000003\n")
    resumed = _train(cfg_dir, 6)
    assert [h.step for h in resumed.history] == [4, 5, 6]
    assert [h.loss for h in resumed.history] == [h.loss for h in straight.history[3:]]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    logged = (cfg_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == 6  # the resumed steps replace, not repeat, the lost ones


def test_training_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    model = AudioDiffusion(_config())
    cfg = TrainConfig(steps=40, batch_size=8, warmup_steps=4, lr=3e-3, checkpoint_every=0)
    result = train_diffusion(model, _clips(), cfg, show_progress=False)
    first = sum(h.loss for h in result.history[:5]) / 5
    last = sum(h.loss for h in result.history[-5:]) / 5
    assert last < 0.7 * first


def test_ema_follows_its_formula():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = EMA(lin, decay=0.5)
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update(lin)  # decay min(0.5, 1/10) = 0.1 at the first update
    assert torch.allclose(ema.shadow.weight, torch.full((1, 2), 0.1 * 1 + 0.9 * 3))
    for _ in range(20):
        ema.update(lin)
    assert int(ema.updates) == 21


def test_clip_sampler_resumes_its_stream():
    a = ClipSampler(_clips(), batch_size=3, noise_shape=(1, 256), seed=1)
    next(a)
    state = a.state_dict()
    expected = next(a)
    b = ClipSampler(_clips(), batch_size=3, noise_shape=(1, 256), seed=1)
    b.load_state_dict(state)
    for x, y in zip(next(b), expected):
        assert torch.equal(x, y)
    other_rank = next(ClipSampler(_clips(), batch_size=3, noise_shape=(1, 256), seed=1, rank=1))
    assert not torch.equal(
        other_rank[1], next(ClipSampler(_clips(), batch_size=3, noise_shape=(1, 256), seed=1))[1]
    )


def _ddp_worker(tmp):
    from verger.core.distributed import get_rank

    result = _train(tmp, 3)
    return get_rank(), [p.detach().clone() for p in result.model.parameters()]


@pytest.mark.slow
def test_ddp_ranks_stay_identical(tmp_path, multiprocess):
    results = multiprocess(_ddp_worker, 2, str(tmp_path / "ddp"))
    (_, p0), (_, p1) = results
    for a, b in zip(p0, p1):
        assert torch.equal(a, b)
    single = _train(tmp_path / "single", 3)
    # different data per rank: the 2-rank model is not the 1-rank model
    assert any(not torch.allclose(a, b) for a, b in zip(p0, single.model.parameters()))
    assert (tmp_path / "ddp" / "checkpoints" / "latest").is_file()


def test_train_config_and_inputs_are_checked():
    with pytest.raises(ValueError, match=r"ema_decay=1\.0"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="gain_range"):
        TrainConfig(gain_range=(2.0, 1.0))
    model = AudioDiffusion(_config())
    with pytest.raises(ValueError, match="clips must be"):
        train_diffusion(model, torch.zeros(4, 2, 256), TrainConfig(steps=1))
    with pytest.raises(ValueError, match="latent model"):
        train_autoencoder(model, _clips(), TrainConfig(steps=1))
