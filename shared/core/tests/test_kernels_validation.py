"""Bad input to the fused ops raises ValueError/TypeError naming the argument."""

import pytest
import torch

from verger.core.kernels import (
    apply_rotary_emb,
    linear_cross_entropy,
    rms_norm,
    swiglu,
    use_backend,
)


def test_rms_norm_rejects_bad_input():
    x, w = torch.randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match="weight has 7 features"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match=r"x has dtype torch\.int64"):
        rms_norm(torch.ones(4, 8, dtype=torch.long), w)
    with pytest.raises(ValueError, match="x must be contiguous"):
        rms_norm(torch.randn(8, 4).T, torch.ones(8))
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, w, eps=0.0)
    with pytest.raises(ValueError, match="backend='cuda'"):
        rms_norm(x, w, backend="cuda")
    with pytest.raises(TypeError, match=r"weight must be a torch\.Tensor"):
        rms_norm(x, [1.0] * 8)


def test_rotary_rejects_bad_input():
    x = torch.randn(2, 5, 3, 8)
    cos = sin = torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"cos has shape \(4, 4\)"):
        apply_rotary_emb(x, torch.zeros(4, 4), sin)
    with pytest.raises(ValueError, match="must be even"):
        apply_rotary_emb(torch.randn(2, 5, 3, 7), cos, sin)
    with pytest.raises(TypeError, match=r"cos has dtype torch\.float16"):
        apply_rotary_emb(x, cos.half(), sin)
    with pytest.raises(ValueError, match="sin requires grad"):
        apply_rotary_emb(x, cos, sin.clone().requires_grad_())
    with pytest.raises(ValueError, match="x must be contiguous"):
        apply_rotary_emb(torch.randn(2, 3, 5, 8).transpose(1, 2), cos, sin)


def test_swiglu_rejects_bad_input():
    with pytest.raises(ValueError, match="must have one shape"):
        swiglu(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(TypeError, match="share a dtype"):
        swiglu(torch.randn(3, 4), torch.randn(3, 4).half())


def test_linear_cross_entropy_rejects_bad_input():
    x, w, t = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
    with pytest.raises(ValueError, match="targets holds 11"):
        linear_cross_entropy(x, w, torch.full((6,), 11))
    with pytest.raises(ValueError, match="targets holds -1"):
        linear_cross_entropy(x, w, torch.full((6,), -1))
    with pytest.raises(TypeError, match=r"targets has dtype torch\.float32"):
        linear_cross_entropy(x, w, t.float())
    with pytest.raises(ValueError, match=r"targets \(5,\) must have shape"):
        linear_cross_entropy(x, w, t[:5])
    with pytest.raises(ValueError, match=r"weight \(11, 7\)"):
        linear_cross_entropy(x, torch.randn(11, 7), t)
    with pytest.raises(TypeError, match="must share a dtype"):
        linear_cross_entropy(x, w.half(), t)
    with pytest.raises(ValueError, match="reduction='avg'"):
        linear_cross_entropy(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size=0"):
        linear_cross_entropy(x, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="ignore_index=3 collides"):
        linear_cross_entropy(x, w, t, ignore_index=3)
    with pytest.raises(ValueError, match="x must be contiguous"):
        linear_cross_entropy(torch.randn(8, 6).T, w, t)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"):
        swiglu(torch.randn(3), torch.randn(3), backend="triton")


def test_use_backend_redirects_auto_only_inside_the_block(monkeypatch):
    with pytest.raises(ValueError, match="use_backend: backend='auto'"), use_backend("auto"):
        pass
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"), use_backend("triton"):
        swiglu(torch.randn(3), torch.randn(3))
    swiglu(torch.randn(3), torch.randn(3))  # "auto" is back to the torch path


def test_pick_backend_is_the_one_dispatch_for_every_members_ops(monkeypatch):
    from verger.core.kernels import (
        TritonUnavailableError,
        pick_backend,
        triton_unusable,
        use_backend,
    )

    cpu = torch.device("cpu")
    choices = ("auto", "torch", "triton", "library")
    assert pick_backend("library", cpu, op="op", choices=choices) == "library"
    with pytest.raises(ValueError, match=r"op: backend='cuda' is not one of"):
        pick_backend("cuda", cpu, op="op")
    assert pick_backend("auto", cpu, op="op") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if triton_unusable(cpu) is None:  # triton installed: the override reaches any op
        with use_backend("triton"):
            assert pick_backend("auto", cpu, op="op") == "triton"
            assert pick_backend("auto", cpu, op="op", fits=False) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        assert "needs TRITON_INTERPRET=1" in (triton_unusable(cpu) or "")
        with pytest.raises(TritonUnavailableError, match="op: backend='triton'"):
            pick_backend("triton", cpu, op="op")
    with use_backend("torch"):
        assert pick_backend("auto", cpu, op="op") == "torch"
