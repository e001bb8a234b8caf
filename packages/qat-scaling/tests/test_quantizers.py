"""Fake quantizers: level sets, LSQ / SEQ / sign gradients by formula, the Triton kernel
and the torch path against the reference, scale initialization and input checks."""

import math

import pytest
import torch

from verger.core.testing import assert_close, requires_triton
from verger.qat_scaling import QuantConfig, WeightFakeQuantizer, fake_quant, level_spec
from verger.qat_scaling.ops.fake_quant import fake_quant_reference

ALL_BITS = [1, "ternary", 2, 3, 4, 6, 8]
BACKENDS = [pytest.param("triton", marks=requires_triton), "torch"]


def _expected_levels(bits):
    if bits == 1:
        return [-1.0, 1.0]
    if bits == "ternary":
        return [-2 / 3, 0.0, 2 / 3]
    if bits == 2:
        return [-0.75, -0.25, 0.25, 0.75]
    return [float(k) for k in range(-(2 ** (bits - 1)), 2 ** (bits - 1))]


@pytest.mark.parametrize("bits", ALL_BITS)
def test_exactly_2_pow_b_levels_on_random_weights(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 4096)
    q = WeightFakeQuantizer((64, 4096), QuantConfig(bits=bits))
    # scales that clip at about 2.6 sigma, so the densest grid (8 bits) is fully populated
    spec = q.spec
    span = spec.code_max if spec.scheme == "lsq" else 1.0
    with torch.no_grad():
        q.scale.fill_(2.6 / span if spec.scheme != "sign" else 0.8)
    q.set_enabled(True)
    out = q(w)
    want = 3 if bits == "ternary" else 2**bits
    assert torch.unique(out).numel() == want
    levels = torch.unique(torch.round(out / q.scale[0, 0] * 3000) / 3000)
    assert torch.allclose(levels, torch.tensor(_expected_levels(bits)), atol=1e-3)
    codes, _ = q.quantize(w)
    assert torch.equal(torch.unique(codes), torch.arange(want, dtype=torch.uint8))


def _lsq_formula(w, s, g, qn, qp, group):
    """LSQ (Esser et al. 2020, eq. 3) with its gradient scale 1 / sqrt(n Qp)."""
    v = w / s
    r = torch.where(
        v < qn, torch.full_like(v, qn), torch.where(v > qp, torch.full_like(v, qp), v.round() - v)
    )
    grad_s = (g * r).sum(-1, keepdim=True) / math.sqrt(group * qp)
    grad_w = g * ((v >= qn) & (v <= qp))
    return grad_w, grad_s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_scale_gradient_equals_lsq_formula(backend, bits):
    torch.manual_seed(bits)
    rows, group, groups = 6, 16, 3
    w = torch.randn(rows, group * groups) * (0.2 * 2 ** (bits - 1))  # some clip, most do not
    s = (torch.rand(rows, groups) * 0.3 + 0.05).requires_grad_(True)
    w.requires_grad_(True)
    g = torch.randn(rows, group * groups)
    spec = level_spec(bits, "lsq")
    fake_quant(w, s, spec, spec.grad_scale(group), backend=backend).backward(g)
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    grad_w, grad_s = _lsq_formula(
        w.detach().view(rows, groups, group), s.detach().view(rows, groups, 1),
        g.view(rows, groups, group), qn, qp, group,
    )  # fmt: skip
    assert (
        w.detach().view(rows, groups, group) / s.detach()[..., None] > qp
    ).any()  # clipping seen
    assert torch.allclose(s.grad, grad_s.view(rows, groups), rtol=1e-5, atol=1e-6)
    assert torch.equal(w.grad, grad_w.view(rows, -1))


def test_seq_and_sign_gradients_by_formula():
    torch.manual_seed(1)
    w = torch.randn(4, 32)
    g = torch.randn(4, 32)
    for bits, scheme in ((2, "seq"), ("ternary", "seq"), (1, "sign")):
        s = torch.full((4, 1), 1.2, requires_grad=True)
        wr = w.clone().requires_grad_(True)
        spec = level_spec(bits, scheme)
        fake_quant(wr, s, spec, 1.0).backward(g)
        v = w / 1.2
        if scheme == "sign":
            level = torch.where(w >= 0, 1.0, -1.0)
            r, inside = level, v.abs() <= 1
        else:
            n, t = (2.0, 0.5) if bits == 2 else (1.5, 0.0)
            level = (torch.round(v.clamp(-0.99, 0.99) * n - t) + t) / n
            inside = v.abs() <= 0.99
            r = torch.where(inside, level - v, level)
        assert torch.allclose(s.grad, (g * r).sum(-1, keepdim=True), rtol=1e-5, atol=1e-6), bits
        assert torch.equal(wr.grad, g * inside), bits


RTOL = {torch.float32: 2e-6, torch.float16: 2e-3}


