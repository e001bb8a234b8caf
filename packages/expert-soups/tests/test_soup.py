"""SoupOfExperts: instantiate == the functional model, reductions to a plain model, gradients,
validation of h, files."""

import json

import pytest
import torch

from verger.core.nn import TransformerLM
from verger.core.testing import tiny_config
from verger.expert_soups import SoupConfig, SoupOfExperts, check_domain_weights

K = 5


def _soup(**overrides):
    torch.manual_seed(0)
    fields = dict(model=tiny_config(), n_domains=K, n_experts=3)
    fields.update(overrides)
    return SoupOfExperts(SoupConfig(**fields))


def _simplex(seed):
    w = torch.rand(K, generator=torch.Generator().manual_seed(seed)) ** 2
    return w / w.sum()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"model": tiny_config(fused=False)},
        {"expert_rank": 2},
        {"expert_scope": "mlp", "coefficients": "linear", "per_layer_coefficients": True},
        {"expert_scope": "blocks", "model": tiny_config(tie_embeddings=False)},
    ],
    ids=["full", "unfused", "low_rank", "projected", "blocks_untied"],
)
def test_instantiate_equals_functional_model(overrides):
    soup = _soup(**overrides)
    ids = torch.randint(0, 61, (3, 17), generator=torch.Generator().manual_seed(0))
    for seed in (0, 1):
        h = _simplex(seed)
        with torch.no_grad():
            functional = soup(ids, h=h).logits
        plain = soup.instantiate(h)
        assert type(plain) is TransformerLM
        with torch.no_grad():
            logits = plain(ids).logits
        assert (logits - functional).abs().max() <= 1e-6
    # different h, different models: the coefficients matter
    a, b = soup.instantiate(_simplex(0)), soup.instantiate(_simplex(1))
    assert not torch.equal(a.blocks[0].mlp.w_up.weight, b.blocks[0].mlp.w_up.weight)


def test_instantiated_model_is_independent():
    soup = _soup(expert_scope="mlp")
    before = {k: v.clone() for k, v in soup.state_dict().items()}
    model = soup.instantiate(_simplex(0))
    assert model.lm_head.weight is model.embed.weight
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for k, v in soup.state_dict().items():
        assert torch.equal(v, before[k]), k
    # two instantiations share no module state (hooks, caches) either
    other = soup.instantiate(_simplex(0))
    model.blocks[0].register_forward_hook(lambda *args: None)
    assert len(other.blocks[0]._forward_hooks) == 0
    assert other.blocks[0] is not model.blocks[0] and other.config is not model.config


def _constant_alpha(soup, c):
    net = soup.coefficient_net.net
    with torch.no_grad():
        net[-1].weight.zero_()
        net[-1].bias.fill_(c)
    for p in soup.coefficient_net.parameters():
        p.requires_grad_(False)


@pytest.mark.parametrize("c", [0.0, 0.7])
def test_one_expert_with_constant_alpha_is_a_plain_model(c):
    """theta = S + c E. Under SGD with lr, S and E move by -lr g and -lr c g: theta moves
    by -lr (1 + c^2) g, exactly a plain model trained with lr (1 + c^2)."""
    soup = _soup(n_experts=1, model=tiny_config(fused=False))
    _constant_alpha(soup, c)
    h = _simplex(3)
    plain = TransformerLM(soup.config.model)
    plain.load_state_dict(soup.instantiate(h).state_dict())
    lr = 0.05
    opt_soup = torch.optim.SGD([p for p in soup.parameters() if p.requires_grad], lr=lr)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=lr * (1 + c * c))
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 61, (4, 12), generator=gen)
        loss_soup = soup(ids[:, :-1], ids[:, 1:], h=h).loss
        loss_plain = plain(ids[:, :-1], ids[:, 1:]).loss
        assert abs(loss_soup.item() - loss_plain.item()) < 1e-5
        for opt, loss in ((opt_soup, loss_soup), (opt_plain, loss_plain)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    trained = soup.instantiate(h).state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"expert_rank": 2, "coefficients": "linear"}])
def test_gradients_reach_shared_every_expert_and_the_coefficient_net(overrides):
    soup = _soup(**overrides)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    soup(ids[:, :-1], ids[:, 1:], h=_simplex(0)).loss.backward()
    groups = {"shared": soup.shared, "experts": soup.experts, "coef": soup.coefficient_net}
    for group, module in groups.items():
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{group}.{name}"
    # each expert separately (the slices of the stacked tensors)
    for key, p in soup.experts.items():
        per_expert = p.grad.flatten(1).abs().sum(1)
        assert bool((per_expert > 0).all()), key


def test_bad_domain_weights_are_clear_errors():
    soup = _soup()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="simplex"):
        soup(ids, h=[0.5, 0.6, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="simplex"):
        soup.instantiate(torch.tensor([1.5, -0.5, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="expected 5 domain weights"):
        soup.instantiate([0.5, 0.5])
    with pytest.raises(ValueError, match="finite"):
        soup.instantiate([float("nan"), 1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"unknown domain name.*'python'"):
        soup.instantiate({"python": 1.0})
    with pytest.raises(TypeError, match="mapping"):
        soup.instantiate("c00")
    named = soup.instantiate({"c01": 0.25, "c03": 0.75})
    by_position = soup.instantiate([0.0, 0.25, 0.0, 0.75, 0.0])
    assert torch.equal(named.embed.weight, by_position.embed.weight)
    assert check_domain_weights([0, 0, 1], 3).dtype == torch.float32


def test_config_errors_name_the_field():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="n_experts"):
        SoupConfig(model=cfg, n_domains=4, n_experts=0)
    with pytest.raises(ValueError, match="expert_scope"):
        SoupConfig(model=cfg, n_domains=4, expert_scope="attention")
    with pytest.raises(ValueError, match="expert_rank"):
        SoupConfig(model=cfg, n_domains=4, expert_rank=-1)
    with pytest.raises(ValueError, match="domain_names"):
        SoupConfig(model=cfg, n_domains=2, domain_names=("a", "a"))
    with pytest.raises(ValueError, match="expert_init_scale"):
        SoupConfig(model=cfg, n_domains=2, expert_init_scale=float("inf"))
    config = SoupConfig(model=cfg, n_domains=3, expert_rank=4, domain_names=("x", "y", "z"))
    assert SoupConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_save_load_and_export(tmp_path):
    soup = _soup(expert_rank=2)
    soup.save(tmp_path / "soup")
    loaded = SoupOfExperts.load(tmp_path / "soup")
    for (name, a), (_, b) in zip(soup.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    h = {"c00": 0.5, "c04": 0.5}
    out = soup.export_specialist(h, tmp_path / "specialist")
    model = TransformerLM.from_pretrained(out)
    expected = soup.instantiate(h)
    ids = torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)
    assert json.loads((out / "domain_weights.json").read_text()) == h
    with pytest.raises(FileNotFoundError, match=r"soup_config\.json"):
        SoupOfExperts.load(tmp_path / "nothing")


def test_sizes():
    soup = _soup(n_experts=4)
    plain = soup.num_instantiated_parameters()
    assert plain == TransformerLM(soup.config.model).num_parameters()
    coef = sum(p.numel() for p in soup.coefficient_net.parameters())
    assert soup.num_parameters() == 5 * plain + coef
