import pytest
import torch

from verger.core.testing import assert_close
from verger.music_guidance.guidance import (
    ClassifierLoss,
    DenseObservation,
    EmbeddingL2,
    Guidance,
    MaskedL1,
    total_guidance_loss,
)
from verger.music_guidance.sampling import (
    SamplerSettings,
    ddim_invert,
    denoise,
    denoise_step,
    guidance_gradient,
    sample,
)
from verger.music_guidance.schedule import x0_from_v


def _l1_term(reference, mask):
    return MaskedL1(reference, mask).guidance()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_xi_zero_equals_unguided_bit_for_bit(tiny_model, sampler):
    ref = torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(5))
    mask = torch.arange(512) < 200
    eta = 0.3 if sampler == "ddim" else 0.0
    plain = sample(
        tiny_model,
        batch_size=2,
        settings=SamplerSettings(sampler=sampler, steps=6, eta=eta),
        seed=3,
    )
    guided = sample(
        tiny_model,
        batch_size=2,
        guidance=[_l1_term(ref, mask)],
        settings=SamplerSettings(sampler=sampler, steps=6, eta=eta, xi=0.0),
        seed=3,
    )
    assert torch.equal(plain, guided)
    moved = sample(
        tiny_model,
        batch_size=2,
        guidance=[_l1_term(ref, mask)],
        settings=SamplerSettings(sampler=sampler, steps=6, eta=eta, xi=1e-3),
        seed=3,
    )
    assert not torch.equal(plain, moved)  # the same path with xi > 0 does change the sample


@pytest.mark.parametrize("mode", ["x_t", "x0_hat", "noisy"])
def test_guidance_gradient_matches_finite_differences(tiny_model, mode):
    model = tiny_model.double()
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 1, 512, generator=g, dtype=torch.float64)
    ref = torch.randn(1, 1, 512, generator=g, dtype=torch.float64)
    mask = torch.rand(512, generator=g) < 0.5
    # a smooth loss (L2 part) and a non-smooth one (L1) weighted together
    terms = [
        Guidance(lambda a: (a - ref).pow(2).flatten(1).sum(-1), weight=0.5),
        _l1_term(ref, mask).scaled(2.0),
    ]
    t = 0.6
    a, s = model.schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64))
    tt = torch.full((1,), t, dtype=torch.float64)

    def loss_at(x):
        with torch.no_grad():
            audio = x0_from_v(x, model(x, tt), a, s) if mode == "x_t" else x
            return float(total_guidance_loss(terms, audio))

    grad, v, _ = guidance_gradient(model, x_t, t, terms, mode=mode)
    point = x_t if mode != "x0_hat" else x0_from_v(x_t, v, a, s)
    h = 1e-6
    for i in torch.randperm(512, generator=g)[:6].tolist():
        e = torch.zeros_like(point)
        e[0, 0, i] = h
        numeric = (loss_at(point + e) - loss_at(point - e)) / (2 * h)
        assert float(grad[0, 0, i]) == pytest.approx(numeric, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("audio_scale", [1.0, 6.0])
def test_projection_makes_observed_samples_exact(tiny_model, audio_scale):
    # at scale 6, y * 6 / 6 differs from y in some last bits: the final audio projection holds
    tiny_model.config.audio_scale = audio_scale
    ref = 0.3 * torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(512) % 7) < 3
    if audio_scale != 1:
        assert not torch.equal(tiny_model.decode(tiny_model.encode(ref)), ref)
    for project in ("clean", "noised"):
        out = sample(
            tiny_model,
            batch_size=2,
            guidance=[_l1_term(ref, mask)],
            settings=SamplerSettings(steps=5, xi=1e-3, project=project),
            seed=0,
        )
        assert torch.equal(out[..., mask], ref[..., mask].expand(2, 1, -1))
        assert not torch.allclose(out[..., ~mask], ref[..., ~mask].expand(2, 1, -1))


def test_projection_onto_a_general_linear_operator(tiny_model):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20, 512, generator=g)
    y = torch.randn(1, 1, 20, generator=g)
    obs = DenseObservation(A, y)
    term = Guidance(lambda a: (a @ A.T - y).abs().flatten(1).sum(-1), observation=obs)
    out = denoise(
        tiny_model,
        torch.randn(2, 1, 512, generator=g),
        settings=SamplerSettings(steps=4, xi=1e-4, project="clean"),
        guidance=[term],
        generator=g,
    )
    assert_close(out @ A.T, y.expand(2, 1, -1), rtol=1e-4)