CASES = [  # ragged groups for every bit width and dtype; groups longer than one block
    *[(bits, dtype, (5, 72), 3) for bits in ALL_BITS for dtype in (torch.float32, torch.float16)],
    *[(bits, torch.float32, (2, 5000), 1) for bits in (1, "ternary", 4)],
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,dtype,shape,groups", CASES)
def test_backends_match_reference(backend, dtype, bits, shape, groups):
    torch.manual_seed(2)
    config = QuantConfig(bits=bits)
    spec = level_spec(bits, config.scheme)
    w = (torch.randn(shape) * 0.5).to(dtype)
    s = torch.rand(shape[0], groups) * 0.2 + 0.1
    gscale = spec.grad_scale(shape[1] // groups)
    dy = torch.randn(shape, dtype=dtype)
    outs = []
    for fn in (
        lambda a, b: fake_quant(a, b, spec, gscale, backend=backend),
        lambda a, b: fake_quant_reference(
            a.reshape(-1, shape[1] // groups), b.reshape(-1, 1), spec, gscale
        ).view(shape),
    ):
        a, b = w.clone().requires_grad_(True), s.clone().requires_grad_(True)
        out = fn(a, b)
        out.backward(dy)
        outs.append((out, a.grad, b.grad))
    (out, gw, gs), (ref, ref_gw, ref_gs) = outs
    assert out.dtype == dtype and gw.dtype == dtype
    assert torch.equal(out, ref)  # codes and levels are exact in every path
    assert torch.equal(gw, ref_gw)
    assert_close(gs, ref_gs, rtol=RTOL[dtype] if dtype == torch.float16 else 1e-5, name="grad s")


def test_scale_initialization_rules():
    torch.manual_seed(3)
    w = torch.randn(4, 64)
    g = w.view(4, 2, 32).abs()
    cases = [
        (dict(bits=4), g.amax(-1) / 7),
        (dict(bits=4, scale_init="lsq"), 2 * g.mean(-1) / math.sqrt(7)),
        (dict(bits=4, scale_init="torchao"), g.amax(-1) / 7.5),
        (dict(bits=2), g.amax(-1)),
        (dict(bits="ternary"), g.amax(-1)),
        (dict(bits=1), g.mean(-1)),
    ]
    for fields, want in cases:
        q = WeightFakeQuantizer((4, 64), QuantConfig(group_size=32, **fields))
        q.initialize(w)
        assert torch.allclose(q.scale, want), fields


def test_scale_dtype_rounds_the_scale_in_the_forward_pass():
    w = torch.randn(3, 16)
    q = WeightFakeQuantizer((3, 16), QuantConfig(bits=4, scale_dtype="float16"))
    q.initialize(w)
    q.set_enabled(True)
    s16 = q.scale.detach().half().float()
    assert not torch.equal(s16, q.scale.detach())  # the rounding is visible
    assert torch.equal(q(w), fake_quant_reference(w, s16, q.spec, 1.0))


def test_dynamic_scales_follow_the_weights_without_gradient():
    torch.manual_seed(4)
    q = WeightFakeQuantizer((4, 32), QuantConfig(bits=8, learned_scale=False))
    q.set_enabled(True)
    w = torch.randn(4, 32, requires_grad=True)
    q(w).sum().backward()
    assert q.scale.grad is None and not q.scale.requires_grad
    want = w.detach().abs().amax(-1, keepdim=True) / 127
    assert torch.equal(q.effective_scale(w.detach()), want)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(bits=5), "bits=5"),
        (dict(bits=0), "bits=0"),
        (dict(bits=True), "bits=True"),
        (dict(bits="4"), "bits='4'"),
        (dict(bits=4, scheme="seq"), "does not support"),
        (dict(bits=1, scheme="lsq"), "does not support"),
        (dict(bits=2, scale_init="torchao"), "lsq scheme only"),
        (dict(group_size=1), "group_size"),
        (dict(group_size=32.0), "group_size"),
        (dict(embedding_bits=2), "embedding_bits"),
        (dict(scale_dtype="int8"), "scale_dtype"),
        (dict(learned_scale="yes"), "learned_scale"),
    ],
)
def test_bad_configs_are_clear_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**fields)


def test_fake_quant_checks_its_inputs():
    spec = level_spec(4, "lsq")
    w = torch.randn(4, 12)
    with pytest.raises(ValueError, match="do not fit"):
        fake_quant(w, torch.ones(4, 5), spec)
    with pytest.raises(ValueError, match="do not fit"):
        fake_quant(w, torch.ones(3, 1), spec)
    with pytest.raises(TypeError, match="dtype"):
        fake_quant(w, torch.ones(4, 1, dtype=torch.float64), spec)
    with pytest.raises(TypeError, match="LevelSpec"):
        fake_quant(w, torch.ones(4, 1), "lsq")
    with pytest.raises(ValueError, match="expected \\[rows, cols\\]"):
        fake_quant(w.view(-1), torch.ones(4, 1), spec)
    with pytest.raises(ValueError, match="does not divide"):
        WeightFakeQuantizer((4, 12), QuantConfig(group_size=5))