def test_guidance_lowers_the_task_loss(tiny_model):
    ref = 0.3 * torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(4))
    mask = torch.arange(512) < 256
    term = _l1_term(ref, mask)
    losses = {}
    for xi in (0.0, 0.2):
        out = sample(
            tiny_model,
            batch_size=2,
            guidance=[term],
            settings=SamplerSettings(steps=8, xi=xi),
            seed=1,
        )
        losses[xi] = float(term.loss(out).mean())
    assert losses[0.2] < 0.5 * losses[0.0]


def test_ddim_eta_zero_is_deterministic_and_inverts(tiny_model):
    model = tiny_model.double()
    settings = SamplerSettings(sampler="ddim", steps=100)
    z = torch.randn(2, 1, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x1 = denoise(model, z, settings=settings, generator=torch.Generator().manual_seed(1))
    x2 = denoise(model, z, settings=settings, generator=torch.Generator().manual_seed(99))
    assert torch.equal(x1, x2)  # no randomness at eta = 0, whatever the generator
    z_back = ddim_invert(model, x1, steps=100, t_end=0.9)
    x_back = denoise(model, z_back, settings=settings, t_start=0.9)
    rel = float((x_back - x1).norm() / x1.norm())
    assert rel < 0.02, rel


def test_ddpm_last_step_returns_the_clean_estimate(tiny_model):
    x_t = torch.randn(2, 1, 512)
    settings = SamplerSettings(steps=1)
    out = denoise_step(tiny_model, x_t, 0.3, 0.0, settings=settings)
    a, s = tiny_model.schedule.alpha_sigma(torch.tensor(0.3, dtype=torch.float64))
    with torch.no_grad():
        expected = x0_from_v(x_t, tiny_model(x_t, torch.full((2,), 0.3)), a.float(), s.float())
    assert_close(out, expected, rtol=1e-6)


def test_ready_made_losses_have_their_closed_forms():
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(3, 1, 32, generator=g), torch.randn(1, 1, 32, generator=g)
    mask = torch.arange(32) < 10
    assert_close(MaskedL1(ref, mask)(x), (x - ref)[..., :10].abs().sum((1, 2)), rtol=1e-6)

    class Mean:
        sample_rate = 8000

        def embed(self, a):
            return torch.stack([a.mean((1, 2)), a.std((1, 2))], -1)

    target = torch.tensor([0.1, 1.0])
    assert_close(
        EmbeddingL2(Mean(), target)(x), (Mean().embed(x) - target).pow(2).sum(-1), rtol=1e-6
    )
    logits_fn = lambda a: torch.stack([a.mean((1, 2)), -a.mean((1, 2)), a.std((1, 2))], -1)  # noqa: E731
    probs = torch.tensor([0.2, 0.0, 0.8])
    expected = -(probs * torch.log_softmax(logits_fn(x), -1)).sum(-1)
    assert_close(ClassifierLoss(logits_fn, probs)(x), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="sum to 1"):
        ClassifierLoss(logits_fn, torch.tensor([0.5, 0.0, 0.0]))


def test_weighted_sum_gradient_is_the_sum_of_gradients(tiny_model):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 1, 512, generator=g)
    ref = torch.randn(1, 1, 512, generator=g)
    a_term = _l1_term(ref, torch.arange(512) < 100)
    b_term = Guidance(lambda a: a.pow(2).flatten(1).sum(-1))
    ga, _, _ = guidance_gradient(tiny_model, x_t, 0.5, [a_term])
    gb, _, _ = guidance_gradient(tiny_model, x_t, 0.5, [b_term])
    gab, _, _ = guidance_gradient(tiny_model, x_t, 0.5, [a_term.scaled(2.0), b_term.scaled(0.25)])
    assert_close(gab, 2 * ga + 0.25 * gb, rtol=1e-4)


def test_bad_settings_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match=r"xi=-0\.1"):
        SamplerSettings(xi=-0.1)
    with pytest.raises(ValueError, match="sampler="):
        SamplerSettings(sampler="euler")
    with pytest.raises(ValueError, match="project="):
        SamplerSettings(project="yes")
    with pytest.raises(ValueError, match="needs a guidance term with a linear observation"):
        sample(tiny_model, settings=SamplerSettings(steps=2, project="clean"))
    with pytest.raises(TypeError, match="Guidance terms"):
        sample(tiny_model, guidance=[lambda a: a.sum()], settings=SamplerSettings(steps=2))
    with pytest.raises(ValueError, match="num_samples"):
        sample(tiny_model, num_samples=100, settings=SamplerSettings(steps=2))
